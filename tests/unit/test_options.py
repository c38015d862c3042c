"""Every command's one parent parser (commands/options.py): ``--config`` works after any command's name as before
it (``corepipe list --config X`` as ``status --config X``), and the config is read once per run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_crash_commands import T0, add_crash

from corepipe.cli import COMMANDS, main
from corepipe.commands import options
from corepipe.domain.containers import Container


@pytest.mark.parametrize("command", [*COMMANDS, "config check"])
def test_every_command_takes_config_after_its_name(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as ended:
        main([*command.split(), "--help"])
    assert ended.value.code == 0 and "--config CONFIG" in capsys.readouterr().out


def test_config_after_the_name_is_the_one_used(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two configs, two stores: the --config after the command's name wins over one before it, for the commands
    that read the store (list, info, rm, prune) as for status."""
    stores = {}
    for name in ("a", "b"):
        stores[name] = tmp_path / f"store-{name}"
        (tmp_path / f"{name}.toml").write_text(f'store = "{stores[name]}"\n')
    _path, rec = add_crash(stores["b"], container=Container(runtime="host"), when=T0, comm="only-in-b", tmp=tmp_path)
    before, after = ["--config", str(tmp_path / "a.toml")], ["--config", str(tmp_path / "b.toml")]
    assert main([*before, "list", *after, "--json"]) == 0
    assert [r["comm"] for r in json.loads(capsys.readouterr().out)] == ["only-in-b"]
    assert main([*before, "info", *after, rec["id"]]) == 0 and "only-in-b" in capsys.readouterr().out
    assert main(["prune", *after, "--dry-run"]) == 0
    assert main(["rm", *after, rec["id"]]) == 0 and f"removed {rec['id']}" in capsys.readouterr().out
    assert main(["list", *after]) == 0 and "no crashes match" in capsys.readouterr().err


def test_the_config_is_read_once_per_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'store = "{tmp_path / "store"}"\n')
    reads = []
    real = options.configuration.load
    monkeypatch.setattr(options.configuration, "load", lambda path: reads.append(path) or real(path))
    _path, rec = add_crash(tmp_path / "store", container=Container(runtime="host"), when=T0, tmp=tmp_path)
    assert main(["info", "--config", str(config), rec["id"]]) == 0  # lookup, the store's path, the signature count
    assert reads == [str(config)]
