"""`agent-machine cache ls|stats|evict|pin` over a real index and tier directories."""

import json
import os

import pytest

from nodeagent.cli import main
from nodeagent.config import load_config
from nodeagent.kvcache.blocks import Namespace
from nodeagent.kvcache.manager import open_from_config

NS = Namespace("sha256:" + "f" * 64, "tenant", "acme")


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENT_MACHINE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("AGENT_MACHINE_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("AGENT_MACHINE_CACHE_RAM_DIR", str(tmp_path / "ram"))
    return tmp_path


def _put(n_tokens, first=0):
    cm = open_from_config(load_config())
    path = cm.staging_path()
    path.write_bytes(os.urandom(1000))
    return cm.put(path, [first] + list(range(n_tokens - 1)), NS, state_format="llama_cpp_python")


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_ls_stats_pin_and_evict(env, capsys):
    a, b = _put(200), _put(200, first=1)
    code, out, _ = run(capsys, "cache", "ls", "--format", "json")
    assert code == 0 and {e["id"] for e in json.loads(out)} == {a.id, b.id}
    code, out, _ = run(capsys, "cache", "ls")
    assert a.id[:12] in out and "acme" in out
    code, out, _ = run(capsys, "cache", "stats", "--format", "json")
    stats = json.loads(out)
    assert stats["stored"] == 2 and stats["tiers"][0]["usedBytes"] == 2000
    assert run(capsys, "cache", "pin", a.id[:8])[0] == 0
    code, _, err = run(capsys, "cache", "evict", a.id[:8])
    assert code == 1 and "pinned" in err
    code, out, _ = run(capsys, "cache", "evict", "--all", "--format", "json")
    assert json.loads(out) == {"evicted": [b.id], "skippedPinned": [a.id]}
    code, out, _ = run(capsys, "cache", "evict", a.id, "--force")
    assert code == 0 and "evicted 1" in out
    assert json.loads(run(capsys, "cache", "ls", "--format", "json")[1]) == []


def test_shrink_demotes_t1_to_t2(env, capsys):
    entry = _put(200)
    code, out, _ = run(capsys, "cache", "evict", "--tier", "T1", "--to-bytes", "0")
    assert code == 0 and "1 entries moved" in out
    listed = json.loads(run(capsys, "cache", "ls", "--format", "json")[1])
    assert [(e["id"], e["tier"]) for e in listed] == [(entry.id, "T2")]


def test_bad_arguments_name_the_problem(env, capsys):
    assert run(capsys, "cache", "evict")[0] == 2
    code, _, err = run(capsys, "cache", "evict", "--to-bytes", "5")
    assert code == 2 and "--tier" in err
    code, _, err = run(capsys, "cache", "evict", "0123456789")
    assert code == 1 and "no cache entry" in err
