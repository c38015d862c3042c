"""The command corepipe names for a missing extra: one that works for the way it was installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support import HERE

from corepipe.platform import extras


def test_an_install_sh_installation_is_told_to_run_install_sh_with_the_extra(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    (checkout / "install").mkdir(parents=True)
    (checkout / "install" / "install.sh").write_text("")
    record = tmp_path / "venv" / extras.CHECKOUT_RECORD
    record.parent.mkdir(parents=True)
    record.write_text(f"{checkout}\n")
    assert extras.install_command("s3", str(tmp_path / "venv")) == f"bash {checkout}/install/install.sh --with s3"
    # The checkout is gone: the extra's own requirements, with this interpreter's pip.
    (checkout / "install" / "install.sh").unlink()
    assert extras.install_command("s3", str(tmp_path / "venv")).startswith(f"{sys.executable} -m pip install ")


def test_any_other_installation_is_told_to_pip_install_the_requirements(tmp_path: Path) -> None:
    command = extras.install_command("metrics", str(tmp_path))
    assert command == f"{sys.executable} -m pip install 'prometheus-client>=0.20'"
    assert extras.requirements("azure") == ["azure-storage-blob>=12.19", "azure-identity>=1.15"]


def test_the_named_command_installs_the_extra(tmp_path: Path) -> None:
    """A virtualenv with corepipe and no extra: 'metrics' names a command; run as given, it makes 'metrics' work."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "zstandard", "xxhash"], check=True, capture_output=True, timeout=600)
    subprocess.run([*pip, "--no-deps", str(HERE.parent)], check=True, capture_output=True, timeout=600)
    (tmp_path / "c.toml").write_text(f'store = "{tmp_path}/store"\n')
    metrics = [str(venv / "bin" / "corepipe"), "--config", str(tmp_path / "c.toml"), "metrics"]
    proc = subprocess.run(metrics, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1, proc.stderr
    command = proc.stderr.split("install it with: ")[1].strip()
    assert command == f"{venv}/bin/python -m pip install 'prometheus-client>=0.20'"
    subprocess.run(command, shell=True, check=True, capture_output=True, timeout=600)
    proc = subprocess.run(metrics, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "corepipe_" in proc.stdout, proc.stderr
