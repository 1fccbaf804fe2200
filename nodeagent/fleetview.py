"""The view across several agents: who is up, where a pod would start fastest, which pods collide.

Not a scheduler: it joins what each agent's own API says (`/v1/status`,
`/v1/machine`, `/v1/store/models`, `/v1/cache`, `/v1/pods`,
`/v1/placements:score`, `/v1/pods:conflicts`) so an admin or a planner sees
the fleet in one table (Kubernetes and its routers place pods past one machine;
see docs/architecture.md).

A nodes file lists the agents, TOML::

    [[nodes]]
    name = "gpu-1"
    url = "http://10.0.0.5:8377"          # TCP (a bearer token is required there)
    token_file = "/etc/agent-machine/gpu-1.token"

    [[nodes]]
    name = "laptop"
    url = "unix:///run/user/1000/agent-machine/api.sock"   # a Unix socket: no token needed

Health: a node is healthy when it answered within 3x the reconcile interval
(``interval_s`` per node, default 5 s, as ``[reconcile] interval_s``). When a
node answers, the time is remembered in a small state file; one that does not
answer shows how long ago it last did (or ``never``) and is ``stopped``.
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["FleetFileError", "NodeRef", "NodeView", "ScoreRow", "conflicts", "load_nodes", "ps", "score"]

DEFAULT_INTERVAL_S = 5.0
HEALTHY_INTERVALS = 3  # answered within 3 x the interval: healthy
REQUEST_TIMEOUT_S = 5.0


class FleetFileError(ValueError):
    """A nodes file that cannot be used; the message names the file, the node and the field."""


@dataclass(frozen=True)
class NodeRef:
    name: str
    url: str  # http(s)://host:port or unix:///path/to/api.sock
    token_file: str | None = None
    interval_s: float = DEFAULT_INTERVAL_S

    def token(self) -> str | None:
        if not self.token_file:
            return None
        try:
            return Path(self.token_file).read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise FleetFileError(f"node {self.name}: token_file {self.token_file}: {exc.strerror or exc}") from None

    def client(self, timeout: float = REQUEST_TIMEOUT_S) -> Any:
        from nodeagent.client import AgentClient

        if self.url.startswith("unix://"):
            return AgentClient(self.url[len("unix://"):], token=self.token(), timeout=timeout)
        return AgentClient(base_url=self.url, token=self.token(), timeout=timeout)


def load_nodes(path: str | os.PathLike[str]) -> list[NodeRef]:
    """The nodes of a nodes file; a missing field, a bad URL or a repeated name raises naming it."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FleetFileError(f"nodes file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise FleetFileError(f"nodes file {path}: not TOML: {exc}") from None
    unknown = sorted(set(data) - {"nodes"})
    if unknown:
        raise FleetFileError(f"nodes file {path}: unknown key(s) {', '.join(unknown)} (expected [[nodes]] tables)")
    raw = data.get("nodes")
    if not isinstance(raw, list) or not raw:
        raise FleetFileError(f"nodes file {path}: no [[nodes]] tables")
    nodes: list[NodeRef] = []
    for index, item in enumerate(raw):
        where = f"nodes file {path}: nodes[{index}]"
        if not isinstance(item, dict):
            raise FleetFileError(f"{where}: must be a table")
        extra = sorted(set(item) - {"name", "url", "token_file", "interval_s"})
        if extra:
            raise FleetFileError(f"{where}: unknown field(s) {', '.join(extra)} (name, url, token_file, interval_s)")
        name, url = item.get("name"), item.get("url")
        if not isinstance(name, str) or not name:
            raise FleetFileError(f"{where}.name: required, a non-empty string")
        if not isinstance(url, str) or not url.startswith(("http://", "https://", "unix://")):
            raise FleetFileError(f"{where}.url: required, http://host:port or unix:///path (got {url!r})")
        token_file = item.get("token_file")
        if token_file is not None and not isinstance(token_file, str):
            raise FleetFileError(f"{where}.token_file: a path")
        if url.startswith(("http://", "https://")) and not token_file:
            raise FleetFileError(f"{where}.token_file: required for {url} (the agent's TCP API needs a token)")
        interval = item.get("interval_s", DEFAULT_INTERVAL_S)
        if not isinstance(interval, (int, float)) or interval <= 0:
            raise FleetFileError(f"{where}.interval_s: a positive number of seconds")
        if token_file and not Path(token_file).is_absolute():
            token_file = str((path.parent / token_file).resolve())
        if any(n.name == name for n in nodes):
            raise FleetFileError(f"{where}.name: {name!r} is listed twice")
        nodes.append(NodeRef(name, url, token_file, float(interval)))
    return nodes


