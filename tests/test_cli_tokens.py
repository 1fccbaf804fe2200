"""`agent-machine tokens issue|ls|revoke` against a real credentials file, and what the API makes of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nodeagent.cli import main
from nodeagent.credentials import CredentialSet, read

from test_api_harness import env_for


@pytest.fixture()
def env(tmp_path, monkeypatch):
    for name, value in env_for(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AGENT_MACHINE_API_CREDENTIALS_FILE", raising=False)
    return tmp_path / "cfg" / "credentials.toml"


def run_json(capsys, *argv: str):
    code = main([*argv, "--format", "json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_issue_prints_the_token_once_and_keeps_its_hash_in_a_private_file(env, capsys):
    issued = run_json(capsys, "tokens", "issue", "--tenant", "acme", "--agent", "coder", "--scope", "private")
    assert issued["token"].startswith("amt_") and issued["file"] == str(env)
    assert (issued["tenant"], issued["agents"], issued["scopes"]) == ("acme", ["coder"], ["private"])
    assert os.stat(env).st_mode & 0o777 == 0o600
    assert issued["token"] not in env.read_text()
    credential = CredentialSet.open(env).resolve(issued["token"])
    assert (credential.id, credential.tenant, credential.agents) == (issued["id"], "acme", ("coder",))
    listed = run_json(capsys, "tokens", "ls")
    assert [c["id"] for c in listed] == [issued["id"]]
    assert "token" not in listed[0] and issued["token"] not in json.dumps(listed)


def test_the_table_output_shows_the_token_and_says_it_is_shown_once(env, capsys):
    assert main(["tokens", "issue", "--tenant", "acme", "--id", "acme-ci"]) == 0
    out = capsys.readouterr().out
    token = out.splitlines()[0]
    assert token.startswith("amt_") and "only time the token is shown" in out
    assert CredentialSet.open(env).resolve(token).id == "acme-ci"
    assert main(["tokens", "ls"]) == 0
    assert "acme-ci" in capsys.readouterr().out


def test_revoke_keeps_the_record_and_refuses_the_token(env, capsys):
    issued = run_json(capsys, "tokens", "issue", "--tenant", "acme")
    credentials = CredentialSet.open(env)
    assert credentials.resolve(issued["token"]) is not None
    revoked = run_json(capsys, "tokens", "revoke", issued["id"])
    assert revoked["revokedAt"]
    assert credentials.resolve(issued["token"]) is None  # the same set re-reads the changed file
    assert [c.revoked for c in read(env)] == [True]


@pytest.mark.parametrize("argv,message,code", [
    (["tokens", "issue", "--tenant", "Acme Corp"], "tenant: 'Acme Corp' is not a valid tenant name", 1),
    (["tokens", "issue", "--tenant", "acme", "--id", "Bad Id"], "id: 'Bad Id'", 1),
    (["tokens", "issue", "--admin", "--agent", "coder"], "--agent and --scope limit tenant tokens", 2),
    (["tokens", "revoke", "nope"], "no credential with id 'nope'", 1),
])
def test_bad_requests_are_one_line_errors(env, capsys, argv, message, code):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not env.exists() or read(env) == []


def test_an_id_in_use_is_refused(env, capsys):
    run_json(capsys, "tokens", "issue", "--tenant", "acme", "--id", "one")
    assert main(["tokens", "issue", "--tenant", "other", "--id", "one"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert [c.tenant for c in read(env)] == ["acme"]


def test_concurrent_issuers_lose_no_entry(env):
    script = ("import sys; from nodeagent.credentials import issue; from pathlib import Path; "
              "[issue(Path(sys.argv[1]), tenant='t%d' % i) for i in range(5)]")
    workers = [subprocess.Popen([sys.executable, "-c", script, str(env)]) for _ in range(4)]
    assert all(worker.wait(timeout=60) == 0 for worker in workers)
    assert len(read(env)) == 20


def test_help_has_examples():
    out = subprocess.run([sys.executable, "-m", "nodeagent.cli", "tokens", "issue", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "examples:" in out and "--tenant acme" in out
