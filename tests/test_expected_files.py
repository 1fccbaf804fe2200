"""CI refuses the switches that rewrite expected files (UPDATE_GOLDEN, UPDATE_EXPECTED).

Each case runs a real pytest session in a scratch directory holding this
suite's conftest.py and expected_files.py and one witness test that leaves a
mark when it runs, so "refused" means nothing ran at all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from expected_files import UPDATE_SWITCHES, refusal_under_ci

TESTS = Path(__file__).resolve().parent
USAGE_ERROR = 4  # pytest.ExitCode.USAGE_ERROR


def run_session(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], bool]:
    for name in ("conftest.py", "expected_files.py"):
        shutil.copy(TESTS / name, tmp_path / name)
    mark = tmp_path / "ran"
    (tmp_path / "test_witness.py").write_text(
        f"def test_witness():\n    open({str(mark)!r}, 'w').close()\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", *UPDATE_SWITCHES)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                            cwd=tmp_path, env={**clean, **env}, capture_output=True, text=True, timeout=120)
    return result, mark.exists()


@pytest.mark.parametrize("switch", UPDATE_SWITCHES)
def test_ci_session_with_an_update_switch_stops_before_any_test(tmp_path, switch):
    result, ran = run_session(tmp_path, CI="true", **{switch: "1"})
    assert result.returncode == USAGE_ERROR, result.stdout + result.stderr
    assert f"{switch} rewrite(s) the expected files" in result.stderr and "CI=true refuses them" in result.stderr
    assert not ran


@pytest.mark.parametrize("env", [{"UPDATE_GOLDEN": "1"}, {"CI": "false", "UPDATE_EXPECTED": "1"}, {"CI": "true"}])
def test_a_developer_may_update_and_ci_without_a_switch_runs(tmp_path, env):
    result, ran = run_session(tmp_path, **env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ran


def test_refusal_names_every_switch_that_is_set():
    message = refusal_under_ci({"CI": "1", "UPDATE_GOLDEN": "1", "UPDATE_EXPECTED": "yes"})
    assert message is not None and "UPDATE_GOLDEN and UPDATE_EXPECTED" in message
    assert refusal_under_ci({"CI": "0", "UPDATE_GOLDEN": "1"}) is None
    assert refusal_under_ci({"UPDATE_GOLDEN": "1"}) is None
