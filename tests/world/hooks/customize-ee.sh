#!/bin/sh
# mmdebstrap customize hook for the execution-environment image of the AWX-path test (tests/world/awx_path.py;
# $1 = the root filesystem being built). Its text is part of the recipe hash: editing it rebuilds the cache.
set -eu
root="$1"
# No identity, no apt state of the build (as customize-host.sh), no init: the EE runs one command per job.
: > "$root/etc/machine-id"
rm -f "$root/etc/hostname" "$root/etc/resolv.conf"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
mkdir -p "$root/var/lib/apt/lists/partial"
# /runner: where `ansible-runner worker` unpacks the job's private data dir (as in AWX's EE images).
mkdir -p "$root/runner"
