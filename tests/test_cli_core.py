import json
import subprocess
import sys

import argparse
import importlib

import pytest

from nodeagent.cli import COMMAND_MODULES, build_parser, main


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


@pytest.mark.parametrize("module", list(COMMAND_MODULES))
def test_command_table_names_what_each_module_registers(module):
    subparsers = argparse.ArgumentParser().add_subparsers()
    importlib.import_module(module).register(subparsers)
    assert tuple(subparsers.choices) == COMMAND_MODULES[module]


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(action.choices)


def test_a_known_command_registers_only_its_module_and_anything_else_gets_all():
    every = {command for commands in COMMAND_MODULES.values() for command in commands}
    assert _commands(build_parser("probe")) == {"probe", "doctor"}
    assert _commands(build_parser("receipts")) == {"key", "receipts"}
    for other in (None, "--help", "prob", "-h"):
        assert _commands(build_parser(other)) == every


def test_a_mistyped_command_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prob"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'prob'" in err and "receipts" in err and "doctor" in err


def test_contracts_export_writes_every_kind(tmp_path, capsys):
    assert main(["contracts", "export", str(tmp_path)]) == 0
    assert (tmp_path / "MachineProfile.schema.json").exists()
