"""What every command has in common on its command line: the one parent parser (``--config`` after the command's
name, as before it), the config read once per run, the install's paths, and ``with_store`` (borg's
``with_repository``) for the commands that work on the store."""

from __future__ import annotations

import argparse
import functools
import os
from typing import Callable, Optional

from corepipe.platform import config as configuration
from corepipe.platform.errors import UserError
from corepipe.platform.store import Store
from corepipe.services import install


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


def paths(ns: argparse.Namespace) -> install.Paths:
    """Where install put (or puts) the launcher, the config with its install state, and the sysctl drop-in."""
    defaults = install.Paths()
    return install.Paths(bin=getattr(ns, "bin", defaults.bin), config=getattr(ns, "config", None) or defaults.config,
                         sysctl_dir=getattr(ns, "sysctl_dir", defaults.sysctl_dir))


StoreRun = Callable[[argparse.Namespace, configuration.Config, Optional[Store]], int]


def with_store(run: StoreRun) -> Callable[[argparse.Namespace], int]:
    """A command's ``run(ns, cfg, store)`` given the config (read once) and the store it names, opened without
    creating it (None when it does not exist yet) and closed when ``run`` returns; a store that cannot be opened
    is one line."""

    @functools.wraps(run)
    def opened(ns: argparse.Namespace) -> int:
        cfg = config(ns)
        if not os.path.isdir(cfg.store):
            return run(ns, cfg, None)
        try:
            store = Store(cfg.store, create=False)
        except OSError as exc:
            raise UserError(f"cannot open the store {cfg.store}: {exc}; check it is a root-owned directory") from None
        with store:
            return run(ns, cfg, store)

    return opened
