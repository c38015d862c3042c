"""The README's two commands run as written (issue 14's test gap): as root as they are; as another user they
re-run through sudo, or, where there is no sudo, say in one line to run them as root."""

from __future__ import annotations

import os
import shutil
import subprocess

from support import HERE, need

REPO = HERE.parent


def test_tests_run_as_root_keeps_strict_mode(tmp_path) -> None:
    """A probe test whose requirement is missing fails through ``tests/run`` in strict mode, and only skips
    without it: the README's test command keeps COREPIPE_TEST_STRICT all the way to need()."""
    need(os.geteuid() == 0, "needs root (the README's command as root)")
    probe = tmp_path / "test_probe.py"
    probe.write_text("from support import need\n\n\ndef test_probe() -> None:\n"
                     "    need(False, 'a requirement this probe never has')\n")

    def run(strict: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "tests/run", "-q", "-p", "no:cacheprovider", str(probe)],
                              cwd=REPO, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "COREPIPE_TEST_STRICT": strict,
                                   "PYTHONPATH": str(REPO / "tests")})
    strict = run("1")
    assert strict.returncode == 1 and "1 failed" in strict.stdout, strict.stdout[-2000:] + strict.stderr[-2000:]
    assert "COREPIPE_TEST_STRICT=1 and a requirement is missing: a requirement this probe never has" in strict.stdout
    lenient = run("")
    assert lenient.returncode == 0 and "1 skipped" in lenient.stdout, lenient.stdout[-2000:] + lenient.stderr[-2000:]


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
