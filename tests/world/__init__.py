"""The test world: simulated air-gapped sites made of real hosts (systemd containers) on this machine.

Modules: rootfs (mmdebstrap root filesystems, cached), hostimages (docker images of hosts and the jump
host), site (networks, containers, ssh keys, inventories), and a CLI: `python -m tests.world --help`.
"""
