"""The switches that rewrite reviewed expected files, and CI's refusal of them.

``UPDATE_GOLDEN=1`` (golden units and argv, tests/golden/) and
``UPDATE_EXPECTED=1`` (captured machines' expected profiles) make the tests
write what the code produces now over the reviewed file and then compare the
file with itself: every such test passes. That is right on a developer's
machine, who reads the diff before committing; under CI nobody reads it, so
the session refuses to start (tests/conftest.py).
"""

from __future__ import annotations

import os
from typing import Mapping

UPDATE_SWITCHES = ("UPDATE_GOLDEN", "UPDATE_EXPECTED")


def updating(switch: str) -> bool:
    """Whether ``switch`` (one of UPDATE_SWITCHES) asks this run to rewrite expected files."""
    assert switch in UPDATE_SWITCHES, switch
    return bool(os.environ.get(switch))


def _under_ci(env: Mapping[str, str]) -> bool:
    return env.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def refusal_under_ci(env: Mapping[str, str]) -> str | None:
    """Why this session must not run (an update switch under CI), or None."""
    if not _under_ci(env):
        return None
    set_switches = [name for name in UPDATE_SWITCHES if env.get(name)]
    if not set_switches:
        return None
    return (f"{' and '.join(set_switches)} rewrite(s) the expected files the tests compare with, so those tests "
            f"cannot fail; CI={env['CI']} refuses them. Regenerate locally, review the diff and commit it.")
