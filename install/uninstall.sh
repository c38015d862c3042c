#!/usr/bin/env bash
# Undoes install/install.sh: `corepipe uninstall` (arguments pass through, e.g. --purge), then removes
# the virtualenv. Same COREPIPE_PREFIX / COREPIPE_CONFIG overrides as install.sh.
set -euo pipefail
prefix="${COREPIPE_PREFIX:-/opt/corepipe}"
config="${COREPIPE_CONFIG:-/etc/corepipe/config.toml}"
[ "$(id -u)" = 0 ] || { echo "uninstall.sh: error: run as root: sudo bash install/uninstall.sh" >&2; exit 1; }
[ -x "$prefix/bin/python" ] || { echo "uninstall.sh: error: no corepipe virtualenv at $prefix" >&2; exit 1; }
"$prefix/bin/python" -I -m corepipe uninstall --config "$config" "$@"
rm -rf "$prefix"
echo "uninstall.sh: removed $prefix"
