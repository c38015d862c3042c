"""The kernel's launcher: runs without site, and the collect path imports stay lean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from corepipe.platform import launcher


def _script(tmp_path: Path, body: str = "") -> Path:
    path = tmp_path / "corepipe"
    forward = str(tmp_path / "forward.sock")  # no server there: the handler collects (never a real server's)
    text = launcher.script(forward=forward)
    if body:
        text = text.replace(f"from corepipe.cli import main\nraise SystemExit(main(forward={forward!r}))\n",
                            body.replace("main()", f"main(forward={forward!r})"))
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_launcher_runs_without_site_or_environment(tmp_path: Path) -> None:
    script = _script(tmp_path)
    assert script.read_text().startswith(f"#!{sys.executable} -IS\n")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, env={})
    assert proc.returncode == 0 and "corepipe" in proc.stdout, proc.stderr


#: What may be loaded, beyond a bare ``python -IS``, when capture.py lets the kernel's pipe go.
BEFORE_RELEASE = {"__future__", "os", "os.path", "stat", "_stat", "posixpath", "genericpath", "_collections_abc",
                  "fcntl", "select", "mmap", "corepipe", "corepipe.cli", "corepipe.commands",
                  "corepipe.commands.collect_cmd", "corepipe.platform", "corepipe.platform.capture",
                  "corepipe.platform.procfs", "corepipe.platform.memread", "_socket", "corepipe.platform.forward"}


def test_only_os_is_loaded_when_a_small_core_releases_the_kernel(tmp_path: Path) -> None:
    """The real ``collect`` entry point, with a spy on capture.release: the crashed process is let go
    before config, containers, compression, json or typing are imported."""
    spy = ("import sys\nfrom corepipe.platform import capture\nreal = capture.release\n"
           "def spy(fd):\n    real(fd)\n    print(' '.join(sorted(sys.modules)), flush=True)\n"
           "capture.release = spy\nfrom corepipe.cli import main\nraise SystemExit(main())\n")
    script = _script(tmp_path, spy)
    (tmp_path / "c.toml").write_text(f'store = "{tmp_path / "store"}"\n')
    (tmp_path / "core").write_bytes(b"\x7fELF" + bytes(100_000))
    child = subprocess.Popen(["sleep", "30"])
    pid = str(child.pid)
    try:
        with open(tmp_path / "core", "rb") as stdin:
            proc = subprocess.run([str(script), "collect", "--config", str(tmp_path / "c.toml"), pid, pid, pid,
                                   "0", "0", "11", "1700000000", "18446744073709551615", "1", "-", "box", "c"],
                                  stdin=stdin, capture_output=True, text=True, env={}, cwd="/", timeout=60)
    finally:
        child.kill()
        child.wait()
    assert proc.returncode == 0, proc.stderr
    [at_release] = proc.stdout.splitlines()  # released once, by capture.py (the collector saw it was done)
    bare = subprocess.run([sys.executable, "-IS", "-c", "import sys; print(' '.join(sys.modules))"],
                          capture_output=True, text=True, check=True, env={}).stdout.split()
    extra = set(at_release.split()) - set(bare)
    assert "corepipe.platform.capture" in extra and not extra - BEFORE_RELEASE, extra - BEFORE_RELEASE
    assert list((tmp_path / "store").rglob("core.zst")), "the core was not stored"


def test_collect_path_imports_stay_lean(tmp_path: Path) -> None:
    """The kernel's handler must not pay for zstandard's backend probe, argparse or psutil."""
    script = _script(tmp_path, "from corepipe.services import collect\nfrom corepipe.platform import compress\n"
                               "print(' '.join(sorted(sys.modules)))\n")
    loaded = set(subprocess.run([str(script)], capture_output=True, text=True, check=True, env={}).stdout.split())
    assert "corepipe.platform.compress" in loaded and "zstandard.backend_c" in loaded
    unwanted = loaded & {"platform", "zstandard", "argparse", "psutil", "site"}
    assert not unwanted, unwanted
