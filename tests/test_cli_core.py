import json
import subprocess
import sys

from nodeagent.cli import main


def test_version_json(capsys):
    assert main(["version", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["apiVersion"] == "agent-machine/v1"


def test_paths_table_and_json(capsys, monkeypatch):
    monkeypatch.setenv("AGENT_MACHINE_STATE_DIR", "/srv/am-state")
    assert main(["paths"]) == 0
    out = capsys.readouterr().out
    assert "/srv/am-state" in out and "env AGENT_MACHINE_STATE_DIR" in out
    assert main(["paths", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "/srv/am-state"


def test_bad_scope_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setenv("AGENT_MACHINE_SCOPE", "nope")
    assert main(["paths"]) == 2
    assert "AGENT_MACHINE_SCOPE" in capsys.readouterr().err


def test_console_script_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "nodeagent.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("probe", "doctor", "paths", "contracts"):
        assert command in out


def test_contracts_export_writes_every_kind(tmp_path, capsys):
    assert main(["contracts", "export", str(tmp_path)]) == 0
    assert (tmp_path / "MachineProfile.schema.json").exists()
