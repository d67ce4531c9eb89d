#!/usr/bin/env bash
# Install and configure what the container images and their test tier need: podman
# (daemonless, runs as root here), runc, and debootstrap (the base image is made locally: no
# image registry can be reached from these machines, so nothing can be pulled).
#
#   scripts/install_container_tools.sh
#
# Idempotent and quick the second time: apt runs only when a tool is missing, and the podman
# settings are a drop-in file written only when it differs. Debian/Ubuntu (apt) only; needs
# root or sudo. Exits non-zero when it could not install; CI tolerates that (the container
# tests then report one SKIPPED line with the reason).
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "install_container_tools: needs root (or sudo)" >&2
        exit 1
    fi
fi

need=()
for tool in podman runc debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install_container_tools: no apt-get here: install ${need[*]} by hand" >&2
        exit 1
    fi
    echo "install_container_tools: apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # podman pulls in conmon, netavark/aardvark-dns (networks), uidmap; as root the kernel's
    # overlayfs is used, no fuse-overlayfs needed.
    $SUDO apt-get install -y -qq --no-install-recommends podman runc debootstrap \
        ca-certificates >/dev/null
fi

# These machines (a VM without systemd, with capped rlimits) cannot start a container with
# podman's defaults: runc refuses to raise RLIMIT_NOFILE ("error setting rlimit type 7") and
# there is no systemd for cgroups, journald or healthcheck timers. A drop-in (not the main
# containers.conf, which may hold someone's own settings) inherits the rlimits and uses runc,
# cgroupfs and file events.
conf_dir=/etc/containers/containers.conf.d
conf=$conf_dir/50-train-and-deploy.conf
want='# Written by scripts/install_container_tools.sh (train-and-deploy).
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
'
if [ "$(cat "$conf" 2>/dev/null)" != "$(printf '%s' "$want")" ]; then
    $SUDO mkdir -p "$conf_dir"
    printf '%s' "$want" | $SUDO tee "$conf" >/dev/null
    echo "install_container_tools: wrote $conf"
fi

echo "install_container_tools: $(podman --version), runc $(runc --version | awk 'NR==1 {print $3}')," \
    "debootstrap $(dpkg-query -W -f='${Version}' debootstrap 2>/dev/null || echo '?')"
