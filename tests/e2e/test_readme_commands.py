"""The README's two commands run as written (issue 14's test gap): as root as they are; as another user they
re-run through sudo, or, where there is no sudo, say in one line to run them as root."""

from __future__ import annotations

import os
import shutil
import subprocess

from support import HERE, need

REPO = HERE.parent


def test_tests_run_as_root_keeps_strict_mode() -> None:
    need(os.geteuid() == 0, "needs root (the README's command as root)")
    proc = subprocess.run(["bash", "tests/run", "-q", "-p", "no:cacheprovider", "tests/unit/test_layers.py"],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "COREPIPE_TEST_STRICT": "1"})
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_as_another_user_both_commands_go_through_sudo_or_say_run_as_root() -> None:
    """As nobody: with no sudo on the host, one line saying to run as root; with sudo, the command is sudo's
    (which, without a password or a terminal for nobody, refuses: the re-run was attempted)."""
    need(os.geteuid() == 0, "needs root to run the commands as nobody")
    has_sudo = shutil.which("sudo") is not None
    for command in (["bash", "tests/run"], ["bash", "install/install.sh"]):
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command], cwd=REPO,
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert proc.returncode == 1, (command, proc.stdout, proc.stderr)
        if has_sudo:
            assert "sudo" in proc.stderr, (command, proc.stderr)
        else:
            assert "run as root" in proc.stderr and proc.stderr.count("\n") == 1, (command, proc.stderr)


def test_install_sh_refuses_an_unknown_extra_before_changing_anything(tmp_path) -> None:
    need(os.geteuid() == 0, "needs root (install.sh as the README runs it)")
    env = {**os.environ, "COREPIPE_PREFIX": f"{tmp_path}/v", "COREPIPE_BIN": f"{tmp_path}/b",
           "COREPIPE_CONFIG": f"{tmp_path}/c.toml"}
    proc = subprocess.run(["bash", "install/install.sh", "--with", "s3,gcs"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--with gcs" in proc.stderr and "metrics azure s3" in proc.stderr
    assert list(tmp_path.iterdir()) == []
