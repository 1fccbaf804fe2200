"""Shared fixtures.

`tiny_model_path`: a random-weight llama GGUF (~11 MB, 4 layers x 128, GQA 4/2,
8192-token byte-fallback vocabulary) written once per test session by
`nodeagent.models.testmodel.create_test_model`. Treat it as read-only; copy it
if a test needs to modify or move the file.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nodeagent.models.testmodel import create_test_model

    return create_test_model(tmp_path_factory.mktemp("models") / "tiny.gguf", preset="tiny")
