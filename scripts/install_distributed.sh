#!/usr/bin/env bash
# What `PIPELINE_EXECUTOR=celery make run` and the distributed test tier need from the machine:
# Redis (Celery's broker, Debian's `redis-server`; the package's own service is not started:
# the stack runs its own server under its state dir), `ip` (iproute2: network namespaces and
# veth pairs) and one system user per worker host (`pipeline-worker-a`, `pipeline-worker-b`),
# which the Celery workers run as so that they cannot read the scheduler's state folder.
#
#   scripts/install_distributed.sh
#
# Idempotent and quick the second time. Debian/Ubuntu (apt) only; needs root. Exits non-zero
# when it could not install; `make test` tolerates that (the tier reports one SKIPPED line).
set -euo pipefail

# shellcheck source=lib/apt_install.sh
. "$(dirname "$0")/lib/apt_install.sh"
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then apt_install install_distributed "${missing[@]}"; fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_distributed: the worker users need root (useradd)" >&2
    exit 1
fi
for host in a b; do
    user="pipeline-worker-$host"
    id -u "$user" >/dev/null 2>&1 ||
        useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$user"
done
echo "install_distributed: $(redis-server --version | cut -d' ' -f1-3), users pipeline-worker-a/-b"
