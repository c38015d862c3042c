"""One configuration file, ``/etc/corepipe/config.toml``; every key has a default that works without it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Optional

DEFAULT_PATH = "/etc/corepipe/config.toml"
DEFAULT_STORE = "/var/lib/corepipe"


class ConfigError(Exception):
    """The file exists but cannot be used; the message says which key or line."""


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
    #: Environment variables whose names contain one of these (case-insensitive) are stored as "<redacted>".
    redact_env: list = field(default_factory=lambda: ["PASSWORD", "PASSWD", "SECRET", "TOKEN", "KEY",
                                                       "CREDENTIAL", "AUTH", "COOKIE", "SESSION"])
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


def parse(text: str, path: Optional[str] = None) -> Config:
    try:
        import tomllib  # type: ignore[import-not-found]
    except ImportError:  # Python < 3.11
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None
    defaults = Config()
    known = {f.name for f in fields(Config)} - {"path"}
    values = {}
    for name, value in data.items():
        if name not in known:
            raise ConfigError(f"{path or 'config'}: unknown key {name!r}")
        values[name] = _check(name, value, getattr(defaults, name))
    config = Config(**values, path=path)
    if not os.path.isabs(config.store):
        raise ConfigError(f"{path or 'config'}: store must be an absolute path")
    if not 1 <= config.compression_level <= 22:
        raise ConfigError(f"{path or 'config'}: compression_level must be 1..22")
    if config.timeout < 1:
        raise ConfigError(f"{path or 'config'}: timeout must be at least 1")
    return config


def load(path: Optional[str] = None) -> Config:
    """Read the config; a missing file at the default path means the defaults."""
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
    return parse(text, path)


def render(config: Config) -> str:
    """The TOML text for a config (used by install)."""
    lines = []
    for f in fields(Config):
        if f.name == "path":
            continue
        value = getattr(config, f.name)
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int):
            text = str(value)
        elif isinstance(value, list):
            text = "[" + ", ".join(_quote(v) for v in value) + "]"
        else:
            text = _quote(value)
        lines.append(f"{f.name} = {text}")
    return "\n".join(lines) + "\n"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
