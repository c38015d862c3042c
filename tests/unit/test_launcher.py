"""The kernel's launcher: runs without site, and the collect path imports stay lean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from corepipe import launcher


def _script(tmp_path: Path, body: str = "") -> Path:
    path = tmp_path / "corepipe"
    text = launcher.script()
    if body:
        text = text.replace("from corepipe.cli import main\nraise SystemExit(main())\n", body)
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_launcher_runs_without_site_or_environment(tmp_path: Path) -> None:
    script = _script(tmp_path)
    assert script.read_text().startswith(f"#!{sys.executable} -IS\n")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, env={})
    assert proc.returncode == 0 and "corepipe" in proc.stdout, proc.stderr


def test_collect_path_imports_stay_lean(tmp_path: Path) -> None:
    """The kernel's handler must not pay for zstandard's backend probe, argparse or psutil."""
    script = _script(tmp_path, "from corepipe.commands import collect_cmd\nfrom corepipe import compress\n"
                               "print(' '.join(sorted(sys.modules)))\n")
    loaded = set(subprocess.run([str(script)], capture_output=True, text=True, check=True, env={}).stdout.split())
    assert "corepipe.compress" in loaded and "zstandard.backend_c" in loaded
    unwanted = loaded & {"platform", "zstandard", "argparse", "psutil", "site"}
    assert not unwanted, unwanted
