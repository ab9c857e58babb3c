// Command pause is the sandbox ("pause") container of the test world's cluster: it holds a pod's
// namespaces open until it is told to stop, and reaps zombies when it is PID 1 of a shared PID namespace.
// Built here because no image can be pulled (registry.k8s.io is unreachable from these machines).
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	children := make(chan os.Signal, 16)
	signal.Notify(children, syscall.SIGCHLD)
	for {
		select {
		case <-stop:
			os.Exit(0)
		case <-children:
			reap()
		}
	}
}

// reap collects every exited child without blocking, so orphans adopted by PID 1 do not linger as zombies.
func reap() {
	for {
		var status syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
	}
}
