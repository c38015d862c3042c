"""``corepipe config check``: exit 0 and the settings in effect for a valid file; exit 1 and one line per problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from corepipe.platform import config


def check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corepipe", *args], capture_output=True, text=True, timeout=60)


def settings(stdout: str) -> config.Config:
    """The printed settings, read back as a config."""
    return config.parse("".join(line + "\n" for line in stdout.splitlines() if not line.startswith("#")))


def test_a_valid_file_prints_the_settings_in_effect(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(config.template("/srv/cores").replace("#max_age_days = 30", "max_age_days = 7"))
    proc = check("config", "check", "--config", str(path))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith(f"# {path}: valid")
    assert settings(proc.stdout) == config.Config(store="/srv/cores", max_age_days=7)
    # --config before the command works too.
    assert check("--config", str(path), "config", "check").stdout == proc.stdout


def test_each_problem_is_one_line_and_exit_1(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('store = "/srv/cores"\ntimeout = 0\ncolour = "red"\nnotify_user = "root"\n')
    proc = check("config", "check", "--config", str(path))
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 3 and all(line.startswith("corepipe config check: ") for line in lines), proc.stderr
    assert "timeout must be at least 1" in lines[0] and "unknown key 'colour'" in lines[1] and "notify_user" in lines[2]
    # What the handler would use: the bad keys at their defaults, the good ones as given.
    assert settings(proc.stdout) == config.Config(store="/srv/cores")


def test_not_toml_missing_and_usage(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("store = [\n")
    proc = check("config", "check", "--config", str(path))
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1 and "every default" in proc.stderr
    assert settings(proc.stdout) == config.Config()
    proc = check("config", "check", "--config", str(tmp_path / "none.toml"))
    assert proc.returncode == 1 and "no such file" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert check("config").returncode == 2
    assert check("config", "fix").returncode == 2
