"""What every command prints is safe for a terminal (issue 14, item 6) and a closed pipe ends it quietly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import wait_for
from test_crash_commands import T0, add_crash

from corepipe.domain.containers import Container
from corepipe.platform.log import clean

#: A comm with an OSC title sequence, a bell and a byte that is not UTF-8 (Python keeps it as a lone surrogate).
HOSTILE = "x\x1b]0;owned\x07\udcff"
ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}  # strict: no surrogates pass


def corepipe(tmp_path: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corepipe", "--config", str(tmp_path / "c.toml"), *args],
                          input=stdin, capture_output=True, env=ENV, timeout=60)


@pytest.fixture
def hostile_store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    (tmp_path / "c.toml").write_text(f'store = "{root}"\n')
    container = Container(runtime="docker", id="c" * 64, name="web\x1b[2J", image="img\x1b[31m:1")
    add_crash(root, container=container, when=T0, comm=HOSTILE, exe="/srv/\x1b[1mapp", tmp=tmp_path)
    return root


@pytest.mark.parametrize("command", [["status", "--config", "{c}"], ["list"], ["info"], ["list", "--json"],
                                     ["info", "--json"], ["status", "--config", "{c}", "--json"]])
def test_no_control_characters_reach_the_terminal(hostile_store: Path, tmp_path: Path, command: list) -> None:
    args = [a.replace("{c}", str(tmp_path / "c.toml")) for a in command]
    proc = corepipe(tmp_path, *args)
    assert b"Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 3), proc.stderr  # status: 3, not installed
    text = proc.stdout.decode("utf-8")  # strict: valid UTF-8
    assert not any(ord(c) < 32 and c not in "\n\t" or ord(c) == 0x7f for c in text), text
    assert "owned" in text, text  # the hostile comm is shown, made harmless (not left out)
    assert "--json" not in args or "x\\u001b" in text, text


def test_resolve_cleans_names(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(f'store = "{tmp_path / "store"}"\n')
    cgroup = tmp_path / "cgroup"
    cgroup.write_bytes(b"0::/system.slice/evil\x1b]0;owned\x07\xff.service\n")
    proc = corepipe(tmp_path, "resolve", "--cgroup-file", str(cgroup))
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr
    assert b"\x1b" not in proc.stdout and b"\x07" not in proc.stdout and b"evil?]0;owned?" in proc.stdout


def test_resolve_pid_cleans_comm(tmp_path: Path) -> None:
    """A live process whose comm carries an escape sequence (``resolve PID`` reads its /proc)."""
    (tmp_path / "c.toml").write_text(f'store = "{tmp_path / "store"}"\n')
    link = os.path.join(os.fsencode(tmp_path), b"s\x1b[2J\xff")
    os.symlink(b"/bin/sleep", link)  # the comm is the name it was run by
    child = subprocess.Popen([link, "60"])
    try:
        wait_for(lambda: Path(f"/proc/{child.pid}/comm").read_bytes().startswith(b"s\x1b"), 10, "the exec")
        proc = corepipe(tmp_path, "resolve", str(child.pid))
    finally:
        child.kill()
        child.wait()
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr
    assert b"\x1b" not in proc.stdout


def test_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    root = tmp_path / "store"
    (tmp_path / "c.toml").write_text(f'store = "{root}"\n')
    for i in range(200):  # far more output than a pipe holds
        add_crash(root, container=Container(runtime="host"), when=T0 + i, tmp=tmp_path)
    for args in (["list", "--json"], ["list"], ["info", "--json"], ["status", "--config", str(tmp_path / "c.toml")]):
        proc = subprocess.Popen([sys.executable, "-m", "corepipe", "--config", str(tmp_path / "c.toml"), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
        assert proc.stdout.read(10)  # like `| head -c 10`: some output, then the reader is gone
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(60) in (0, 3, 141) and err == b"", (args, err)  # 0 (3: status): it all fitted
    # The README's own example: `corepipe list --json | head -1` prints "[" and the list ends with 141.
    lister = subprocess.Popen([sys.executable, "-m", "corepipe", "--config", str(tmp_path / "c.toml"), "list",
                               "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    head = subprocess.run(["head", "-1"], stdin=lister.stdout, capture_output=True, timeout=60)
    lister.stdout.close()
    assert head.stdout == b"[\n" and lister.wait(60) == 141 and lister.stderr.read() == b""


@pytest.mark.parametrize("text, keep, cleaned", [
    ("plain text", "", "plain text"),
    ("two\nlines\tand a tab", "\n\t", "two\nlines\tand a tab"),
    ("two\nlines", "", "two?lines"),
    ("x\x1b[2J\ny\x07", "\n\t", "x?[2J\ny?"),
    (HOSTILE, "\n", "x?]0;owned??"),
    ("caf\u00e9 \u2028", "\n", "caf\u00e9 ?"),  # a line separator is not printable
])
def test_clean_keeps_only_printable_text(text: str, keep: str, cleaned: str) -> None:
    assert clean(text, len(text), keep) == cleaned


def test_list_json_is_one_record_per_line(hostile_store: Path, tmp_path: Path) -> None:
    """Compact lines (fast to write, `head -1` works), the hostile strings escaped, valid JSON as a whole."""
    add_crash(hostile_store, container=Container(runtime="host"), when=T0 + 1, comm="del\x7f", tmp=tmp_path)
    proc = corepipe(tmp_path, "list", "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode("ascii").split("\n")
    assert lines[0] == "[" and lines[-2:] == ["]", ""] and len(lines) == 5
    records = json.loads(proc.stdout)
    assert [json.loads(line.rstrip(",")) for line in lines[1:3]] == records
    assert records[0]["comm"] == HOSTILE and "\\u001b]0;owned\\u0007\\udcff" in lines[1]
    assert records[1]["comm"] == "del\x7f"  # escaped by json (ensure_ascii), not turned into "?" by the filter
