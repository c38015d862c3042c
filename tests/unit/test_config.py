from __future__ import annotations

from dataclasses import fields

import pytest

from corepipe.platform import config


def test_defaults_without_a_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    assert config.load(None) == config.Config()


def test_explicit_missing_file_is_an_error(tmp_path) -> None:
    with pytest.raises(config.ConfigError, match="no such file"):
        config.load(str(tmp_path / "none.toml"))


def test_round_trip_through_render(tmp_path) -> None:
    original = config.Config(store="/srv/cores", compression_level=7, honour_core_limit=False)
    path = tmp_path / "c.toml"
    path.write_text(config.render(original))
    loaded = config.load(str(path))
    assert loaded.store == "/srv/cores" and loaded.compression_level == 7 and loaded.honour_core_limit is False
    assert loaded.redact_env == original.redact_env


@pytest.mark.parametrize("text,message", [
    ("store = 'relative'", "absolute"),
    ("compression_level = 99", "1..22"),
    ("timeout = 0", "at least 1"),
    ("honour_core_limit = 1", "must be bool"),
    ("nope = 1", "unknown key"),
    ("store = [", "c.toml"),
    ("concurrent_cores = -2", "one per CPU"),
    ("concurrent_postmortems = -5", "one per CPU"),
    ("core_wait = -1", "must not be negative"),
])
def test_invalid_values_are_refused(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match=message):
        config.load(str(path))


def test_lenient_parse_keeps_good_keys() -> None:
    problems: list = []
    cfg = config.parse('store = "/srv/x"\ntimeout = -1\n', "c.toml", problems)
    assert cfg.store == "/srv/x" and cfg.timeout == config.Config().timeout
    assert problems == ["c.toml: timeout must be at least 1"]


def test_signature_metrics_and_notify_keys() -> None:
    cfg = config.parse('signature_max_cores = 3\nsignature_window = 60\nmetrics_max_signatures = 5\n'
                       'notify_command = ["/usr/local/bin/page", "--team", "x"]\nnotify_user = "alerts"\n')
    assert (cfg.signature_max_cores, cfg.signature_window, cfg.metrics_max_signatures) == (3, 60, 5)
    assert cfg.notify_command == ["/usr/local/bin/page", "--team", "x"] and cfg.notify_user == "alerts"
    for bad in ('notify_user = "root"', 'notify_user = "0"', 'notify_user = "nobody"', "notify_timeout = 0",
                "signature_max_cores = -1", "notify_rate_limit = -1"):
        problems: list = []
        assert config.parse(bad, problems=problems) == config.Config() and len(problems) == 1, bad


def test_metrics_listen_is_loopback_by_default_and_checked() -> None:
    assert config.listen_address(config.Config().metrics_listen) == ("127.0.0.1", 19839)
    assert config.listen_address("9000") == ("127.0.0.1", 9000)
    assert config.listen_address("[::1]:0") == ("::1", 0)
    assert config.join_address("::1", 80) == "[::1]:80" and config.join_address("127.0.0.1", 80) == "127.0.0.1:80"
    assert config.listen_address("0.0.0.0:80") == ("0.0.0.0", 80)
    assert config.parse('metrics_listen = ""\n').metrics_listen == ""
    for bad in ('metrics_listen = "127.0.0.1:http"', 'metrics_listen = "70000"', 'metrics_listen = "a:-1"'):
        problems: list = []
        assert config.parse(bad, problems=problems) == config.Config(), bad
        assert len(problems) == 1 and "metrics_listen: " in problems[0] and "is not [HOST:]PORT" in problems[0]
    assert config.is_loopback("127.0.0.1") and config.is_loopback("::1") and not config.is_loopback("0.0.0.0")


def test_exclusion_patterns() -> None:
    cfg = config.parse('exclude_executables = ["*/chrome"]\nexclude_images = ["debug/*", "x:1"]\n', "c.toml")
    assert cfg.exclude_executables == ["*/chrome"] and cfg.exclude_images == ["debug/*", "x:1"]
    assert cfg.exclude_containers == [] and config.Config().exclude_executables == []
    with pytest.raises(config.ConfigError, match="exclude_containers must be list"):
        config.parse('exclude_containers = "web-*"', "c.toml")


def test_every_key_has_a_one_line_explanation() -> None:
    keys = {f.name for f in fields(config.Config)} - {"path"}
    assert set(config.EXPLAIN) == keys
    assert all("\n" not in text and text.endswith(".") for text in config.EXPLAIN.values())


def test_the_installed_config_sets_only_the_store() -> None:
    """As systemd writes coredump.conf: every other key commented out at its default, under what it does."""
    text = config.template("/srv/cores")
    assert config.parse(text) == config.Config(store="/srv/cores")
    lines = text.splitlines()
    assert [line for line in lines if line and not line.startswith("#")] == ['store = "/srv/cores"']
    defaults = config.render(config.Config()).splitlines()
    for line in defaults[1:]:  # the store is the first key
        at = lines.index(f"#{line}")
        assert lines[at - 1] == f"# {config.EXPLAIN[line.split(' = ')[0]]}"
    # Uncommenting a line overrides that key only.
    edited = text.replace("#compression_level = 3", "compression_level = 9")
    assert config.parse(edited) == config.Config(store="/srv/cores", compression_level=9)


def test_install_keeps_a_users_config_but_for_its_store() -> None:
    assert config.installed_text(None, "/srv/a") == config.template("/srv/a")
    mine = '# mine\nstore = "/srv/a"\ncompression_level = 9  # smaller\n'
    assert config.installed_text(mine, "/srv/a") == mine
    assert config.installed_text(mine, "/srv/b") == '# mine\nstore = "/srv/b"\ncompression_level = 9  # smaller\n'
    assert config.installed_text("timeout = 5\n", "/srv/b") == 'store = "/srv/b"\ntimeout = 5\n'
    # What an earlier install wrote (every key uncommented, at its default) becomes the commented template...
    assert config.installed_text(config.render(config.Config(store="/srv/a")), "/srv/a") == config.template("/srv/a")
    # ...but not once a value differs from the defaults: that is a user's edit.
    edited = config.render(config.Config(store="/srv/a", max_age_days=7))
    assert config.installed_text(edited, "/srv/a") == edited
