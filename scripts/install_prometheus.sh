#!/usr/bin/env bash
# Install Prometheus from Debian (bookworm: 2.42) for its `promtool`: the alert-rule tests run
# `promtool check rules` and `promtool test rules` on docker/prometheus/rules.yml, and the
# dashboard test parses every panel query with it. The package also brings the `prometheus`
# server binary for a local Prometheus; its own service is never started here.
#
#   scripts/install_prometheus.sh
#
# Idempotent and quick the second time: apt runs only when `promtool` is missing. Debian/Ubuntu
# (apt) only; needs root or sudo. The package's maintainer scripts would start (or enable) the
# `prometheus` service: a policy-rc.d that answers 101 ("action forbidden") is put in place for
# the install where none exists, and removed afterwards; --no-install-recommends leaves out the
# node exporter. Exits non-zero when it could not install; CI tolerates that (the promtool tests
# then report one SKIPPED line with the reason).
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
    echo "install_prometheus: $(promtool --version 2>&1 | head -n 1)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "install_prometheus: needs root (or sudo)" >&2
        exit 1
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_prometheus: no apt-get here: install Prometheus (promtool) by hand" >&2
    exit 1
fi

policy=/usr/sbin/policy-rc.d
ours=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# scripts/install_prometheus.sh: start no service while installing.\nexit 101\n' |
        $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    ours=1
fi
cleanup() { if [ -n "$ours" ]; then $SUDO rm -f "$policy"; fi; }
trap cleanup EXIT

echo "install_prometheus: apt-get install prometheus (for promtool)"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null

if ! command -v promtool >/dev/null 2>&1; then
    echo "install_prometheus: installed, but no promtool on PATH" >&2
    exit 1
fi
echo "install_prometheus: $(promtool --version 2>&1 | head -n 1)"
