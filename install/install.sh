#!/usr/bin/env bash
# Installs corepipe from this checkout and turns collection on:
#   bash install/install.sh [--with EXTRA[,EXTRA...]] [corepipe install options, e.g. --store DIR --force]
# 1. python3 with venv (apt-get on Debian/Ubuntu when missing), and busybox-static when Docker is
#    present (the selftest's throwaway container needs a static busybox);
# 2. a virtualenv at $COREPIPE_PREFIX (/opt/corepipe) with this checkout installed into it, with the metrics
#    extra (serve's Prometheus endpoint is on by default) and the extras named by --with (azure, s3, fleet), and those
#    of earlier runs: the virtualenv keeps their list in share/corepipe/extras;
# 3. `corepipe install` (launcher $COREPIPE_BIN, config $COREPIPE_CONFIG; where a C compiler is, the static forwarder
#    corepipe-forward beside the launcher as the pattern's program), then `corepipe selftest`;
# 4. the bash completion (in $COREPIPE_COMPLETION_DIR, /usr/share/bash-completion/completions) and every man
#    page under man/ (in $COREPIPE_MAN_DIR/manN, /usr/local/share/man);
# 5. with COREPIPE_SHIP_TO=az://CONTAINER/PREFIX or s3://BUCKET/PREFIX: the SDK extra and the resident
#    shipper (install/systemd/corepipe-ship.service), node name $COREPIPE_SHIP_NODE (default: host name),
#    credentials' settings from the AZURE_* / AWS_* variables in install.sh's environment (docs, "Shipping").
# Systemd units go to $COREPIPE_UNITS_DIR (/etc/systemd/system) and are enabled where systemd runs; in another
# directory they are only written. The files written outside the virtualenv are listed in its
# share/corepipe/files, which install/uninstall.sh removes.
# Safe to run again: it upgrades the virtualenv in place and install changes only what differs.
set -euo pipefail
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="${COREPIPE_PREFIX:-/opt/corepipe}"
bin="${COREPIPE_BIN:-/usr/local/bin/corepipe}"
config="${COREPIPE_CONFIG:-/etc/corepipe/config.toml}"
python="${COREPIPE_PYTHON:-/usr/bin/python3}"
units="${COREPIPE_UNITS_DIR:-/etc/systemd/system}"
completion_dir="${COREPIPE_COMPLETION_DIR:-/usr/share/bash-completion/completions}"
man_dir="${COREPIPE_MAN_DIR:-/usr/local/share/man}"
known_extras=" metrics azure s3 fleet "

say() { echo "install.sh: $*"; }
die() { echo "install.sh: error: $*" >&2; exit 1; }

# As another user, run again through sudo (these variables kept); as root, go on as is.
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "run as root (no sudo here): bash install/install.sh"
    exec sudo COREPIPE_PREFIX="$prefix" COREPIPE_BIN="$bin" COREPIPE_CONFIG="$config" COREPIPE_PYTHON="$python" \
        COREPIPE_UNITS_DIR="$units" COREPIPE_COMPLETION_DIR="$completion_dir" COREPIPE_MAN_DIR="$man_dir" \
        bash "${BASH_SOURCE[0]}" "$@"
fi

extras=(metrics)
add_extras() {  # a comma-separated list from --with
    local extra
    for extra in ${1//,/ }; do
        case "$known_extras" in
            *" $extra "*) ;;
            *) die "--with $extra: no such extra; use one or more of$known_extras(comma-separated)" ;;
        esac
        case " ${extras[*]} " in *" $extra "*) ;; *) extras+=("$extra") ;; esac
    done
}
install_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --with) [ $# -ge 2 ] || die "--with needs a list of extras, e.g. --with azure,s3"; add_extras "$2"; shift 2 ;;
        --with=*) add_extras "${1#--with=}"; shift ;;
        *) install_args+=("$1"); shift ;;
    esac
done
case "${COREPIPE_SHIP_TO:-}" in
    "") ;;
    az://*) add_extras azure ;;
    s3://*) add_extras s3 ;;
    *) die "COREPIPE_SHIP_TO=$COREPIPE_SHIP_TO: use az://CONTAINER/PREFIX or s3://BUCKET/PREFIX" ;;
esac
record="$prefix/share/corepipe"
if [ -f "$record/extras" ]; then  # an upgrade keeps the extras installed before
    add_extras "$(tr '\n' ,  < "$record/extras")"
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
with="$(IFS=,; echo "${extras[*]}")"
say "installing corepipe[$with] from $src into $prefix"
# A copy, not an editable install: the kernel runs it even after the checkout is gone.
# --force-reinstall --no-deps: this checkout's code replaces an installed one of the same version.
"$prefix/bin/pip" install -q --disable-pip-version-check "$src[$with]"
"$prefix/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps "$src"
mkdir -p "$record"
printf '%s\n' "${extras[@]}" > "$record/extras"
echo "$src" > "$record/checkout"  # `corepipe` names `bash <checkout>/install/install.sh --with X` for a missing extra
touch "$record/files"

# Every file written outside the virtualenv is listed for uninstall.sh.
put() {  # put MODE SOURCE DEST
    mkdir -p "$(dirname "$3")"
    install -m "$1" "$2" "$3"
    grep -qxF "$3" "$record/files" || echo "$3" >> "$record/files"
}

"$prefix/bin/python" -I -m corepipe install --config "$config" --bin "$bin" ${install_args[@]+"${install_args[@]}"}

