import json

import pytest

from nodeagent.cli import main
from nodeagent.config import ConfigError, load_config, parse_duration


def test_defaults_file_and_env_precedence(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text("[queue]\nmax_pods = 8\n[models]\nkeep_alive = '10m'\n")
    loaded = load_config({"HOME": str(tmp_path), "AGENT_MACHINE_CONFIG": str(cfg),
                          "AGENT_MACHINE_MODELS_KEEP_ALIVE": "-1"})
    assert loaded.config.queue.max_pods == 8
    assert loaded.sources["queue.max_pods"] == f"file {cfg}"
    assert loaded.config.models.keep_alive == "-1"
    assert loaded.sources["models.keep_alive"] == "env AGENT_MACHINE_MODELS_KEEP_ALIVE"
    assert loaded.sources["cache.block_tokens"] == "default"


@pytest.mark.parametrize("text,needle", [
    ("[queue]\nmax_podz = 1\n", "queue.max_podz"),
    ("[queue]\nmax_pods = 0\n", "queue.max_pods"),
    ("[nosuch]\n", "nosuch"),
    ("[queue\n", "config file"),
])
def test_bad_config_names_the_setting(tmp_path, text, needle):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config({"HOME": str(tmp_path)}, path=cfg)


def test_env_value_is_validated_and_blamed(tmp_path):
    with pytest.raises(ConfigError, match="env AGENT_MACHINE_QUEUE_MAX_PODS"):
        load_config({"HOME": str(tmp_path), "AGENT_MACHINE_QUEUE_MAX_PODS": "many"})


def test_missing_named_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config({"HOME": str(tmp_path), "AGENT_MACHINE_CONFIG": str(tmp_path / "nope.toml")})


def test_durations():
    assert parse_duration("5m") == 300 and parse_duration("90s") == 90 and parse_duration("0") == 0
    assert parse_duration("-1") is None and parse_duration("250ms") == 0.25
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")


def test_config_show_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("AGENT_MACHINE_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("AGENT_MACHINE_QUEUE_MAX_PODS", "3")
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert "queue.max_pods" in out and "env AGENT_MACHINE_QUEUE_MAX_PODS" in out and "absent" in out
    assert main(["config", "show", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["values"]["queue"]["max_pods"] == 3