# ---------------------------------------------------------------- ps
@dataclass
class NodeView:
    """One row of `fleet ps`."""

    name: str
    url: str
    state: str  # ready | draining | not-ready | stopped
    healthy: bool
    heartbeat_age_s: float | None  # since it last answered; None: never seen
    error: str | None = None
    host: str | None = None
    version: str | None = None
    tenants: list[str] = field(default_factory=list)  # tenants with pods in flight there
    in_flight: int = 0
    hot_models: list[str] = field(default_factory=list)
    cache: dict[str, dict[str, int]] = field(default_factory=dict)  # tier -> usedBytes, budgetBytes, entries
    drift: list[str] = field(default_factory=list)
    clock_skew_s: float | None = None
    declared: list[str] = field(default_factory=list)  # its declared providers, "model kind RxS"

    def to_wire(self) -> dict[str, Any]:
        return {_camel(k): v for k, v in asdict(self).items()}


def _camel(name: str) -> str:
    """heartbeat_age_s -> heartbeatAgeS: the wire spelling every contract of the agent uses."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


class SeenStore:
    """When each node (by URL) last answered, kept across `fleet ps` runs in a JSON file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._seen: dict[str, float] = {}
        if path is not None and path.is_file():
            try:
                self._seen = {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
            except (OSError, ValueError, AttributeError):
                self._seen = {}  # a damaged file only loses the ages of nodes down now

    def get(self, url: str) -> float | None:
        return self._seen.get(url)

    def mark(self, url: str, when: float) -> None:
        self._seen[url] = when

    def save(self) -> None:
        if self.path is None:
            return
        from nodeagent.fsutil import atomic_write_text

        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self._seen, sort_keys=True))


def default_seen_path() -> Path:
    from nodeagent.paths import resolve_paths

    return resolve_paths().cache_dir / "fleet-seen.json"


def ps(nodes: Sequence[NodeRef], *, seen: SeenStore | None = None, clock: Callable[[], float] = time.time) -> list[NodeView]:
    """Ask every node at once; unreachable ones are rows too (``stopped``), with their last heartbeat."""
    seen = seen or SeenStore(None)
    with ThreadPoolExecutor(max_workers=min(16, len(nodes)) or 1) as pool:
        views = list(pool.map(lambda n: _view(n, seen, clock), nodes))
    seen.save()
    _mark_drift(views)
    return views


