"""The command that installs an optional extra (metrics, azure, s3, fleet), for the way this corepipe was installed.

corepipe is on no package index, so ``pip install 'corepipe[s3]'`` fails: an installation made by install.sh is
told to run install.sh again with ``--with`` (its virtualenv records the checkout in share/corepipe/checkout, and
install.sh keeps the extra on later upgrades); any other is told to install the extra's own requirements, which
are on PyPI, with its own interpreter's pip.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from typing import Optional

#: Where install.sh records the checkout it installed from, in the virtualenv.
CHECKOUT_RECORD = os.path.join("share", "corepipe", "checkout")


def install_command(extra: str, prefix: Optional[str] = None) -> str:
    """A shell command that installs ``extra`` into the environment running now (``prefix``: the virtualenv of this
    interpreter; not sys.prefix, which the launcher's ``python -S`` leaves at the base installation's)."""
    prefix = os.path.dirname(os.path.dirname(sys.executable)) if prefix is None else prefix
    try:
        with open(os.path.join(prefix, CHECKOUT_RECORD)) as f:
            checkout = f.read(4096).strip()
    except OSError:
        checkout = ""
    install_sh = os.path.join(checkout, "install", "install.sh")
    if checkout and os.path.isfile(install_sh):
        return f"bash {shlex.quote(install_sh)} --with {extra}"
    return " ".join([shlex.quote(sys.executable), "-m", "pip", "install", *map(shlex.quote, requirements(extra))])


def requirements(extra: str) -> list:
    """The requirements the package declares for ``extra`` (its metadata), without the extra's marker."""
    from importlib import metadata

    found = []
    for requirement in metadata.requires("corepipe") or []:
        spec, _, marker = requirement.partition(";")
        if re.search(r"""extra\s*==\s*["']""" + re.escape(extra) + """["']""", marker):
            found.append(spec.strip().replace(" ", ""))
    return found


def missing(extra: str, module: str) -> str:
    """What is needed, for a message saying that something needs an extra whose ``module`` cannot be imported."""
    return f"the '{extra}' extra ({module} is missing); install it with: {install_command(extra)}"
