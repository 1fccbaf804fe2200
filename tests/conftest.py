"""Shared fixtures.

`smollm2_path`: the real SmolLM2-135M-Instruct GGUF (scripts/fetch-smollm2.sh),
for whatever depends on a real tokenizer, template or stop behaviour.

`tiny_model_path`: a random-weight llama GGUF (~11 MB, 4 layers x 128, GQA 4/2,
8192-token byte-fallback vocabulary) written once per test session by
`nodeagent.models.testmodel.create_test_model`. Treat it as read-only; copy it
if a test needs to modify or move the file.

Under CI (``CI`` set and not false), a session with ``UPDATE_GOLDEN`` or
``UPDATE_EXPECTED`` set stops before it runs anything: those switches rewrite
the expected files and pass.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nodeagent.models.testmodel import create_test_model

    return create_test_model(tmp_path_factory.mktemp("models") / "tiny.gguf", preset="tiny")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct (real weights, real tokenizer, ChatML template), fetched and
    verified by scripts/fetch-smollm2.sh (setup runs it; cached per machine)."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "scripts" / "fetch-smollm2.sh"
    found = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600)
    assert found.returncode == 0, f"scripts/fetch-smollm2.sh failed: {found.stderr}"
    return Path(found.stdout.strip().splitlines()[-1])


def pytest_configure(config: pytest.Config) -> None:
    """Refuse UPDATE_GOLDEN / UPDATE_EXPECTED under CI (see tests/expected_files.py)."""
    from expected_files import refusal_under_ci

    problem = refusal_under_ci(os.environ)
    if problem:
        raise pytest.UsageError(problem)
