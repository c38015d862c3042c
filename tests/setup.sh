#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian machine: system packages, a venv, corepipe[test]
# (with the azure and s3 SDKs and moto's S3 server), and Azurite under .servers/ (git-ignored).
# debootstrap and systemd-container: tests/e2e/test_under_systemd.py builds a Debian tree on first use (cached
# in /var/cache/corepipe-tests) and boots it with systemd-nspawn.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(gcc libc6-dev gdb zstd util-linux busybox-static elfutils runc docker.io podman containerd prometheus fuse3 libfuse3-dev pkg-config lxc nodejs groff-base debootstrap systemd-container)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# Podman's settings for the tests are in tests/containers.conf (CONTAINERS_CONF, set by tests/conftest.py):
# nothing under /etc is changed.
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
# Azurite, Microsoft's Azure Storage emulator, for the shipping tests (tests/objectstores.py).
[ -x .servers/azurite/node_modules/.bin/azurite-blob ] ||
    npm install --prefix .servers/azurite --no-audit --no-fund --silent azurite
