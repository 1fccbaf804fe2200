"""`podman kube play` of `render kube --target podman`: the agent and a llama-server provider in one Pod,
a chat through the agent answers, and `podman kube down` (plus the named volumes it keeps by design)
leaves nothing behind.

The agent's image is built here, offline, FROM scratch out of this host's own Python and the agent's
installed dependencies (the product image comes from the Containerfile, which needs Debian and PyPI);
the provider's image FROM scratch with the locally built llama-server, as tests/test_podman_real.py does.
Skipped, with the reason, where Podman cannot run containers.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import pytest
import yaml

pytestmark = [pytest.mark.podman, pytest.mark.slow, pytest.mark.llama]

REPO = Path(__file__).resolve().parent.parent
AGENT_IMAGE = "localhost/am-kube-test/agent:test"
PROVIDER_IMAGE = "localhost/am-kube-test/llama-server:test"
SKIP_STDLIB = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages", "__pycache__"}


def _closure(roots: list[str]) -> list[metadata.Distribution]:
    seen: dict[str, metadata.Distribution] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional marker-gated dependency this Python does not need
        seen[key] = dist
        todo += [re.split(r"[ ;<>=!~\[(]", r)[0] for r in dist.requires or [] if "extra ==" not in r]
    return list(seen.values())


def stage_agent_rootfs(root: Path) -> None:
    """This Python (same absolute prefix, so it finds its stdlib), the agent's dependency closure,
    the agent's source, the provider catalog, and every shared library they link."""
    from nodeagent.launch.podman import shared_libraries

    prefix = Path(sys.base_prefix)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    purelib = Path(sysconfig.get_paths()["purelib"])
    binary = Path(sys.executable).resolve()
    elf: list[Path] = [binary]

    def put(source: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=True)
        if source.suffix == ".so" or ".so." in source.name:
            elf.append(source)

    put(binary, root / str(binary).lstrip("/"))
    for library in prefix.glob("lib/libpython*.so*"):
        put(library, root / str(library).lstrip("/"))
    for path in stdlib.rglob("*"):
        relative = path.relative_to(stdlib)
        if path.is_file() and not (set(relative.parts) & SKIP_STDLIB):
            put(path, root / str(path).lstrip("/"))
    for dist in _closure(["agent-machine", "pyzmq", "msgpack"]):
        for file in dist.files or []:
            source = Path(dist.locate_file(file))
            if source.is_file() and "__pycache__" not in source.parts and not source.name.endswith(".pth"):
                if purelib in source.parents:
                    put(source, root / str(source).lstrip("/"))
    shutil.copytree(REPO / "nodeagent", root / str(purelib / "nodeagent").lstrip("/"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "providers", root / "usr/share/agent-machine/providers")
    libraries: set[Path] = set()
    for path in elf:
        libraries.update(shared_libraries(path))
    for library in libraries:
        target = root / str(library).lstrip("/")
        if not target.exists():
            put(library.resolve(), target)
    for directory in ("tmp", "var/tmp", "etc"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/var/lib/agent-machine:/sbin/nologin\n")


def podman(*args: str, timeout: float = 300, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {done.stderr[-2000:]}")
    return done


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from nodeagent.launch.podman import PodmanError, PodmanHostConfig, build_local_image, podman_version
    from nodeagent.providers.llama_server import locate_llama_server

    host = PodmanHostConfig.detect()
    try:
        podman_version(host)
    except PodmanError as exc:
        pytest.skip(str(exc))
    binary, how = locate_llama_server(build=False)
    if binary is None:
        pytest.skip(f"no llama-server binary for the provider image: {how}")
    built = [build_local_image(binary, PROVIDER_IMAGE, host)]
    work = tmp_path_factory.mktemp("agent-image")
    stage_agent_rootfs(work / "root")
    python = PYTHON
    (work / "Containerfile").write_text(
        "FROM scratch\nCOPY root/ /\n"
        "ENV AGENT_MACHINE_SCOPE=system PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/var/lib/agent-machine\n"
        f'ENTRYPOINT ["{python}", "-m", "nodeagent.cli"]\nCMD ["serve"]\n')
    done = podman(*host.global_args(), "build", "--quiet", "--pull=never", "-t", AGENT_IMAGE, "-f",
                  str(work / "Containerfile"), str(work), timeout=900)
    built.append(done.stdout.strip().splitlines()[-1])
    # Podman reads runtime and ulimits for kube play from containers.conf only.
    conf = work / "containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = [" + ", ".join(f'"{u}"' for u in host.ulimits) + "]\n"
                    + (f'[engine]\nruntime = "{host.runtime}"\n' if host.runtime else ""))
    yield {**os.environ, "CONTAINERS_CONF": str(conf)}
    podman("rmi", "-f", *built, check=False)  # by id: a rebuild leaves no untagged copy behind


PYTHON = str(Path(sys.executable).resolve())  # the interpreter the agent image carries, at the same path
DIRECT_CHAT = """
import httpx
body = {"temperature": 0, "max_tokens": 16, "messages": [{"role": "user", "content": "What is the capital of France?"}]}
print(httpx.post("http://127.0.0.1:8080/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["message"]["content"])
"""


def client_ready(client: httpx.Client) -> bool:
    try:
        return client.get("/readyz").status_code == 200
    except httpx.HTTPError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_podman_kube_play_runs_the_agent_and_a_provider_and_a_chat_answers(images, tmp_path, smollm2_path):
    from nodeagent.models.store import ModelStore

    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_MACHINE_")}
    env.update(HOME=str(tmp_path), AGENT_MACHINE_STATE_DIR=str(tmp_path / "state"),
               AGENT_MACHINE_CONFIG_DIR=str(tmp_path / "cfg"))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.toml").write_text(
        '[[providers]]\nmodel = "smollm2"\nkind = "llama_server"\nslots = 2\nctx_per_slot = 2048\nthreads = 2\n'
        f'args = ["--cache-ram", "0"]\nimage = "{PROVIDER_IMAGE}"\n')
    ModelStore(tmp_path / "state").import_model(smollm2_path, "smollm2")
    token = tmp_path / "token"
    token.write_text("kube-play-token-0123456789")
    token.chmod(0o600)  # the agent refuses a token file others can read; the bind mount keeps the mode
    name = f"amk{os.getpid()}"
    out = tmp_path / "pod"
    done = subprocess.run([sys.executable, "-m", "nodeagent.cli", "render", "kube", "--target", "podman",
                           "--accelerator", "cpu", "--name", name, "--image", AGENT_IMAGE, "--token-file", str(token),
                           "--model", f"smollm2={smollm2_path}", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    docs = list(yaml.safe_load_all((out / "all.yaml").read_text()))
    pod = docs[-1]
    port = free_port()
    agent = pod["spec"]["containers"][0]
    agent["ports"][0].update(hostPort=port, hostIP="127.0.0.1")  # reach the API from this machine
    provider = pod["spec"]["containers"][1]
    assert provider["image"].startswith(PROVIDER_IMAGE.rsplit(":", 1)[0] + "@sha256:")  # pinned: the local digest
    assert agent["image"].startswith(AGENT_IMAGE.rsplit(":", 1)[0] + "@sha256:")
    played = tmp_path / "play.yaml"
    played.write_text(yaml.safe_dump_all(docs))
    volumes = [f"{name}-{v}" for v in ("config", "state", "models", "cache", "scratch", "kv-ram", "run", "slots")]
    try:
        podman("kube", "play", str(played), env=images, timeout=300)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120,
                              headers={"Authorization": "Bearer kube-play-token-0123456789"})
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            state = podman("inspect", f"{name}-agent", "--format", "{{.State.Status}}", check=False).stdout.strip()
            if state in ("exited", "stopped"):
                break  # it will not become ready: show its log
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        if client_ready(client) is False:
            logs = podman("logs", f"{name}-agent", check=False)
            raise AssertionError(f"agent not ready: {logs.stdout[-3000:]}{logs.stderr[-3000:]}")
        answer = client.post("/v1/chat/completions", json={
            "model": "smollm2", "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        if answer.status_code != 200:
            logs = podman("logs", f"{name}-{provider['name']}", check=False)
            raise AssertionError(f"{answer.text}\nprovider log: {logs.stdout[-2000:]}{logs.stderr[-2000:]}")
        said = answer.json()["choices"][0]["message"]["content"]
        # The same greedy answer as the provider gives when asked directly inside the pod (this
        # llama-server build answers SmolLM2 differently from llama-cpp-python's "...is Paris.").
        direct = podman("exec", f"{name}-agent", PYTHON, "-c", DIRECT_CHAT, check=True).stdout.strip()
        assert said and said == direct
        providers = client.get("/v1/providers").json()["items"]
        assert {p["mode"] for p in providers} == {"attach"} and len(providers) == 2  # two slots of one replica
        client.close()
    finally:
        podman("kube", "down", str(played), env=images, check=False)
        left = podman("ps", "-a", "--filter", f"name={name}", "--format", "{{.Names}}", check=False).stdout.split()
        pods = podman("pod", "ps", "--filter", f"name={name}", "--format", "{{.Name}}", check=False).stdout.split()
        # Podman 4.3's kube down keeps volumes (PVCs persist by design; 4.4+ has --force): the ones the
        # manifests named, and only those, are removed here.
        kept = podman("volume", "ls", "--format", "{{.Name}}", check=False).stdout.split()
        mine = sorted(v for v in kept if v.startswith(name))
        podman("volume", "rm", "-f", *mine, check=False) if mine else None
        after = podman("volume", "ls", "--format", "{{.Name}}", check=False).stdout.split()
    assert left == [] and pods == []
    assert set(mine) <= set(volumes) and not [v for v in after if v.startswith(name)]
