#!/bin/sh
# Install Prometheus (prometheus + promtool) for the tests that run a real Prometheus server.
# Idempotent: does nothing when both are on PATH. Never fails the build: when it cannot install,
# it prints one line saying why (those tests are then skipped) and exits 0.
set -u

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-prometheus: Prometheus not installed (no apt-get on this machine); the Prometheus tests will be skipped." >&2
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
    SUDO="sudo -n"
else
    echo "install-prometheus: Prometheus not installed (not root and no passwordless sudo); the Prometheus tests will be skipped." >&2
    exit 0
fi

install() {
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
        >/dev/null 2>&1
}

if ! install; then
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update >/dev/null 2>&1
    if ! install; then
        echo "install-prometheus: Prometheus not installed (apt-get install prometheus failed); the Prometheus tests will be skipped." >&2
        exit 0
    fi
fi

if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    echo "install-prometheus: Prometheus package installed but prometheus/promtool not on PATH; the Prometheus tests will be skipped." >&2
fi
exit 0
