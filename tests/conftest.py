"""Shared fixtures.

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


def pytest_configure(config: pytest.Config) -> None:
    """Refuse UPDATE_GOLDEN / UPDATE_EXPECTED under CI (see tests/expected_files.py)."""
    from expected_files import refusal_under_ci

    problem = refusal_under_ci(os.environ)
    if problem:
        raise pytest.UsageError(problem)
