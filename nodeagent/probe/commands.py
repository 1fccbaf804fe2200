"""The external commands the probe runs, with their timeouts.

Kept in a module with no heavy imports so that `probe()` can start them
(`System.prefetch`) before it imports pydantic and the sub-probes.
"""

from __future__ import annotations

# vulkaninfo initialises every ICD; proprietary drivers can take a second or two.
VULKANINFO_SUMMARY = (("vulkaninfo", "--summary"), 8.0)
# The full text output: the only place with memory heaps and feature structs.
VULKANINFO_TEXT = (("vulkaninfo",), 8.0)
PODMAN_VERSION = (("podman", "--version"), 5.0)
# A user manager that is not there answers at once; one that hangs must not stall us.
SYSTEMD_USER_STATE = (("systemctl", "--user", "is-system-running"), 2.0)

ALL = (VULKANINFO_TEXT, VULKANINFO_SUMMARY, PODMAN_VERSION, SYSTEMD_USER_STATE)
# Started at once by `probe()`; the summary only runs when the full text fails.
PREFETCH = (VULKANINFO_TEXT, PODMAN_VERSION, SYSTEMD_USER_STATE)
