"""One configuration file, ``/etc/corepipe/config.toml``; every key has a default that works without it."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field, fields
from typing import Optional

from corepipe.platform.errors import UserError

DEFAULT_PATH = "/etc/corepipe/config.toml"
DEFAULT_STORE = "/var/lib/corepipe"
#: Outside the Prometheus exporters' 9100-9999 range (all of it allocated) and below the ephemeral ports;
#: loopback only unless configured otherwise.
DEFAULT_METRICS_LISTEN = "127.0.0.1:19839"
#: What a debugging user needs from a crashed process's environment (``env_keep``).
ENV_KEEP = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "PWD", "HOSTNAME", "TERM", "TZ", "LANG", "LANGUAGE",
            "LC_*", "LD_LIBRARY_PATH", "LD_PRELOAD", "LD_BIND_NOW", "GLIBC_TUNABLES", "MALLOC_*", "GOMAXPROCS",
            "GOTRACEBACK", "GODEBUG", "RUST_BACKTRACE", "RUST_LOG", "PYTHONPATH", "PYTHONHOME", "JAVA_HOME",
            "JAVA_TOOL_OPTIONS", "NODE_ENV", "OMP_NUM_THREADS", "KUBERNETES_SERVICE_HOST", "CONTAINER", "container")
REDACT_ARGS = ("password", "passwd", "pwd", "pass", "passphrase", "secret", "token", "key", "apikey",
               "credential", "credentials", "auth", "cookie", "session", "dsn")


class ConfigError(UserError):
    """The file exists but cannot be used; the message says which key or line."""

    hint = "fix the config or pass --config"


@dataclass
class Config:
    #: Where cores and records are filed.
    store: str = DEFAULT_STORE
    #: zstd level (1-19) and worker threads (0: compress in the calling thread, -1: automatic, see compress.workers).
    compression_level: int = 3
    compression_threads: int = -1
    #: Honour the crashed process's RLIMIT_CORE (%c): 0 records without a core, N truncates at N bytes.
    honour_core_limit: bool = True
    #: The whole handler gives up after this many seconds (a handler must never hang).
    timeout: int = 900
    #: Most bytes read from any one /proc file (cmdline, environ, maps, ...).
    proc_read_limit: int = 1 << 20
    #: The crashed process's environment is kept by allow-list: variables named here (``*`` at the end matches
    #: any rest; ``["*"]`` keeps all) keep their values, every other value is stored as "<redacted>".
    env_keep: list = field(default_factory=lambda: list(ENV_KEEP))
    #: Kept variables whose names contain one of these (case-insensitive) are redacted all the same.
    redact_env: list = field(default_factory=lambda: ["PASSWORD", "PASSWD", "SECRET", "TOKEN", "KEY",
                                                       "CREDENTIAL", "AUTH", "COOKIE", "SESSION"])
    #: Command-line options and ``name=value`` pairs whose name has one of these words (split at ``-_.``,
    #: case-insensitive) get their value masked; so do URL passwords and token-shaped values. [] masks nothing.
    redact_args: list = field(default_factory=lambda: list(REDACT_ARGS))
    #: Most bytes of any one text field in a record (as stored, JSON escapes included); longer ones are cut and
    #: listed in the record's ``truncated``.
    record_field_max: int = 64 << 10
    #: Keep the crashed process's executable and mapped libraries (by build-id) so ``debug`` works without
    #: the image; for host processes too with ``binaries_host``; at most ``binaries_max_size`` bytes per crash.
    binaries: bool = True
    binaries_host: bool = False
    binaries_max_size: int = 512 << 20
    #: Take a backtrace with gdb or eu-stack after the core is stored, if one is installed (bounded).
    backtrace: bool = True
    backtrace_timeout: int = 30
    backtrace_max_core_size: int = 256 << 20
    #: Storage policy (see policy.py). The store uses at most max_use bytes and leaves keep_free bytes free
    #: on its filesystem; -1: 10% / 15% of the filesystem, each at most 4 GiB; 0: no such limit.
    max_use: int = -1
    keep_free: int = -1
    #: Most bytes of records per policy group; a crash without a core over it is counted, not recorded;
    #: -1: a tenth of max_use (at most 256 MiB); 0: no limit. Records do not count in max_use.
    records_max_use: int = -1
    #: Per container (host processes count as one): most cores kept and most bytes of cores; 0: no limit.
    container_max_cores: int = 20
    container_max_bytes: int = 0
    #: Cores are truncated (and marked) at this many uncompressed bytes; 0: no limit.
    max_core_size: int = 32 << 30
    #: Crash-loop control: at most this many cores per container / per executable in a container within
    #: rate_limit_window seconds; crashes over it get a record without a core. 0: no limit.
    rate_limit_container: int = 10
    rate_limit_exe: int = 5
    rate_limit_window: int = 600
    #: Crash storms (slots.py): at most concurrent_cores handlers host-wide read and store a core at the same
    #: time, at most concurrent_postmortems save binaries and take a backtrace (-1: one per CPU; 0: no limit).
    #: Up to 8 handlers per slot wait for a turn, at most core_wait / postmortem_wait seconds; the rest go on
    #: without it at once: a record without a core ("storm: ..."), or without binaries and backtrace.
    concurrent_cores: int = -1
    concurrent_postmortems: int = -1
    core_wait: int = 10
    postmortem_wait: int = 60
    #: Keep only the first signature_max_cores cores of one crash-site signature (domain/signature.py) within
    #: signature_window seconds, within each policy group (storage.md); later crashes of it get a record only.
    #: 0: no limit.
    signature_max_cores: int = 0
    signature_window: int = 3600
    #: For each new signature, run notify_command (an argv, no shell) as notify_user (""; a one-off uid; never
    #: root or the shared nobody) with the final record on stdin, killed after notify_timeout seconds; at most
    #: notify_rate_limit times per policy group within notify_rate_window seconds. Empty: no hook.
    notify_command: list = field(default_factory=list)
    notify_user: str = ""
    notify_timeout: int = 10
    notify_rate_limit: int = 10
    notify_rate_window: int = 3600
    #: Metrics: signatures with a label of their own (the most crashes); the rest count as "other".
    metrics_max_signatures: int = 50
    #: Where ``corepipe serve`` serves its Prometheus endpoint, ``[HOST:]PORT`` (HOST 127.0.0.1 if left out;
    #: port 0: any free one, named in serve.json); "": no endpoint (the textfile mode needs none).
    metrics_listen: str = DEFAULT_METRICS_LISTEN
    #: Crashes that get a record but no core ("not stored: excluded by config"), by shell-style pattern
    #: (policy.excluded): the executable's path, the container's name or id, the container's image. In
    #: socket mode the kernel is answered REJECT and writes no byte of the core.
    exclude_executables: list = field(default_factory=list)
    exclude_containers: list = field(default_factory=list)
    exclude_images: list = field(default_factory=list)
    #: ``corepipe prune`` deletes crashes older than this many days; 0: keep them.
    max_age_days: int = 30
    #: ``corepipe ship``: destination URL (az://CONTAINER/PREFIX or s3://BUCKET/PREFIX; "" ships nothing), the
    #: node name in the object keys ("" the host name), delete the local crash once its upload is verified,
    #: upload bandwidth cap (bytes/s, 0 none), parts in flight, and the longest wait between retries (s).
    ship_to: str = ""
    ship_node: str = ""
    delete_after_ship: bool = False
    ship_bandwidth: int = 0
    ship_concurrency: int = 4
    ship_retry_max: int = 300
    #: The fleet-wide core budget: the first this many cores of a signature (across every node shipping to the
    #: destination) are shipped, the later crashes ship their record only; 0: no budget.
    ship_signature_cores: int = 5
    #: ``extract``/``debug --remote`` refuse, before any download, a core whose record claims more uncompressed
    #: bytes than this (any fleet node writes records); 0: no cap (free space still bounds it).
    remote_core_max: int = 64 << 30
    #: The path it was loaded from, or None for the built-in defaults.
    path: Optional[str] = None


def _check(name: str, value: object, default: object) -> object:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{name} must be {type(default).__name__}, not {type(value).__name__}")
    return value


#: The keys only ``corepipe ship`` reads: the collector does not read them (``COLLECTOR``), so a bad destination
#: never touches a crash's collection; ``status`` and ``config check`` report it, ``ship`` stops on it.
SHIPPER = frozenset({"ship_to", "ship_node", "delete_after_ship", "ship_bandwidth", "ship_concurrency",
                     "ship_retry_max", "ship_signature_cores"})
#: The keys the collector reads (pipe handler, server): every one but the shipper's.
COLLECTOR = frozenset(f.name for f in fields(Config)) - SHIPPER - {"path"}


def parse(text: str, path: Optional[str] = None, problems: Optional[list] = None,
          keys: Optional[frozenset] = None) -> Config:
    """Parse a config; with ``problems`` a bad key is reported there and left at its default instead of raising.
    ``keys`` (COLLECTOR, SHIPPER): only those are read and checked, the other known keys left at their defaults
    unchecked (an unknown key is still reported)."""
    try:
        import tomllib  # type: ignore[import-not-found]
    except ImportError:  # Python < 3.11
        import tomli as tomllib  # type: ignore[no-redef]
    where = path or "config"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    defaults = Config()
    known = {f.name for f in fields(Config)} - {"path"}
    values = {}
    for name, value in data.items():
        if keys is not None and name in known and name not in keys:
            continue
        try:
            if name not in known:
                raise ConfigError(f"{where}: unknown key {name!r}")
            values[name] = _check(name, value, getattr(defaults, name))
            _validate(name, values[name], where)
        except ConfigError:
            if problems is None:
                raise
            problems.append(str(sys.exc_info()[1]))
            values.pop(name, None)
    return Config(**values, path=path)


def _validate(name: str, value: object, where: str) -> None:
    if name == "store" and not os.path.isabs(str(value)):
        raise ConfigError(f"{where}: store must be an absolute path")
    if name == "compression_level" and not 1 <= int(value) <= 22:  # type: ignore[call-overload]
        raise ConfigError(f"{where}: compression_level must be 1..22")
    if name in ("timeout", "backtrace_timeout", "notify_timeout", "record_field_max") and int(value) < 1:  # type: ignore[call-overload]
        raise ConfigError(f"{where}: {name} must be at least 1")
    if name in ("max_use", "keep_free", "records_max_use") and int(value) < -1:  # type: ignore[call-overload]
        raise ConfigError(f"{where}: {name} must be -1 (automatic), 0 (no limit) or a byte count")
    if name in ("concurrent_cores", "concurrent_postmortems") and int(value) < -1:  # type: ignore[call-overload]
        raise ConfigError(f"{where}: {name} must be -1 (one per CPU), 0 (no limit) or a number of handlers")
    if name == "notify_user" and str(value) in ("root", "0", "nobody", "65534"):
        raise ConfigError(f"{where}: notify_user must be an unprivileged account of its own, not {value!r}; "
                          "leave it out for a one-off uid")
    if name == "metrics_listen" and value:
        try:
            listen_address(str(value))
        except ValueError as exc:
            raise ConfigError(f"{where}: metrics_listen: {exc}") from None
    if name == "ship_to" and value:
        from corepipe.platform import objectstore

        try:
            objectstore.parse(str(value))
        except ValueError as exc:
            raise ConfigError(f"{where}: ship_to: {exc}") from None
    if name in ("ship_concurrency", "ship_retry_max") and int(value) < 1:  # type: ignore[call-overload]
        raise ConfigError(f"{where}: {name} must be at least 1")
    if name in _NOT_NEGATIVE and int(value) < 0:  # type: ignore[call-overload]
        raise ConfigError(f"{where}: {name} must not be negative")


_NOT_NEGATIVE = ("container_max_cores", "container_max_bytes", "max_core_size", "rate_limit_container",
                 "rate_limit_exe", "rate_limit_window", "max_age_days", "core_wait",
                 "postmortem_wait", "signature_max_cores", "signature_window", "metrics_max_signatures",
                 "notify_rate_limit", "notify_rate_window", "ship_bandwidth", "ship_signature_cores",
                 "remote_core_max")


def listen_address(text: str) -> tuple:
    """(host, port) from ``[HOST:]PORT`` (an IPv6 host in brackets); the host defaults to 127.0.0.1, port 0 is
    any free one."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) < 65536:
        raise ValueError(f"{text!r} is not [HOST:]PORT (a port is 0..65535)")
    return host, int(port)