def _view(node: NodeRef, seen: SeenStore, clock: Callable[[], float]) -> NodeView:
    from nodeagent.client import AgentNotRunning, ApiError

    try:
        with node.client() as client:
            asked = clock()
            status = client.get("/v1/status")
            answered = clock()
            skew = _skew(status, (asked + answered) / 2)
            machine = client.get("/v1/machine")
            models = client.get("/v1/store/models")
            cache = _optional(client, "/v1/cache")
            pods = _optional(client, "/v1/pods", params={"limit": 1000})
            fleet = _optional(client, "/v1/fleet")
    except (AgentNotRunning, ApiError, FleetFileError, OSError, ValueError) as exc:
        last = seen.get(node.url)
        age = None if last is None else max(0.0, clock() - last)
        return NodeView(node.name, node.url, "stopped", healthy=False, heartbeat_age_s=age,
                        error=_short_error(exc))
    seen.mark(node.url, answered)
    state = "ready" if status.get("ready") else ("draining" if not status.get("accepting") else "not-ready")
    in_flight = [p for p in (pods or {}).get("items", [])
                 if p.get("status", {}).get("phase") in ("Pending", "Admitted", "Placed", "Running")]
    return NodeView(
        node.name, node.url, state, healthy=state == "ready", heartbeat_age_s=0.0,
        host=(machine.get("host") or {}).get("hostname"), version=status.get("version"),
        tenants=sorted({p["metadata"]["tenant"] for p in in_flight}), in_flight=int(status.get("inFlight") or 0),
        hot_models=sorted(r.get("name") or r.get("digest", "")[:19] for r in models.get("residency", [])
                          if r.get("state") == "hot"),
        cache={t["tier"]: {"usedBytes": t.get("usedBytes", 0), "budgetBytes": t.get("budgetBytes", 0),
                           "entries": t.get("entries", 0)} for t in (cache or {}).get("tiers", [])},
        clock_skew_s=skew,
        declared=sorted(f"{d.get('model')} {d.get('kind')} {d.get('replicas')}x{d.get('slots')}"
                        for d in (fleet or {}).get("declared", []) if d.get("declared")))


def _optional(client: Any, path: str, **kwargs: Any) -> Any:
    """A part of the view the node may not offer (no executor: no cache): None instead of failing the row."""
    from nodeagent.client import ApiError

    try:
        return client.get(path, **kwargs)
    except ApiError:
        return None


def _skew(status: dict[str, Any], now: float) -> float | None:
    """The node's clock minus ours: its start time plus its uptime is its "now" when it answered."""
    try:
        started = datetime.fromisoformat(str(status["startedAt"]).replace("Z", "+00:00")).timestamp()
        return started + float(status["uptimeS"]) - now
    except (KeyError, TypeError, ValueError):
        return None


def _short_error(exc: Exception) -> str:
    text = str(exc).split(":", 1)[0] if "no agent answering" in str(exc) else str(exc)
    return text[:160]


def _mark_drift(views: list[NodeView]) -> None:
    """What sets a node apart from the fleet: another agent version than most run, other declared
    providers than most have, a clock more than 2 s off ours (its start time plus its uptime,
    against the middle of our request)."""
    versions = Counter(v.version for v in views if v.version)
    common = versions.most_common(1)[0][0] if versions else None
    answered = [v for v in views if v.state != "stopped"]
    declarations = Counter(tuple(v.declared) for v in answered)
    usual = declarations.most_common(1)[0][0] if declarations else ()
    for view in views:
        if view.version and common and view.version != common:
            view.drift.append(f"version {view.version} (most: {common})")
        if view in answered and tuple(view.declared) != usual:
            view.drift.append(f"providers [{'; '.join(view.declared) or 'default rule'}] "
                              f"(most: [{'; '.join(usual) or 'default rule'}])")
        if view.clock_skew_s is not None and abs(view.clock_skew_s) > 2:
            view.drift.append(f"clock {view.clock_skew_s:+.0f}s")


def health_of(view: NodeView, interval_s: float) -> bool:
    return view.heartbeat_age_s is not None and view.heartbeat_age_s <= HEALTHY_INTERVALS * interval_s


# ---------------------------------------------------------------- score
@dataclass
class ScoreRow:
    """One node's dry-run placement of the pod: where it would start, how soon, with how much cached."""

    rank: int | None
    node: str
    provider: str | None = None
    ttft_s: float | None = None
    cached_tokens: int = 0
    prompt_tokens: int = 0
    cache_source: str | None = None
    reason: str = ""
    error: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {_camel(k): v for k, v in asdict(self).items()}


