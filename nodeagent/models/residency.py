"""Residency: which models are loaded where, for how long, and what gives way.

States: ``cold`` (on disk only), ``warm`` (its file is in the page cache),
``hot`` (loaded in a provider). `ResidencyManager` is a library the daemon
owns: it loads through a `Loader` (the daemon passes one that starts a
provider), and every decision is made against per-pool budgets.

Budgets: one per memory *pool*. System RAM is pool ``system``; a GPU with
dedicated VRAM is its own pool; a unified-memory GPU (Apple Silicon under
Asahi, integrated GPUs) shares pool ``system`` with the CPU, so its bytes and
the CPU's are charged to one budget. Budget = total - reserve.

Keep-alive (seconds): ``None`` takes the default (300); a negative value keeps
the model forever; 0 unloads it as soon as it is idle. The timer starts when
the last request using the model ends; a request may change the model's
keep-alive from then on (as Ollama does).

Eviction: when a load needs room (bytes in a pool, or a slot under the cap on
loaded models), idle unpinned models are evicted in order of *expected cost*
= reload time x likelihood of reuse, where the likelihood comes from an
exponentially decayed count of recent uses. A model in use or pinned is never
evicted. If evicting every candidate is not enough the load is refused with
`OverCommit`, naming the missing bytes and what could and could not be evicted.

The clock is injectable (``clock`` returns monotonic seconds, ``wall`` returns
epoch seconds for display) so tests drive time.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import math
import mmap
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

from nodeagent.contracts.model import DeviceShare, ModelResidency
from nodeagent.models.fit import FitEstimate, estimate
from nodeagent.models.gguf_meta import GGUFMeta
from nodeagent.models.store import pid_alive

DEFAULT_KEEP_ALIVE_S = 300.0
DEFAULT_MAX_LOADED = 3
DEFAULT_RESERVE_FRACTION = 0.10  # of each pool, kept free for the OS and the agent
DEFAULT_LOAD_BYTES_PER_S = 1e9  # until a load on this machine was measured
REUSE_TAU_S = 600.0  # recent-use memory: a use 10 minutes ago counts e^-1
SYSTEM_POOL = "system"

MIGRATIONS = [
    """
    CREATE TABLE residency (
        digest TEXT PRIMARY KEY,
        record TEXT NOT NULL,
        owner_pid INTEGER NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE residency_intent (
        digest TEXT PRIMARY KEY,
        keep_alive_s REAL,
        pinned INTEGER NOT NULL DEFAULT 0,
        n_ctx INTEGER,
        requested_at TEXT NOT NULL
    )
    """,
]


class ResidencyError(RuntimeError):
    pass


class OverCommit(ResidencyError):
    """A load that does not fit even after every allowed eviction."""

    def __init__(self, message: str, missing: dict[str, int], evictable: list[str], blocked: list[str]) -> None:
        super().__init__(message)
        self.missing = missing
        self.evictable = evictable
        self.blocked = blocked


# ------------------------------------------------------------------ budgets
@dataclass(frozen=True)
class PoolBudget:
    pool: str
    devices: tuple[str, ...]
    total_bytes: int
    reserve_bytes: int

    @property
    def budget_bytes(self) -> int:
        return max(self.total_bytes - self.reserve_bytes, 0)


def pool_of(device_id: str, memory_kind: str, kind: str) -> str:
    if kind == "cpu" or memory_kind in ("unified", "shared_system"):
        return SYSTEM_POOL
    return device_id


def budgets_from_devices(
    devices: Sequence[Any], *, reserve_fraction: float = DEFAULT_RESERVE_FRACTION,
    reserve_bytes: dict[str, int] | None = None,
) -> list[PoolBudget]:
    """Pools from `ComputeDevice`s (``id``, ``kind``, ``memory_kind``, ``memory_total_bytes``).

    A unified-memory device joins the system pool (its total is the same RAM,
    counted once). ``reserve_bytes`` overrides the fractional reserve per pool.
    """
    totals: dict[str, int] = {}
    members: dict[str, list[str]] = {}
    for device in devices:
        pool = pool_of(device.id, device.memory_kind, device.kind)
        members.setdefault(pool, []).append(device.id)
        total = device.memory_total_bytes or 0
        totals[pool] = max(totals.get(pool, 0), total) if pool == SYSTEM_POOL else total
    pools = []
    for pool, total in totals.items():
        reserve = (reserve_bytes or {}).get(pool, int(total * reserve_fraction))
        pools.append(PoolBudget(pool, tuple(members[pool]), total, reserve))
    return pools


def system_ram_devices() -> list[Any]:
    """A CPU-only device list from psutil, for when no MachineProfile is at hand."""
    import psutil

    from nodeagent.contracts.machine import ComputeDevice

    return [ComputeDevice(id="cpu", kind="cpu", name="system RAM", memory_kind="shared_system",
                          memory_total_bytes=psutil.virtual_memory().total,
                          memory_free_bytes=psutil.virtual_memory().available)]


# ------------------------------------------------------------------ page cache
def page_cache_fraction(path: str | os.PathLike[str]) -> float | None:
    """Fraction of ``path``'s pages in the page cache (mincore), None if unknown."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0.0
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            pages = -(-size // mmap.PAGESIZE)
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                return None
            return sum(b & 1 for b in vec) / pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ loading
@dataclass(frozen=True)
class LoadRequest:
    digest: str
    name: str | None
    path: str
    meta: GGUFMeta
    n_ctx: int = 2048
    n_parallel: int = 1
    kv_type: str = "f16"
    n_gpu_layers: int = 0
    gpu_device: str | None = None  # a device id from the budgets when n_gpu_layers > 0
    replicas: int = 1  # engines loading it (a declared fleet): each holds its own weights and KV


class Handle(Protocol):
    """What a loader returns: something that frees the model when unloaded."""

    name: str  # provider instance name

    def unload(self) -> None: ...


class Loader(Protocol):
    def __call__(self, request: LoadRequest) -> Handle: ...


@dataclass
class Resident:
    request: LoadRequest
    handle: Handle
    fit: FitEstimate
    pool_bytes: dict[str, int]
    loaded_at: float
    load_seconds: float
    keep_alive_s: float | None  # None: forever
    pinned: bool = False
    in_use: int = 0
    last_used: float = 0.0
    expires_at: float | None = None  # monotonic; None: never / in use
    uses: list[float] = field(default_factory=list)

    @property
    def digest(self) -> str:
        return self.request.digest


@dataclass(frozen=True)
class LoadPlan:
    request: LoadRequest
    fit: FitEstimate
    pool_bytes: dict[str, int]
    evict: list[str]  # digests, in eviction order
    already_loaded: bool = False


def _normalize_keep_alive(value: float | None, default: float | None) -> float | None:
    if value is None:
        return default
    return None if value < 0 else float(value)


class ResidencyManager:
    def __init__(
        self,
        budgets: Sequence[PoolBudget],
        loader: Loader,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        max_loaded: int = DEFAULT_MAX_LOADED,
        default_keep_alive_s: float | None = DEFAULT_KEEP_ALIVE_S,
        load_bytes_per_s: float = DEFAULT_LOAD_BYTES_PER_S,
        conn: sqlite3.Connection | None = None,
    ) -> None:
        self.budgets = {b.pool: b for b in budgets}
        self.device_pool = {d: b.pool for b in budgets for d in b.devices}
        self.loader = loader
        self.clock = clock
        self.wall = wall
        self.max_loaded = max_loaded
        self.default_keep_alive_s = _normalize_keep_alive(default_keep_alive_s, DEFAULT_KEEP_ALIVE_S)
        self.load_bytes_per_s = load_bytes_per_s
        self.resident: dict[str, Resident] = {}
        # Digests whose loader is running: a declared fleet adds its slots to the provider
        # pool before the loader returns, and a reconcile pass seeing them unlisted would
        # drop them as evicted (the model then stayed "loaded" with no provider).
        self._loading: set[str] = set()
        self._lock = threading.RLock()
        self.conn = conn
        if conn is not None:
            from nodeagent import store

            store.migrate(conn, "residency", MIGRATIONS)
            # A previous owner that died left rows for models it no longer holds.
            for row in conn.execute("SELECT digest, owner_pid FROM residency").fetchall():
                if not pid_alive(row["owner_pid"]):
                    conn.execute("DELETE FROM residency WHERE digest = ?", (row["digest"],))

    # ---------------------------------------------------------------- accounting
    def used_bytes(self, pool: str, exclude: set[str] = frozenset()) -> int:  # type: ignore[assignment]
        return sum(r.pool_bytes.get(pool, 0) for d, r in self.resident.items() if d not in exclude)

    def _pool_bytes(self, fit: FitEstimate) -> dict[str, int]:
        out: dict[str, int] = {}
        for device in fit.devices:
            pool = self.device_pool.get(device.device_id, SYSTEM_POOL if device.role == "cpu" else device.device_id)
            out[pool] = out.get(pool, 0) + device.total_bytes
        return out

    def fit_for(self, request: LoadRequest) -> FitEstimate:
        return estimate(
            request.meta, request.n_ctx, request.n_parallel, request.kv_type,
            n_gpu_layers=request.n_gpu_layers, gpu_device_id=request.gpu_device or "gpu",
            cpu_device_id=next((d for d, p in self.device_pool.items() if p == SYSTEM_POOL), "cpu"),
        )

    def reuse_likelihood(self, resident: Resident, now: float | None = None) -> float:
        """P(used again within REUSE_TAU_S), from an exponentially decayed use count."""
        now = self.clock() if now is None else now
        rate = sum(math.exp(-(now - t) / REUSE_TAU_S) for t in resident.uses) / REUSE_TAU_S
        return 1.0 - math.exp(-rate * REUSE_TAU_S)

    def expected_cost(self, resident: Resident, now: float | None = None) -> float:
        """Seconds we expect to lose by evicting it: reload time x likelihood of reuse."""
        if resident.keep_alive_s == 0 and resident.in_use == 0:
            return 0.0  # it goes as soon as it is idle anyway
        reload_s = resident.load_seconds or resident.request.meta.file_size / self.load_bytes_per_s
        return reload_s * self.reuse_likelihood(resident, now)

    # ---------------------------------------------------------------- planning
    def plan(self, request: LoadRequest) -> LoadPlan:
        """What loading ``request`` takes; raises `OverCommit` if it cannot fit."""
        with self._lock:
            fit = self.fit_for(request)
            need = {pool: size * request.replicas for pool, size in self._pool_bytes(fit).items()}
            current = self.resident.get(request.digest)
            if current is not None and current.fit.n_ctx == fit.n_ctx and current.request.n_gpu_layers == request.n_gpu_layers:
                return LoadPlan(request, fit, need, [], already_loaded=True)
            unknown = [p for p in need if p not in self.budgets]
            if unknown:
                raise ResidencyError(f"no memory budget for device pool(s) {', '.join(unknown)}; known: {', '.join(self.budgets)}")
            exclude = {request.digest} if current is not None else set()  # a reload replaces itself
            missing = {
                pool: need[pool] - (self.budgets[pool].budget_bytes - self.used_bytes(pool, exclude))
                for pool in need
            }
            over_cap = len([d for d in self.resident if d not in exclude]) + 1 - self.max_loaded
            now = self.clock()
            candidates = sorted(
                (r for d, r in self.resident.items() if d not in exclude and r.in_use == 0 and not r.pinned),
                key=lambda r: (self.expected_cost(r, now), -sum(r.pool_bytes.values()), r.last_used),
            )
            blocked = [r for d, r in self.resident.items() if d not in exclude and (r.in_use or r.pinned)]
            evict: list[str] = []
            short = dict(missing)
            for victim in candidates:
                if over_cap <= 0 and all(v <= 0 for v in short.values()):
                    break
                frees = any(short[p] > 0 and victim.pool_bytes.get(p, 0) > 0 for p in short)
                if over_cap > 0 or frees:
                    evict.append(victim.digest)
                    over_cap -= 1
                    for pool in short:
                        short[pool] -= victim.pool_bytes.get(pool, 0)
            if over_cap > 0 or any(v > 0 for v in short.values()):
                raise self._overcommit(request, need, missing, short, over_cap, candidates, blocked)
            return LoadPlan(request, fit, need, evict)

    def _overcommit(self, request: LoadRequest, need: dict[str, int], missing: dict[str, int],
                    short: dict[str, int], over_cap: int, candidates: list[Resident],
                    blocked: list[Resident]) -> OverCommit:
        human_bytes = _human

        label = request.name or request.digest[:19]
        parts = []
        for pool, still in short.items():
            if still > 0:
                budget = self.budgets[pool]
                parts.append(
                    f"pool {pool} needs {human_bytes(need[pool])} ({need[pool]} bytes) but has "
                    f"{human_bytes(budget.budget_bytes - self.used_bytes(pool))} free of a "
                    f"{human_bytes(budget.budget_bytes)} budget (total {human_bytes(budget.total_bytes)} minus reserve "
                    f"{human_bytes(budget.reserve_bytes)}): {missing[pool]} bytes missing, "
                    f"{still} bytes still missing after evicting every idle unpinned model"
                )
        if over_cap > 0:
            parts.append(f"the cap of {self.max_loaded} loaded models is reached and nothing can be evicted")
        evictable = [f"{r.request.name or r.digest[:19]} ({human_bytes(sum(r.pool_bytes.values()))})" for r in candidates]
        held = [f"{r.request.name or r.digest[:19]} ({'pinned' if r.pinned else f'{r.in_use} request(s) running'})" for r in blocked]
        message = (
            f"refusing to load {label}: " + "; ".join(parts)
            + f". Could evict: {', '.join(evictable) or 'nothing'}."
            + (f" Not evictable: {', '.join(held)}." if held else "")
            + " Use a smaller context, a smaller model, or free memory."
        )
        return OverCommit(message, {p: v for p, v in short.items() if v > 0},
                          [r.digest for r in candidates], [r.digest for r in blocked])

    # ---------------------------------------------------------------- load / unload
    def load(self, request: LoadRequest, *, keep_alive_s: float | None = None, pin: bool | None = None) -> Resident:
        """Load ``request`` (evicting per `plan`). Returns the resident entry."""
        with self._lock:
            plan = self.plan(request)
            now = self.clock()
            if plan.already_loaded:
                resident = self.resident[request.digest]
                if keep_alive_s is not None:
                    resident.keep_alive_s = _normalize_keep_alive(keep_alive_s, self.default_keep_alive_s)
                if pin is not None:
                    resident.pinned = pin
                self._arm(resident, now)
                self._persist(resident)
                return resident
            for digest in plan.evict:
                self._unload(digest)
            if request.digest in self.resident:  # reload with other options
                self._unload(request.digest)
            start = time.perf_counter()
            self._loading.add(request.digest)
            try:
                handle = self.loader(request)
            finally:
                self._loading.discard(request.digest)
            load_seconds = time.perf_counter() - start
            if load_seconds > 0:
                self.load_bytes_per_s = 0.7 * self.load_bytes_per_s + 0.3 * (request.meta.file_size / load_seconds)
            resident = Resident(
                request=request, handle=handle, fit=plan.fit, pool_bytes=plan.pool_bytes, loaded_at=now,
                load_seconds=load_seconds,
                keep_alive_s=_normalize_keep_alive(keep_alive_s, self.default_keep_alive_s),
                pinned=bool(pin), last_used=now,
            )
            self.resident[request.digest] = resident
            self._arm(resident, now)
            self._persist(resident)
            return resident

    def unload(self, digest: str, *, force: bool = False) -> bool:
        """Unload now. Refused while requests run unless ``force``."""
        with self._lock:
            resident = self.resident.get(digest)
            if resident is None:
                return False
            if resident.in_use and not force:
                raise ResidencyError(f"{resident.request.name or digest[:19]} has {resident.in_use} request(s) running")
            self._unload(digest)
            return True

    def _unload(self, digest: str) -> None:
        resident = self.resident.pop(digest)
        try:
            resident.handle.unload()
        finally:
            if self.conn is not None:
                self.conn.execute("DELETE FROM residency WHERE digest = ?", (digest,))

    def pin(self, digest: str, pinned: bool = True) -> None:
        with self._lock:
            resident = self._get(digest)
            resident.pinned = pinned
            self._persist(resident)

    def _get(self, digest: str) -> Resident:
        try:
            return self.resident[digest]
        except KeyError:
            raise ResidencyError(f"{digest[:19]} is not loaded") from None

    # ---------------------------------------------------------------- requests
    def begin(self, digest: str) -> Resident:
        """A request starts using a loaded model: it cannot be evicted until `end`."""
        with self._lock:
            resident = self._get(digest)
            resident.in_use += 1
            resident.uses = resident.uses[-63:] + [self.clock()]
            resident.expires_at = None
            # Not persisted here: this is on the way to the first token (an fsync'd commit),
            # and the record only informs `models ps`; `end` writes the request's effect.
            return resident

    def end(self, digest: str, keep_alive_s: float | None = None) -> None:
        """The request ended; with ``keep_alive_s`` the model's keep-alive changes from now on."""
        with self._lock:
            resident = self.resident.get(digest)
            if resident is None:
                return
            resident.in_use = max(resident.in_use - 1, 0)
            if keep_alive_s is not None:
                resident.keep_alive_s = _normalize_keep_alive(keep_alive_s, self.default_keep_alive_s)
            now = self.clock()
            resident.last_used = now
            self._arm(resident, now)
            if resident.in_use == 0 and resident.keep_alive_s == 0:
                self._unload(digest)
                return
            self._persist(resident)

    @contextlib.contextmanager
    def use(self, digest: str, keep_alive_s: float | None = None) -> Iterator[Resident]:
        resident = self.begin(digest)
        try:
            yield resident
        finally:
            self.end(digest, keep_alive_s)

    def _arm(self, resident: Resident, now: float) -> None:
        if resident.in_use or resident.keep_alive_s is None:
            resident.expires_at = None
        else:
            resident.expires_at = now + resident.keep_alive_s

    def tick(self) -> list[str]:
        """Unload every idle model whose keep-alive has run out. The daemon calls this on a timer."""
        with self._lock:
            now = self.clock()
            expired = [
                d for d, r in self.resident.items()
                if r.in_use == 0 and r.expires_at is not None and r.expires_at <= now
            ]
            for digest in expired:
                self._unload(digest)
            return expired

    def next_expiry(self) -> float | None:
        times = [r.expires_at for r in self.resident.values() if r.expires_at is not None]
        return min(times) if times else None

    # ---------------------------------------------------------------- views
    def loaded_digests(self) -> set[str]:
        """The models loaded, and the one being loaded now (its providers are the node's)."""
        return set(self.resident) | self._loading

    def snapshot(self) -> list[ModelResidency]:
        with self._lock:
            return [self._view(r) for r in sorted(self.resident.values(), key=lambda r: -r.loaded_at)]

    def _view(self, r: Resident) -> ModelResidency:
        now_mono, now_wall = self.clock(), self.wall()

        def wall_of(t: float | None) -> datetime | None:
            return None if t is None else datetime.fromtimestamp(now_wall - (now_mono - t), timezone.utc)

        return ModelResidency(
            name=r.request.name, digest=r.digest, state="hot", provider=getattr(r.handle, "name", None),
            size_bytes=r.fit.total_bytes, processor=r.fit.processor, context_length=r.fit.n_ctx,
            devices=[DeviceShare(device_id=d.device_id, bytes=d.total_bytes) for d in r.fit.devices],
            pinned=r.pinned, in_use=r.in_use, keep_alive_s=-1 if r.keep_alive_s is None else r.keep_alive_s,
            until=wall_of(r.expires_at), loaded_at=wall_of(r.loaded_at), last_used_at=wall_of(r.last_used),
            load_seconds=r.load_seconds,
        )

    def _persist(self, resident: Resident) -> None:
        if self.conn is None:
            return
        self.conn.execute(
            "INSERT INTO residency (digest, record, owner_pid, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (digest) DO UPDATE SET record = excluded.record, owner_pid = excluded.owner_pid,"
            " updated_at = excluded.updated_at",
            (resident.digest, self._view(resident).model_dump_json(), os.getpid(),
             datetime.now(timezone.utc).isoformat()),
        )


def _human(n: float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


# ------------------------------------------------------------------ reading recorded state
def recorded_residency(conn: sqlite3.Connection) -> list[ModelResidency]:
    """Hot models as recorded by a live owner (the daemon). Rows of dead owners are skipped."""
    from nodeagent import store

    store.migrate(conn, "residency", MIGRATIONS)
    rows = conn.execute("SELECT record, owner_pid FROM residency ORDER BY updated_at DESC").fetchall()
    return [ModelResidency.model_validate_json(row["record"]) for row in rows if pid_alive(row["owner_pid"])]


def record_intent(conn: sqlite3.Connection, digest: str, *, keep_alive_s: float | None, pinned: bool,
                  n_ctx: int | None) -> None:
    """Remember what an operator asked for, for the daemon to apply when it runs."""
    from nodeagent import store

    store.migrate(conn, "residency", MIGRATIONS)
    conn.execute(
        "INSERT INTO residency_intent (digest, keep_alive_s, pinned, n_ctx, requested_at) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (digest) DO UPDATE SET keep_alive_s = excluded.keep_alive_s, pinned = excluded.pinned,"
        " n_ctx = excluded.n_ctx, requested_at = excluded.requested_at",
        (digest, keep_alive_s, int(pinned), n_ctx, datetime.now(timezone.utc).isoformat()),
    )


def clear_intent(conn: sqlite3.Connection, digest: str) -> bool:
    from nodeagent import store

    store.migrate(conn, "residency", MIGRATIONS)
    return conn.execute("DELETE FROM residency_intent WHERE digest = ?", (digest,)).rowcount > 0


def intents(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    from nodeagent import store

    store.migrate(conn, "residency", MIGRATIONS)
    return [dict(row) for row in conn.execute("SELECT * FROM residency_intent ORDER BY requested_at")]


def parse_keep_alive(text: str) -> float:
    """``5m``, ``1h``, ``30s``, ``300``, ``-1`` (forever), ``0`` (unload when idle) -> seconds."""
    text = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise ValueError(f"keep-alive {text!r} is not a duration like 30s, 5m, 1h, 0 or -1") from None
