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
