#!/bin/sh
# mmdebstrap customize hook for the test world's host images ($1 = the root filesystem being built).
# Its text is part of the recipe hash: editing it rebuilds the cached root filesystems.
set -eu
root="$1"

# Identity is given per container: empty machine-id (systemd fills it at boot), no hostname/resolv.conf
# (docker provides both), no apt lists or cached debs (smaller, and a site must not see the build's mirror state).
: > "$root/etc/machine-id"
rm -f "$root/etc/hostname" "$root/etc/resolv.conf" "$root/var/lib/dbus/machine-id"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
mkdir -p "$root/var/lib/apt/lists/partial"

# Units that make no sense (or fail) in a container: consoles, udev, logind, kernel filesystems, remounts,
# first-boot prompts, and apt's timers that would try the network.
for unit in getty.target console-getty.service getty@tty1.service \
    systemd-udevd.service systemd-udev-trigger.service systemd-udevd-control.socket systemd-udevd-kernel.socket \
    systemd-logind.service sys-kernel-config.mount sys-kernel-debug.mount sys-kernel-tracing.mount \
    sys-fs-fuse-connections.mount systemd-remount-fs.service systemd-firstboot.service \
    apt-daily.timer apt-daily-upgrade.timer e2scrub_reap.service e2scrub_all.timer; do
  ln -sf /dev/null "$root/etc/systemd/system/$unit"
done

# A foreign-arch root filesystem runs under qemu-user, which cannot emulate the mount API systemd uses to
# set up unit credentials ("Failed to set up credentials: Invalid argument"). The world passes no
# credentials, so drop LoadCredential= from the units that have it: tmpfiles, sysusers and sysctl then
# run at boot as on real hardware instead of failing.
if [ "$(chroot "$root" dpkg --print-architecture)" != "$(dpkg --print-architecture)" ]; then
  for unit in systemd-tmpfiles-setup.service systemd-tmpfiles-setup-dev.service systemd-tmpfiles-clean.service \
      systemd-sysusers.service systemd-sysctl.service procps.service; do
    [ -e "$root/lib/systemd/system/$unit" ] || continue
    mkdir -p "$root/etc/systemd/system/$unit.d"
    printf '[Service]\nLoadCredential=\n' > "$root/etc/systemd/system/$unit.d/od-world-qemu.conf"
  done
fi

# sshd: key login for root only. Host keys are made at first boot so every container has its own
# (the package's postinst made some at build time; they would be shared by every host of every site).
rm -f "$root"/etc/ssh/ssh_host_*
mkdir -p "$root/etc/ssh/sshd_config.d" "$root/etc/systemd/system/ssh.service.d"
cat > "$root/etc/ssh/sshd_config.d/od-world.conf" <<'EOF'
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
EOF
# Only an ed25519 host key: an RSA key under qemu takes many seconds at every boot of an arm64 host.
cat > "$root/etc/systemd/system/ssh.service.d/od-world-hostkey.conf" <<'EOF'
[Service]
ExecStartPre=
ExecStartPre=/bin/sh -c 'test -s /etc/ssh/ssh_host_ed25519_key || /usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key'
ExecStartPre=/usr/sbin/sshd -t
EOF
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sf /lib/systemd/system/ssh.service "$root/etc/systemd/system/multi-user.target.wants/ssh.service"
install -d -m 0700 "$root/root/.ssh"
