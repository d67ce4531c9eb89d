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
# would start the package's own cluster (port 5432): scripts/lib/apt_install.sh keeps them from it.
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

# shellcheck source=lib/apt_install.sh
. "$(dirname "$0")/lib/apt_install.sh"
# Debian's `postgresql` is the distribution's supported major version (15 on bookworm).
apt_install install_postgres postgresql
bin=$(have_server) || {
    echo "install_postgres: installed, but no server binaries under /usr/lib/postgresql" >&2
    exit 1
}
echo "install_postgres: $("$bin/postgres" --version) in $bin"
