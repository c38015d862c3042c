#!/usr/bin/env bash
# Installs corepipe from this checkout and turns collection on:
#   bash install/install.sh [corepipe install options, e.g. --store DIR --force]
# 1. python3 with venv (apt-get on Debian/Ubuntu when missing), and busybox-static when Docker is
#    present (the selftest's throwaway container needs a static busybox);
# 2. a virtualenv at $COREPIPE_PREFIX (/opt/corepipe) with this checkout installed into it;
# 3. `corepipe install` (launcher $COREPIPE_BIN, config $COREPIPE_CONFIG), then `corepipe selftest`;
# 4. with COREPIPE_SHIP_TO=az://CONTAINER/PREFIX or s3://BUCKET/PREFIX: the SDK extra and the resident
#    shipper (install/systemd/corepipe-ship.service), node name $COREPIPE_SHIP_NODE (default: host name),
#    credentials' settings from the AZURE_* / AWS_* variables in install.sh's environment (README, "Shipping").
# Safe to run again: it upgrades the virtualenv in place and install changes only what differs.
set -euo pipefail
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="${COREPIPE_PREFIX:-/opt/corepipe}"
bin="${COREPIPE_BIN:-/usr/local/bin/corepipe}"
config="${COREPIPE_CONFIG:-/etc/corepipe/config.toml}"
python="${COREPIPE_PYTHON:-/usr/bin/python3}"

say() { echo "install.sh: $*"; }
die() { echo "install.sh: error: $*" >&2; exit 1; }

# As another user, run again through sudo (these variables kept); as root, go on as is.
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "run as root (no sudo here): bash install/install.sh"
    exec sudo COREPIPE_PREFIX="$prefix" COREPIPE_BIN="$bin" COREPIPE_CONFIG="$config" COREPIPE_PYTHON="$python" \
        bash "${BASH_SOURCE[0]}" "$@"
fi

apt_install() {
    command -v apt-get >/dev/null || die "install $* with your package manager, then run this again"
    say "installing $* (apt-get)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
}
if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3 python3-venv
fi
if command -v docker >/dev/null && [ ! -x /bin/busybox ]; then
    apt_install busybox-static
fi

if [ ! -x "$prefix/bin/python" ]; then
    say "creating the virtualenv $prefix"
    "$python" -m venv "$prefix"
fi
say "installing corepipe from $src into $prefix"
# A copy, not an editable install: the kernel runs it even after the checkout is gone.
# --force-reinstall --no-deps: this checkout's code replaces an installed one of the same version.
"$prefix/bin/pip" install -q --disable-pip-version-check "$src"
"$prefix/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps "$src"

"$prefix/bin/python" -I -m corepipe install --config "$config" --bin "$bin" "$@"

# Retention: where systemd runs, a daily timer runs `corepipe prune` (install/systemd/).
units=/etc/systemd/system
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    sed "s|^ExecStart=.*|ExecStart=$bin --config $config prune|" \
        "$src/install/systemd/corepipe-prune.service" > "$units/corepipe-prune.service"
    cp "$src/install/systemd/corepipe-prune.timer" "$units/corepipe-prune.timer"
    systemctl daemon-reload
    systemctl enable --now corepipe-prune.timer >/dev/null
    say "enabled corepipe-prune.timer (daily 'corepipe prune')"
else
    say "systemd is not running: schedule '$bin --config $config prune' yourself (e.g. cron, daily)"
fi

# corepipe serve, in both modes (docs/drafts/forwarding.md). Socket mode (`corepipe install --mode auto` picks
# it where the kernel has it): corepipe.socket keeps the kernel's socket and the server switches the kernel to
# it while it runs. Pipe mode: the kernel's pipe handler hands each crash to the server (corepipe-forward.socket)
# while it runs, and collects it itself when it does not.
mode="$("$prefix/bin/python" -I -c 'import json, sys; print(json.load(open(sys.argv[1])).get("mode", "pipe"))' \
    "$(dirname "$config")/install.json")"
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    sed "s|^ExecStart=.*|ExecStart=$bin --config $config serve|" \
        "$src/install/systemd/corepipe.service" > "$units/corepipe.service"
    cp "$src/install/systemd/corepipe-forward.socket" "$units/corepipe-forward.socket"
    sockets=corepipe-forward.socket
    if [ "$mode" = socket ]; then
        cp "$src/install/systemd/corepipe.socket" "$units/corepipe.socket"
        sockets="corepipe.socket $sockets"
    elif [ -f "$units/corepipe.socket" ]; then  # an earlier socket-mode install
        systemctl disable --now corepipe.socket >/dev/null 2>&1 || true
        rm -f "$units/corepipe.socket"
    fi
    systemctl daemon-reload
    systemctl enable --now $sockets corepipe.service >/dev/null
    say "enabled $sockets and corepipe.service ($mode mode)"
else
    say "$mode mode: systemd is not running: run '$bin --config $config serve' under your supervisor;" \
        "until it runs, the pipe handler collects each crash itself"
fi

"$bin" selftest --config "$config"

ship_to="${COREPIPE_SHIP_TO:-}"
if [ -n "$ship_to" ]; then
    case "$ship_to" in
        az://*) extra=azure ;;
        s3://*) extra=s3 ;;
        *) die "COREPIPE_SHIP_TO=$ship_to: use az://CONTAINER/PREFIX or s3://BUCKET/PREFIX" ;;
    esac
    say "installing the $extra extra for shipping to $ship_to"
    "$prefix/bin/pip" install -q --disable-pip-version-check "$src[$extra]"
    env_file="$(dirname "$config")/ship.env"
    umask 077
    {
        echo "COREPIPE_SHIP_TO=$ship_to"
        echo "COREPIPE_SHIP_NODE=${COREPIPE_SHIP_NODE:-$(hostname -s)}"
        env | grep -E '^(AZURE_(STORAGE_ACCOUNT_URL|STORAGE_CONNECTION_STRING|STORAGE_SAS_TOKEN|CLIENT_ID|TENANT_ID|FEDERATED_TOKEN_FILE|AUTHORITY_HOST)|AWS_(ENDPOINT_URL|ENDPOINT_URL_S3|REGION|DEFAULT_REGION|PROFILE|ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN|ROLE_ARN|WEB_IDENTITY_TOKEN_FILE))=' || true
    } > "$env_file.tmp"
    mv "$env_file.tmp" "$env_file"
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        sed -e "s|^EnvironmentFile=.*|EnvironmentFile=$env_file|" \
            -e "s|^ExecStart=/usr/local/bin/corepipe |ExecStart=$bin --config $config |" \
            "$src/install/systemd/corepipe-ship.service" > "$units/corepipe-ship.service"
        systemctl daemon-reload
        systemctl enable corepipe-ship.service >/dev/null
        systemctl restart corepipe-ship.service
        say "enabled corepipe-ship.service (resident 'corepipe ship --to $ship_to'); 'corepipe status' shows its backlog"
    else
        say "systemd is not running: run '$bin --config $config ship' (resident) with the settings in $env_file"
    fi
fi