# systemd's own unit directory where systemd runs: the units are enabled; elsewhere they are only written.
systemd=""
if [ "$units" = /etc/systemd/system ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemd=yes
fi
unit() {  # unit NAME [sed expression]: install/systemd/NAME, with ExecStart pointed at this installation
    local tmp
    tmp="$(mktemp)"
    sed -e "${2:-}" "$src/install/systemd/$1" > "$tmp"
    put 644 "$tmp" "$units/$1"
    rm -f "$tmp"
}
want_units=""
if [ -n "$systemd" ] || [ "$units" != /etc/systemd/system ]; then
    want_units=yes
fi

# Retention: a daily timer runs `corepipe prune` (install/systemd/).
if [ -n "$want_units" ]; then
    unit corepipe-prune.service "s|^ExecStart=.*|ExecStart=$bin --config $config prune|"
    unit corepipe-prune.timer
fi
if [ -n "$systemd" ]; then
    systemctl daemon-reload
    systemctl enable --now corepipe-prune.timer >/dev/null
    say "enabled corepipe-prune.timer (daily 'corepipe prune')"
elif [ -n "$want_units" ]; then
    say "wrote corepipe-prune.service and .timer to $units (not systemd's directory: not enabled)"
else
    say "systemd is not running: schedule '$bin --config $config prune' yourself (e.g. cron, daily)"
fi

# corepipe serve, in both modes (docs/forwarding.md). Socket mode (`corepipe install --mode auto` picks it where
# the kernel has it and no static forwarder was built): corepipe.socket keeps the kernel's socket and the server
# switches the kernel to it while it runs. Pipe mode: the kernel's pipe handler hands each crash to the server
# (corepipe-forward.socket) while it runs, and collects it itself when it does not.
mode="$("$prefix/bin/python" -I -c 'import json, sys; print(json.load(open(sys.argv[1])).get("mode", "pipe"))' \
    "$(dirname "$config")/install.json")"
sockets=corepipe-forward.socket
[ "$mode" != socket ] || sockets="corepipe.socket $sockets"
if [ -n "$want_units" ]; then
    unit corepipe.service "s|^ExecStart=.*|ExecStart=$bin --config $config serve|"
    unit corepipe-forward.socket
    if [ "$mode" = socket ]; then
        unit corepipe.socket
    elif [ -f "$units/corepipe.socket" ]; then  # an earlier socket-mode install
        [ -z "$systemd" ] || systemctl disable --now corepipe.socket >/dev/null 2>&1 || true
        rm -f "$units/corepipe.socket"
    fi
fi
if [ -n "$systemd" ]; then
    systemctl daemon-reload
    systemctl enable --now $sockets corepipe.service >/dev/null
    say "enabled $sockets and corepipe.service ($mode mode)"
elif [ -n "$want_units" ]; then
    say "wrote corepipe.service and $sockets to $units (not systemd's directory: not enabled)"
else
    say "$mode mode: systemd is not running: run '$bin --config $config serve' under your supervisor;" \
        "until it runs, the pipe handler collects each crash itself"
fi

# Bash completion, made from the command line's own parser (so it lists what this version has).
completion="$(mktemp)"
"$bin" completion bash > "$completion"
put 644 "$completion" "$completion_dir/corepipe"
rm -f "$completion"
say "installed the bash completion $completion_dir/corepipe"
# Man pages: man/NAME.SECTION goes to $man_dir/manSECTION.
pages=0
for page in "$src"/man/*.[1-8]; do
    [ -f "$page" ] || continue
    name="$(basename "$page")"
    put 644 "$page" "$man_dir/man${name##*.}/$name"
    pages=$((pages + 1))
done
[ "$pages" = 0 ] || say "installed $pages man pages under $man_dir ('man corepipe')"

"$bin" selftest --config "$config"

ship_to="${COREPIPE_SHIP_TO:-}"
if [ -n "$ship_to" ]; then
    env_file="$(dirname "$config")/ship.env"
    umask 077
    {
        echo "COREPIPE_SHIP_TO=$ship_to"
        echo "COREPIPE_SHIP_NODE=${COREPIPE_SHIP_NODE:-$(hostname -s)}"
        env | grep -E '^(AZURE_(STORAGE_ACCOUNT_URL|STORAGE_CONNECTION_STRING|STORAGE_SAS_TOKEN|CLIENT_ID|TENANT_ID|FEDERATED_TOKEN_FILE|AUTHORITY_HOST)|AWS_(ENDPOINT_URL|ENDPOINT_URL_S3|REGION|DEFAULT_REGION|PROFILE|ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN|ROLE_ARN|WEB_IDENTITY_TOKEN_FILE))=' || true
    } > "$env_file.tmp"
    mv "$env_file.tmp" "$env_file"
    if [ -n "$want_units" ]; then
        unit corepipe-ship.service "s|^EnvironmentFile=.*|EnvironmentFile=$env_file|;s|^ExecStart=/usr/local/bin/corepipe |ExecStart=$bin --config $config |"
    fi
    if [ -n "$systemd" ]; then
        systemctl daemon-reload
        systemctl enable corepipe-ship.service >/dev/null
        systemctl restart corepipe-ship.service
        say "enabled corepipe-ship.service (resident 'corepipe ship --to $ship_to'); 'corepipe status' shows its backlog"
    else
        say "systemd is not running: run '$bin --config $config ship' (resident) with the settings in $env_file"
    fi
fi
