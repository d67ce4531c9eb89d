#!/usr/bin/env bash
# Install the PostgreSQL server that `PIPELINE_DB=postgres make run` and the postgres test tier
# start (their own private server: data directory, port and socket under the stack's state dir
# or a temp dir; the Debian package's own cluster is neither used nor started).
#
#   scripts/install_postgres.sh
#
# Idempotent and quick the second time: apt runs only when no server binaries (initdb, postgres,
# pg_ctl) are found. The package also creates the `postgres` system user, which the server runs
# as when the stack runs as root (PostgreSQL refuses to run as root). Its maintainer scripts
# would start the package's own cluster (port 5432): a policy-rc.d that answers 101 ("action
# forbidden") is put in place for the install where none exists, and removed afterwards.
# Debian/Ubuntu (apt) only; needs root or sudo. Exits non-zero when it could not install; CI
# tolerates that (the postgres tests then report one SKIPPED line with the reason).
set -euo pipefail

have_server() {
    local dir
    for dir in /usr/lib/postgresql/*/bin; do
        if [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ] && [ -x "$dir/pg_ctl" ]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

if bin=$(have_server); then
    echo "install_postgres: $("$bin/postgres" --version) in $bin"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "install_postgres: needs root (or sudo)" >&2
        exit 1
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_postgres: no apt-get here: install the PostgreSQL server (15+) by hand" >&2
    exit 1
fi
policy=/usr/sbin/policy-rc.d
ours=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# scripts/install_postgres.sh: start no service while installing.\nexit 101\n' |
        $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    ours=1
fi
cleanup() { if [ -n "$ours" ]; then $SUDO rm -f "$policy"; fi; }
trap cleanup EXIT

echo "install_postgres: apt-get install postgresql"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# Debian's `postgresql` is the distribution's supported major version (15 on bookworm).
$SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
bin=$(have_server) || {
    echo "install_postgres: installed, but no server binaries under /usr/lib/postgresql" >&2
    exit 1
}
echo "install_postgres: $("$bin/postgres" --version) in $bin"