def join_address(host: str, port: int) -> str:
    """``host:port``, an IPv6 host in brackets (as in a URL)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def load(path: Optional[str] = None, problems: Optional[list] = None, keys: Optional[frozenset] = None) -> Config:
    """Read the config; a missing file at the default path means the defaults (see ``parse`` for ``problems``
    and ``keys``)."""
    explicit = path is not None
    path = path or DEFAULT_PATH
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 20).decode("utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: no such file") from None
        return Config()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse(text, path, problems, keys)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


#: One line per key for the config install writes (``template``); tests/unit/test_config.py checks every key has one.
EXPLAIN = {
    "store": "Where cores and records are filed (a dedicated directory: 'uninstall --purge' deletes it).",
    "compression_level": "zstd level of the stored cores, 1 (fastest) to 22 (smallest).",
    "compression_threads": "zstd worker threads: 0 compresses in the handler's own thread, -1 picks a number.",
    "honour_core_limit": "Honour the crashed process's RLIMIT_CORE: 0 records without a core, N truncates at N bytes.",
    "timeout": "Seconds after which the whole handler gives up (a handler must never hang).",
    "proc_read_limit": "Most bytes read from any one /proc file of the crashed process (cmdline, environ, maps).",
    "env_keep": "Environment variables whose values are kept (a trailing * matches any rest; [\"*\"] keeps all).",
    "redact_env": "Kept variables whose names contain one of these (any case) are redacted all the same.",
    "redact_args": "Options and name=value pairs whose name has one of these words get their value masked.",
    "record_field_max": "Most bytes of any one text field of a record; longer ones are cut and listed in 'truncated'.",
    "binaries": "Keep the crashed executable and its libraries (by build-id) so that 'debug' works without the image.",
    "binaries_host": "Keep them for host processes too, not only for containers'.",
    "binaries_max_size": "Most bytes of binaries kept per crash.",
    "backtrace": "Take a backtrace with gdb or eu-stack once the core is stored, where one is installed.",
    "backtrace_timeout": "Seconds the backtrace may take.",
    "backtrace_max_core_size": "No backtrace for cores bigger than this many bytes.",
    "max_use": "Most bytes the store uses: -1 10% of its file system (at most 4 GiB), 0 no limit.",
    "keep_free": "Bytes the store leaves free on its file system: -1 15% (at most 4 GiB), 0 no limit.",
    "records_max_use": "Most bytes of records per policy group (beyond: counted, not recorded): -1 a tenth of "
                       "max_use (at most 256 MiB), 0 no limit.",
    "container_max_cores": "Most cores kept per container (host processes count as one); 0 no limit.",
    "container_max_bytes": "Most bytes of cores kept per container; 0 no limit.",
    "max_core_size": "Cores are truncated (and marked) at this many uncompressed bytes; 0 no limit.",
    "rate_limit_container": "Most cores per container within rate_limit_window (the rest: a record only); 0 no limit.",
    "rate_limit_exe": "Most cores per executable in a container within rate_limit_window; 0 no limit.",
    "rate_limit_window": "The rate limits' window, in seconds.",
    "concurrent_cores": "Handlers reading and storing a core at the same time, host-wide: -1 one per CPU, 0 no limit.",
    "concurrent_postmortems": "Handlers saving binaries and a backtrace at the same time: -1 one per CPU, 0 no limit.",
    "core_wait": "Seconds a handler waits for a core slot before it files a record without the core.",
    "postmortem_wait": "Seconds a handler waits for a postmortem slot before it goes on without one.",
    "signature_max_cores": "Cores kept of one crash signature within signature_window, per policy group; 0 no limit.",
    "signature_window": "The signature limit's window, in seconds.",
    "notify_command": "For each new signature, run this argv (no shell) with the record on stdin; [] no hook.",
    "notify_user": "The account of its own notify_command runs as; \"\": a one-off uid (never root or nobody).",
    "notify_timeout": "Seconds after which notify_command is killed.",
    "notify_rate_limit": "Most notifications per policy group in notify_rate_window (the rest counted); 0 no limit.",
    "notify_rate_window": "The notification rate limit's window, in seconds.",
    "metrics_max_signatures": "Signatures with a metrics label of their own (the most crashes); the rest are other.",
    "metrics_listen": "Where 'corepipe serve' serves Prometheus metrics, [HOST:]PORT (loopback if no HOST); \"\" none.",
    "exclude_executables": "Executables (shell-style patterns of the path) whose crashes get a record but no core.",
    "exclude_containers": "Containers (patterns of the name or id) whose crashes get a record but no core.",
    "exclude_images": "Images (patterns of the reference) whose containers' crashes get a record but no core.",
    "max_age_days": "'corepipe prune' deletes crashes older than this many days; 0 keeps them.",
    "ship_to": "Where 'corepipe ship' uploads crashes: az://CONTAINER/PREFIX or s3://BUCKET/PREFIX; \"\" nowhere.",
    "ship_node": "This node's name in the shipped objects' keys; \"\" the host name.",
    "delete_after_ship": "Delete a local crash once its upload is verified.",
    "ship_bandwidth": "Upload bandwidth cap in bytes per second; 0 none.",
    "ship_concurrency": "Parts uploaded at the same time.",
    "ship_retry_max": "Longest wait between upload retries, in seconds.",
    "ship_signature_cores": "Cores of a signature the fleet ships; later crashes ship the record only; 0 no budget.",
    "remote_core_max": "Most uncompressed bytes of a core 'extract'/'debug --remote' fetch (refused first); 0 no cap.",
}
#: The top of the config install writes.
HEADER = """\
# corepipe's configuration (TOML; every key: corepipe.toml(5), docs/configuration.md).
# Each commented line is a key at its default, with what it does above it: uncomment the line and change the
# value to override it; left commented, the key follows the defaults of the version installed.
# 'corepipe config check' checks this file and prints the settings in effect.
"""


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_quote(v) for v in value) + "]"
    return _quote(str(value))


def render(config: Config) -> str:
    """Every key with its value, one ``key = value`` line each: the settings in effect ('config check')."""
    return "".join(f"{f.name} = {_value(getattr(config, f.name))}\n" for f in fields(Config) if f.name != "path")


def template(store: str) -> str:
    """The config install writes: ``store`` set, every other key commented out at its default under a line saying
    what it does (as systemd writes coredump.conf), so that a later version's defaults apply to it."""
    defaults = Config()
    parts = [HEADER]
    for f in fields(Config):
        if f.name == "path":
            continue
        line = f"store = {_value(store)}" if f.name == "store" else f"#{f.name} = {_value(getattr(defaults, f.name))}"
        parts.append(f"\n# {EXPLAIN[f.name]}\n{line}\n")
    return "".join(parts)


_STORE_LINE = re.compile(r"^[ \t]*store[ \t]*=.*$", re.MULTILINE)


def with_store(text: str, store: str) -> str:
    """``text`` with its ``store`` key set to ``store`` and every other line as it was (a user's edits are kept)."""
    line = f"store = {_value(store)}"
    if _STORE_LINE.search(text):
        return _STORE_LINE.sub(lambda _match: line, text, count=1)
    return f"{line}\n{text}"


def installed_text(existing: Optional[str], store: str) -> str:
    """What install writes to the config: the template where there is none, or where it is what an earlier install
    wrote untouched (every key at its default, uncommented); otherwise the file as it is, its store set."""
    if existing is None:
        return template(store)
    try:
        current = parse(existing)
    except ConfigError:
        return with_store(existing, store)
    if existing == render(Config(store=current.store)):
        return template(store)
    return existing if current.store == store else with_store(existing, store)
