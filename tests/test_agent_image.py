"""The agent's own image: the Containerfile builds what the Quadlet unit runs, pinned by digest when built here.

The Containerfile is checked statically (its build needs the Debian base image
and PyPI, which tests do not fetch); the digest pinning runs against a fake
`podman` on PATH (the CLI is the boundary) and, where Podman works, against a
real image built offline FROM scratch.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from nodeagent.launch.units import parse_unit
from nodeagent.service import DEFAULT_IMAGE, ServiceOptions, pinned_image, render_container

REPO = Path(__file__).resolve().parent.parent
CONTAINERFILE = REPO / "Containerfile"
DIGEST = "sha256:" + "5e" * 32


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with comments dropped and continuation lines joined."""
    logical, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "a continuation line runs off the end of the Containerfile"
    return [(words[0].upper(), words[1].strip() if len(words) > 1 else "")
            for words in (entry.strip().split(None, 1) for entry in logical)]


def stages(parsed: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for instruction, args in parsed:
        if instruction == "FROM":
            out.append([])
        if out:
            out[-1].append((instruction, args))
    return out


@pytest.fixture(scope="module")
def parsed():
    return instructions(CONTAINERFILE.read_text())


def test_the_base_is_debians_own_image(parsed):
    args = dict(a.split("=", 1) for i, a in parsed if i == "ARG" and "=" in a)
    assert re.fullmatch(r"docker\.io/library/debian:[a-z]+(-slim)?", args["BASE"]), args["BASE"]
    assert [a.split()[0] for i, a in parsed if i == "FROM"] == ["${BASE}", "${BASE}"]


def test_the_build_stage_installs_this_checkout(parsed):
    build = stages(parsed)[0]
    copied = " ".join(a for i, a in build if i == "COPY")
    assert "pyproject.toml" in copied and "README.md" in copied and "nodeagent" in copied
    assert any(i == "RUN" and "pip install" in a and a.rstrip().endswith("/src") for i, a in build)


def test_every_path_the_containerfile_copies_exists_in_the_repository(parsed):
    for instruction, args in parsed:
        if instruction == "COPY" and not args.startswith("--from"):
            *sources, _dest = args.split()
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"


def test_the_image_runs_agent_machine_serve_with_the_cli_on_path(parsed):
    final = stages(parsed)[-1]
    entrypoint = [json.loads(a) for i, a in final if i == "ENTRYPOINT"]
    command = [json.loads(a) for i, a in final if i == "CMD"]
    assert entrypoint == [["agent-machine"]] and command == [["serve"]]
    env = " ".join(a for i, a in final if i == "ENV")
    assert "PATH=/opt/agent-machine/bin:" in env and "AGENT_MACHINE_SCOPE=system" in env
    assert ("COPY", "--from=build /opt/agent-machine /opt/agent-machine") in final


def test_the_quadlet_unit_runs_the_image_the_containerfile_says_to_build(parsed):
    build_commands = re.findall(r"podman build -t (\S+) -f Containerfile \.", CONTAINERFILE.read_text())
    assert build_commands == [DEFAULT_IMAGE]
    unit = parse_unit((REPO / "quadlet" / "agent-machine.container").read_text())
    assert unit.get("Container", "Image") == DEFAULT_IMAGE
    # Quadlet appends Exec= to the image's entrypoint: agent-machine serve.
    (command,) = [json.loads(a) for i, a in stages(parsed)[-1] if i == "CMD"]
    assert [unit.get("Container", "Exec")] == command
    assert unit.get("Container", "HealthCmd").split()[0] == "agent-machine"


@pytest.mark.parametrize("image, pinned", [
    ("localhost/agent-machine:latest", f"localhost/agent-machine@{DIGEST}"),
    ("localhost/agent-machine", f"localhost/agent-machine@{DIGEST}"),
    ("registry.lan:5000/agent-machine", f"registry.lan:5000/agent-machine@{DIGEST}"),
    ("registry.lan:5000/agent-machine:1.2", f"registry.lan:5000/agent-machine@{DIGEST}"),
    (f"localhost/agent-machine@{DIGEST.replace('5e', '11')}", f"localhost/agent-machine@{DIGEST.replace('5e', '11')}"),
])
def test_pinned_image_replaces_the_tag_with_the_digest(image, pinned):
    assert pinned_image(image, DIGEST) == pinned
    assert pinned_image(image, None) == image


def fake_podman(tmp_path: Path, monkeypatch, known: dict[str, str]) -> None:
    """A `podman` on PATH that knows ``known`` (image -> digest) and nothing else."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cases = "\n".join(f'  "{image}") echo {digest} ;;' for image, digest in known.items())
    script = bin_dir / "podman"
    script.write_text(f'#!/bin/sh\n[ "$1 $2 $3 $4" = "image inspect --format {{{{.Digest}}}}" ] || exit 2\n'
                      f'case "$5" in\n{cases}\n  *) echo "Error: $5: image not known" >&2; exit 125 ;;\nesac\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")


def test_a_locally_built_image_is_pinned_by_digest(tmp_path, monkeypatch):
    fake_podman(tmp_path, monkeypatch, {DEFAULT_IMAGE: DIGEST})
    unit = render_container(ServiceOptions(quadlet=True, podman_version="4.5"))
    assert parse_unit(unit.text).get("Container", "Image") == f"localhost/agent-machine@{DIGEST}"
    assert "by digest" in unit.text.splitlines()[1]
    unpinned = render_container(ServiceOptions(quadlet=True, podman_version="4.5", pin_image=False))
    assert parse_unit(unpinned.text).get("Container", "Image") == DEFAULT_IMAGE


def test_an_image_podman_does_not_have_is_named_by_tag_with_how_to_build_it(tmp_path, monkeypatch):
    fake_podman(tmp_path, monkeypatch, {})
    unit = render_container(ServiceOptions(quadlet=True, podman_version="4.5"))
    assert parse_unit(unit.text).get("Container", "Image") == DEFAULT_IMAGE
    assert f"podman build -t {DEFAULT_IMAGE} -f Containerfile ." in unit.text


@pytest.mark.podman
def test_with_real_podman_the_pinned_reference_names_the_built_image(tmp_path):
    podman = shutil.which("podman")
    if podman is None:
        pytest.skip("podman is not installed")
    tag = f"localhost/agent-machine-pin-test-{uuid.uuid4().hex[:8]}:latest"
    (tmp_path / "f").write_text("x")
    (tmp_path / "Containerfile").write_text("FROM scratch\nCOPY f /f\n")
    built = subprocess.run([podman, "build", "--quiet", "--pull=never", "-t", tag, str(tmp_path)],
                           capture_output=True, text=True, timeout=120)
    if built.returncode != 0:
        pytest.skip(f"podman cannot build an image here: {built.stderr.strip()[-300:]}")
    try:
        unit = render_container(ServiceOptions(quadlet=True, podman_version="4.5", image=tag))
        image = parse_unit(unit.text).get("Container", "Image")
        assert image.startswith(tag.rsplit(":", 1)[0] + "@sha256:")
        same = subprocess.run([podman, "image", "inspect", "--format", "{{.Id}}", image, tag],
                              capture_output=True, text=True, timeout=60)
        ids = same.stdout.split()
        assert same.returncode == 0 and len(ids) == 2 and ids[0] == ids[1], same.stderr
    finally:
        subprocess.run([podman, "rmi", "-f", tag], capture_output=True, timeout=60)
