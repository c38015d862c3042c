"""What users met as tracebacks or as Python's ``None`` (issue 31): status on a garbled install state or as a
user who is not root, info and status on a crash recorded without a process. One clear line each, documented
exit codes."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
from support import need
from test_output import corepipe

from corepipe.cli import COMMANDS, main
from corepipe.domain import record
from corepipe.domain.containers import Container
from corepipe.platform.kernel import KernelArgs
from corepipe.platform.store import RECORD, Store
from corepipe.services import status

NOBODY = 65534


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f'store = "{tmp_path / "store"}"\n')
    return path


def _processless_crash(root: Path) -> str:
    """A crash as collect files it when the kernel's arguments were unusable: no pid, signal, uid or time."""
    container = Container(runtime="unknown")
    with Store(str(root)) as store:
        crash = store.new_crash(container.policy_group(0))
        rec = record.build(crash_id=crash.id, args=KernelArgs(), snapshot=None, container=container, redact_env=[])
        record.add_error(rec, "expected 12 kernel arguments (%P %p ...), got 0")
        record.finish(rec, failed=True, duration=0.01, cpu=0.01, peak_rss=1 << 20)
        crash.write(RECORD, record.dumps(rec))
        crash.close()
    return crash.id


@pytest.mark.parametrize("command", [["info"], ["status", "--config", "{c}"], ["list"]])
def test_a_crash_without_a_process_shows_no_none(config: Path, tmp_path: Path, command: list) -> None:
    crash_id = _processless_crash(tmp_path / "store")
    proc = corepipe(tmp_path, *[a.replace("{c}", str(config)) for a in command])
    text = proc.stdout.decode()
    assert proc.returncode in (0, 3) and b"Traceback" not in proc.stderr, proc.stderr
    assert "None" not in text and (crash_id in text or "failed" in text), text


@pytest.mark.parametrize("state, says", [
    ('{"schema": 1, "pattern": ', "cannot read the install state"),
    ("[1, 2]", "is not a corepipe install state"),
])
def test_status_on_a_garbled_install_state_is_broken(config: Path, tmp_path: Path, state: str, says: str) -> None:
    (tmp_path / "install.json").write_text(state)
    for args in ([], ["--json"]):
        proc = corepipe(tmp_path, "status", "--config", str(config), *args)
        assert proc.returncode == status.BROKEN and proc.stderr == b"", proc.stderr
    assert says in " ".join(json.loads(proc.stdout)["problems"])


