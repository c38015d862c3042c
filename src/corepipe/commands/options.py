"""What every command has in common on its command line: the one parent parser (``--config`` after the command's
name, as before it), the config read once per run, and the install's paths."""

from __future__ import annotations

import argparse

from corepipe.platform import config as configuration


def parent() -> argparse.ArgumentParser:
    """The parent parser every command's parser is made with: its options are taken after the command's name.
    ``--config``'s SUPPRESS keeps a ``corepipe --config X COMMAND`` given before it."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS,
                        help=f"config file; the install state lives beside it (default {configuration.DEFAULT_PATH})")
    return common


def config(ns: argparse.Namespace) -> configuration.Config:
    """The config ``--config`` names (else the default), read once per run; ConfigError says what is wrong."""
    cfg = getattr(ns, "loaded_config", None)
    if cfg is None:
        cfg = ns.loaded_config = configuration.load(getattr(ns, "config", None))
    return cfg


def paths(ns: argparse.Namespace):  # -> install.Paths; imported here, so other commands do not pay for it
    """Where install put (or puts) the launcher, the config with its install state, and the sysctl drop-in."""
    from corepipe.services import install

    defaults = install.Paths()
    return install.Paths(bin=getattr(ns, "bin", defaults.bin), config=getattr(ns, "config", None) or defaults.config,
                         sysctl_dir=getattr(ns, "sysctl_dir", defaults.sysctl_dir))