def score(nodes: Sequence[NodeRef], pod: dict[str, Any]) -> list[ScoreRow]:
    """Ask every node's ``placements:score`` for ``pod`` (its wire form) and rank them: the lowest
    estimated time to first token first; between equal estimates, more cached tokens first; nodes
    with no estimate (an unknown rate, no eligible candidate) after those with one; nodes that
    refused or did not answer last, unranked."""
    with ThreadPoolExecutor(max_workers=min(16, len(nodes)) or 1) as pool:
        rows = list(pool.map(lambda n: _score_one(n, pod), nodes))
    order = sorted((r for r in rows if r.error is None),
                   key=lambda r: (r.provider is None, r.ttft_s is None, r.ttft_s or 0.0, -r.cached_tokens, r.node))
    for rank, row in enumerate(order, 1):
        row.rank = rank
    return order + [r for r in rows if r.error is not None]


def _score_one(node: NodeRef, pod: dict[str, Any]) -> ScoreRow:
    from nodeagent.client import AgentNotRunning, ApiError

    try:
        with node.client(timeout=60) as client:
            decision = client.post("/v1/placements:score", json=pod)
    except (AgentNotRunning, ApiError, FleetFileError, OSError, ValueError) as exc:
        return ScoreRow(None, node.name, error=_short_error(exc))
    chosen = next((c for c in decision.get("candidates", []) if c.get("provider") == decision.get("chosen")), None)
    return ScoreRow(None, node.name, provider=decision.get("chosen"),
                    ttft_s=chosen.get("ttftS") if chosen else None,
                    cached_tokens=int(chosen.get("cachedTokens", 0)) if chosen else 0,
                    prompt_tokens=int(decision.get("promptTokens", 0)),
                    cache_source=chosen.get("cacheSource") if chosen else None, reason=decision.get("reason", ""))


# ---------------------------------------------------------------- conflicts
def conflicts(nodes: Sequence[NodeRef]) -> list[dict[str, Any]]:
    """Each node's own conflicts (pods sharing a provider's context, saved states past the RAM
    tier), tagged with the node, plus one kind only the fleet sees: ``session``, one agent
    session in flight on two nodes at once, each holding part of its context, so neither
    turn reuses what the other computed."""
    from nodeagent.client import AgentNotRunning, ApiError

    def one(node: NodeRef) -> tuple[NodeRef, list[dict[str, Any]], list[dict[str, Any]], str | None]:
        try:
            with node.client() as client:
                found = client.get("/v1/pods:conflicts").get("items", [])
                pods = client.get("/v1/pods", params={"limit": 1000}).get("items", [])
        except (AgentNotRunning, ApiError, FleetFileError, OSError, ValueError) as exc:
            return node, [], [], _short_error(exc)
        return node, found, pods, None

    with ThreadPoolExecutor(max_workers=min(16, len(nodes)) or 1) as pool:
        answers = list(pool.map(one, nodes))
    out: list[dict[str, Any]] = []
    sessions: dict[tuple[str, str, str], list[tuple[str, str]]] = {}
    for node, found, pods, error in answers:
        if error is not None:
            out.append({"kind": "unreachable", "node": node.name, "pods": [], "detail": error})
            continue
        out += [{**item, "node": node.name} for item in found]
        for pod in pods:
            if pod.get("status", {}).get("phase") in ("Pending", "Admitted", "Placed", "Running"):
                meta = pod["metadata"]
                key = (meta["tenant"], meta.get("agent", ""), pod["spec"].get("session", "default"))
                sessions.setdefault(key, []).append((node.name, pod["id"]))
    for (tenant, agent, session), where in sorted(sessions.items()):
        on = sorted({n for n, _ in where})
        if len(on) > 1:
            out.append({"kind": "session", "node": ",".join(on), "pods": [p for _, p in where],
                        "detail": f"session {tenant}/{agent}/{session} runs on {len(on)} nodes at once "
                                  f"({', '.join(on)}): each holds part of its context, neither reuses the other's"})
    return out