def _as_nobody(args: list, out: Path) -> int:
    """``corepipe ARGS`` run in a child that dropped to uid and gid 65534 (corepipe is imported already: the
    interpreter's own files may not be readable to that user); stdout and stderr go to ``out``.{1,2}."""
    for name in COMMANDS.values():
        importlib.import_module(f"corepipe.commands.{name}")
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            fd1, fd2 = (os.open(f"{out}.{n}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) for n in (1, 2))
            os.dup2(fd1, 1)
            os.dup2(fd2, 2)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
            code = main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 98
        except BaseException:
            traceback.print_exc()  # shown by the test's assertion on stderr
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_status_as_a_user_who_is_not_root(tmp_path: Path) -> None:
    need(os.geteuid() == 0, "needs root to drop to another user")
    import tomllib  # noqa: F401 - loaded before the drop: config.py imports it when it reads the config

    work = Path(tempfile.mkdtemp(prefix="cpt-user-"))  # pytest's tmp_path is 0700: no one else gets in
    try:
        work.chmod(0o755)
        config, store, out = work / "c.toml", work / "store", tmp_path / "out"
        config.write_text(f'store = "{store}"\n')
        store.mkdir(mode=0o700)
        code = _as_nobody(["status", "--config", str(config)], out)
        stdout, stderr = Path(f"{out}.1").read_text(), Path(f"{out}.2").read_text()
        assert code == status.NOT_INSTALLED and stderr == "", (code, stderr)
        assert f"store: {store}: permission denied; run as root to see its crashes" in stdout.splitlines()
        state = work / "install.json"
        state.write_text("{}")
        state.chmod(0o600)  # as install writes it
        code = _as_nobody(["status", "--config", str(config)], out)
        stdout, stderr = Path(f"{out}.1").read_text(), Path(f"{out}.2").read_text()
        assert code == 1 and stdout == "" and stderr == (f"corepipe status: error: cannot read the install state "
                                                         f"{state}: permission denied; run as root\n")
    finally:
        shutil.rmtree(work)


#: A failure of each of the error classes a person can meet, raised where it happens and printed by cli alone:
#: (arguments after --config, the class, exit code, what the one line says).
ONE_LINE_FAILURES = [
    (["info", "0123456789ab"], "LookupFailed", 1, "no crash with id 0123456789ab"),
    (["list"], "ConfigError", 1, "unknown key 'bogus'; fix the config or pass --config"),
    (["extract", "-o", "{t}/out"], "CoreError", 1, "has no core"),
    (["info", "--node", "n1"], "UsageError", 2, "--node needs --remote URL"),
    (["uninstall", "--config", "{c}"], "InstallError", 1, "not installed"),
    (["fleet", "query", "--remote", "ftp://x/y", "SELECT 1"], "BadDestination", 2, "is not a destination"),
]


@pytest.mark.parametrize("args, kind, code, says", ONE_LINE_FAILURES, ids=[f[1] for f in ONE_LINE_FAILURES])
def test_every_user_error_is_one_line_from_cli(tmp_path: Path, args: list, kind: str, code: int, says: str) -> None:
    """The modules raise their own errors (all derived from platform/errors.UserError); the commands pass them
    through and cli.py prints each as ``corepipe COMMAND: error: LINE`` with the class's exit code."""
    config = tmp_path / "c.toml"
    config.write_text(f'store = "{tmp_path / "store"}"\n' + ('bogus = 1\n' if kind == "ConfigError" else ""))
    if kind == "CoreError":
        crash_id = _processless_crash(tmp_path / "store")
        args = [*args, crash_id]
    proc = corepipe(tmp_path, *[a.replace("{c}", str(config)).replace("{t}", str(tmp_path)) for a in args])
    lines = proc.stderr.decode().splitlines()
    assert proc.returncode == code and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"corepipe {args[0]}: error: ") and says in lines[0], lines


def test_the_error_classes_a_person_meets_derive_from_the_one_base() -> None:
    from corepipe.domain import catalog, fleet_sql
    from corepipe.platform import config, objectstore, sysctl, unpack
    from corepipe.platform.errors import UsageError, UserError
    from corepipe.services import install, selftest

    for cls in (catalog.LookupFailed, fleet_sql.QueryError, config.ConfigError, objectstore.DestinationError,
                objectstore.BadDestination, sysctl.SysctlError, unpack.CoreError, install.InstallError,
                selftest.SelftestError, UsageError):
        assert issubclass(cls, UserError), cls
    assert UserError("x").code == 1 and UsageError("x").code == 2 and UserError("x", 5).code == 5


def test_no_command_translates_an_error_by_hand() -> None:
    """A handler in commands/ that catches one of corepipe's errors only to raise ``UserError(str(exc))`` is the
    translation cli.py already does: that class should derive from UserError instead. (Python's own, OSError or
    ValueError, may be turned into a line where the command knows what it was doing.)"""
    import ast
    import builtins

    import corepipe.commands

    found = []
    for path in sorted(Path(corepipe.commands.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ExceptHandler) and node.name and len(node.body) == 1 and \
                    isinstance(node.body[0], ast.Raise) and isinstance(node.body[0].exc, ast.Call):
                call = node.body[0].exc
                message = call.args[0] if call.args else None
                bare = isinstance(message, ast.Call) and ast.unparse(message) == f"str({node.name})"
                bare |= isinstance(message, ast.JoinedStr) and ast.unparse(message) == f"f'{{{node.name}}}'"
                caught = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
                ours = [ast.unparse(c) for c in caught if ast.unparse(c).split(".")[-1] not in dir(builtins)]
                if bare and ours:
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(node.body[0])}")
    assert found == [], found
