#!/usr/bin/env bash
# Install Prometheus from Debian (bookworm: 2.42) for its `promtool`: the alert-rule tests run
# `promtool check rules` and `promtool test rules` on the alert rules (the groups of
# docker/k8s/monitoring/prometheus-rule.yaml), and the dashboard test parses every panel query
# with it. The package also brings the `prometheus`
# server binary, which `make run` starts as part of the local stack (scripts/stack.py, with its
# own config and data under .local/prometheus); the package's own service is never started.
#
#   scripts/install_prometheus.sh
#
# Idempotent and quick the second time: apt runs only when `promtool` or `prometheus` is missing. Debian/Ubuntu
# (apt) only; needs root or sudo. The package's maintainer scripts would start (or enable) the
# `prometheus` service: scripts/lib/apt_install.sh keeps them from it; no recommends leaves
# out the node exporter. Exits non-zero when it could not install; CI tolerates that (the promtool tests
# then report one SKIPPED line with the reason).
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    echo "install_prometheus: $(promtool --version 2>&1 | head -n 1)"
    exit 0
fi

# shellcheck source=lib/apt_install.sh
. "$(dirname "$0")/lib/apt_install.sh"
apt_install install_prometheus prometheus

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    echo "install_prometheus: installed, but no promtool or prometheus on PATH" >&2
    exit 1
fi
echo "install_prometheus: $(promtool --version 2>&1 | head -n 1)"
