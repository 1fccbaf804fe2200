"""llama.cpp's HTTP server (``llama-server``) as a `Provider`, with slot tiering.

`LlamaServerProvider` speaks the server's native API (``/completion`` with
token ids, ``/tokenize``, ``/slots``, ``/metrics``) for the protocol, and
passes OpenAI's ``/v1/completions`` and ``/v1/chat/completions`` through.
It is launched by any launcher (subprocess, podman, quadlet) from a
`ProviderSpec`, or attached to a server that is already running.

Slot tiering. The server saves and restores a slot's KV state as a file
*inside its* ``--slot-save-path`` (``POST /slots/{id}?action=save|restore``,
a bare file name). The agent keeps states in its own tier directories (T1 in
RAM, T2 on disk), so:

* `save_state(slot, path)` has the server write into the slot directory under
  a private temporary name, fsyncs it, and moves it to ``path`` (rename on the
  same filesystem, else copy + fsync + rename), next to a ``.meta.json``
  sidecar with its sha256, token count and size;
* `restore_state(slot, path)` checks the sidecar digest first (a corrupt file
  raises `StateCorrupt` before the server sees it), stages the file into the
  slot directory (hard link, or copy across filesystems), restores, and
  removes the staged name; the server's own rejection (truncated file, wrong
  model, too long for the slot) is also `StateCorrupt`, and it leaves the slot
  empty;
* `move_state(src, dest)` moves a saved state between tiers crash-safely;
* `prepare_slot(slot, prompt_tokens, candidate)` is what runs before a pod's
  turn: restore the candidate if it is a prefix of the prompt, else (or if it
  is corrupt) erase the slot and recompute the prompt, and report which.

The tokens a slot holds (`context_tokens`) are tracked by the adapter from
what it sent and what the server reported cached; this server version's
``GET /slots`` gives counts, not token ids. After a restore they are read
from the state file's header.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import httpx

from nodeagent.contracts.provider import ProviderSpec
from nodeagent.fsutil import atomic_write_text, fsync_dir
from nodeagent.launch.health import check_health
from nodeagent.launch.registry import LaunchRecord
from nodeagent.providers.base import (
    TextSink,
    feed,
    MeasuredRates,
    GenerationRequest,
    GenerationResult,
    Health,
    ProviderCrashed,
    ProviderError,
    ProviderUnavailable,
    Rates,
    RestoredState,
    SavedState,
    StateCorrupt,
    StateUnsupported,
)

STATE_SEQ_MAGIC = 0x67677371  # 'ggsq', llama.cpp's sequence-state file magic
STATE_SEQ_VERSION = 3
TOKEN_NULL = -1  # LLAMA_TOKEN_NULL: marks the server's packed token list
META_SUFFIX = ".meta.json"
# Ordinary prose for `calibrate`: its rates are those of text, not of a degenerate repeat of one token.
CALIBRATION_TEXT = ("A node agent keeps models resident, keeps their caches warm, and places each turn "
                    "of each session where its context already is. ")


class Launcher(Protocol):
    def up(self, spec: ProviderSpec, wait: bool = True) -> LaunchRecord: ...
    def down(self, name: str, missing_ok: bool = False) -> bool: ...


# ------------------------------------------------------------------ state files
def read_slot_file_tokens(path: str | os.PathLike[str]) -> list[int]:
    """The token ids a llama-server slot file covers, from its header.

    Handles both the plain token list and the server's packed form
    (``[NULL, version, n, tokens..., n_media, ...]``). Raises `StateCorrupt`
    naming the file when the header is not a llama.cpp sequence state.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(12)
            if len(head) < 12:
                raise StateCorrupt(f"{path}: too short to be a slot state ({len(head)} bytes)")
            magic, version, n_packed = struct.unpack("<III", head)
            if magic != STATE_SEQ_MAGIC:
                raise StateCorrupt(f"{path}: not a llama.cpp slot state (magic {magic:#x})")
            if version != STATE_SEQ_VERSION:
                raise StateCorrupt(f"{path}: slot state version {version}, this server writes {STATE_SEQ_VERSION}")
            size = os.fstat(handle.fileno()).st_size
            if 12 + 4 * n_packed > size:
                raise StateCorrupt(f"{path}: header claims {n_packed} tokens but the file has {size} bytes")
            packed = list(struct.unpack(f"<{n_packed}i", handle.read(4 * n_packed)))
    except FileNotFoundError:
        raise StateCorrupt(f"{path}: no such state file") from None
    if not packed or packed[0] != TOKEN_NULL:
        return packed
    if len(packed) < 3 or packed[2] < 0 or 3 + packed[2] > len(packed):
        raise StateCorrupt(f"{path}: packed token list is malformed")
    return packed[3:3 + packed[2]]


def _shared_prefix(held, tokens) -> int:
    shared = 0
    for a, b in zip(held, tokens):
        if a != b:
            break
        shared += 1
    return shared


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def meta_path(path: str | os.PathLike[str]) -> Path:
    return Path(str(path) + META_SUFFIX)


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    try:
        return json.loads(meta_path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise StateCorrupt(f"{meta_path(path)}: unreadable: {exc}") from None


def verify_state_file(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Check ``path`` against its sidecar (sha256 and size). Returns the
    sidecar, None if there is none; raises `StateCorrupt` on a mismatch."""
    meta = read_meta(path)
    if meta is None:
        return None
    path = Path(path)
    if not path.exists():
        raise StateCorrupt(f"{path}: state file missing (its {META_SUFFIX} is there)")
    size = path.stat().st_size
    if size != meta.get("size_bytes"):
        raise StateCorrupt(f"{path}: {size} bytes, expected {meta.get('size_bytes')} (truncated or replaced)")
    actual = file_sha256(path)
    if actual != meta.get("sha256"):
        raise StateCorrupt(f"{path}: sha256 {actual[:16]}… does not match the recorded {str(meta.get('sha256'))[:16]}…")
    return meta


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _place(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest`` so that ``dest`` is complete or absent after a crash."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dest)  # same filesystem: atomic
    except OSError:
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            shutil.copyfile(src, tmp)
            _fsync_file(tmp)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        src.unlink()
    fsync_dir(dest.parent)


def move_state(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Move a saved state and its sidecar between tiers (T1 ⇄ T2, or into a
    tier from anywhere). The state lands before its sidecar, and the sidecar
    is removed from ``src`` last, so a crash never leaves a sidecar that
    describes a missing file at the destination."""
    src, dest = Path(src), Path(dest)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such state file")
    _place(src, dest)
    if meta_path(src).exists():
        _place(meta_path(src), meta_path(dest))
    return dest


# ------------------------------------------------------------------ results
@dataclass(frozen=True)
class SlotPreparation:
    """What `prepare_slot` did before a turn."""

    slot: int
    restored_tokens: int  # tokens the slot got from the candidate state (0 if none)
    recomputed_tokens: int  # prompt tokens evaluated to rebuild the context
    source: str  # "restored", "recomputed", "empty"
    reason: str = ""  # why a candidate was not used


class LlamaServerProvider:
    """A `Provider` backed by one llama-server process or container."""

    kind = "llama_server"

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        slot_save_dir: str | os.PathLike[str] | None = None,
        spec: ProviderSpec | None = None,
        launcher: Launcher | None = None,
        timeout_s: float = 600.0,
        health_path: str = "/health",
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.slot_dir = Path(slot_save_dir).resolve() if slot_save_dir else None
        self.spec = spec
        self.launcher = launcher
        self.health_path = health_path
        # No keep-alive: llama-server (cpp-httplib) closes an idle connection after a few
        # seconds without a word, and a request racing that close fails as if the
        # server had crashed. A localhost connect per request costs ~0.1 ms.
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout_s,
                                    limits=httpx.Limits(max_keepalive_connections=0))
        self._context: dict[int, list[int]] = {}
        self._lock = threading.Lock()
        self._measured = MeasuredRates()
        self.pid: int | None = None  # the process it launched (None: attached, or a container)

    @classmethod
    def from_spec(cls, spec: ProviderSpec, launcher: Launcher | None = None, **kwargs: Any) -> "LlamaServerProvider":
        if spec.provider_kind != "llama_server":
            raise ProviderError(f"{spec.name} is a {spec.provider_kind} spec, not llama_server")
        return cls(spec.name, spec.base_url, slot_save_dir=spec.slot_save_dir, spec=spec, launcher=launcher,
                   health_path=spec.health.path, **kwargs)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self.spec is None or self.launcher is None:
            raise ProviderError(f"{self.name}: attached to {self.base_url}; it has no spec/launcher to start")
        if self.slot_dir is not None:
            self.slot_dir.mkdir(parents=True, exist_ok=True)
        record = self.launcher.up(self.spec, wait=True)
        self.pid = record.pid
        self._context.clear()

    def stop(self) -> None:
        if self.launcher is not None:
            self.launcher.down(self.name, missing_ok=True)
        self.pid = None
        self._context.clear()

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------ HTTP
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._client.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise ProviderUnavailable(f"{self.name}: {self.base_url} refused the connection (not running?)") from None
        except httpx.TimeoutException:
            raise ProviderUnavailable(f"{self.name}: {method} {path} timed out") from None
        except httpx.RemoteProtocolError:
            raise ProviderCrashed(f"{self.name}: the server closed the connection during {method} {path} "
                                  "(crashed? see its log)") from None
        except httpx.HTTPError as exc:
            raise ProviderError(f"{self.name}: {method} {path}: {exc}") from None

    @staticmethod
    def _error_text(response: httpx.Response) -> str:
        try:
            error = response.json().get("error", {})
            return error.get("message") or response.text
        except ValueError:
            return response.text[:500]

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        if response.status_code == 503:
            raise ProviderUnavailable(f"{self.name}: still loading the model ({path})")
        if response.status_code >= 400:
            raise ProviderError(f"{self.name}: {method} {path} -> HTTP {response.status_code}: {self._error_text(response)}")
        return response.json()

    # ------------------------------------------------------------ Provider protocol
    def health(self) -> Health:
        result = check_health(self.base_url, self.health_path, client=self._client)
        return Health(result.ok, result.detail, result.checked_at)

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        body = {"content": text, "add_special": add_bos, "parse_special": special}
        return list(self._json("POST", "/tokenize", json=body)["tokens"])

    def detokenize(self, tokens: list[int]) -> str:
        return self._json("POST", "/detokenize", json={"tokens": list(tokens)})["content"]

    def _prompt_tokens(self, request: GenerationRequest) -> list[int]:
        if request.prompt_tokens is not None:
            return list(request.prompt_tokens)
        if request.prompt_text is None:
            raise ProviderError("a generation request needs prompt_tokens or prompt_text")
        return self.tokenize(request.prompt_text, add_bos=True)

    def _completion_body(self, request: GenerationRequest, tokens: list[int], stream: bool) -> dict[str, Any]:
        if request.max_tokens < 0:
            raise ProviderError("max_tokens must be >= 0")
        if not tokens:
            raise ProviderError("the prompt is empty")
        body: dict[str, Any] = {
            "prompt": tokens,
            "n_predict": request.max_tokens,
            "temperature": request.temperature,
            "id_slot": request.slot,
            # The server reuses any common prefix the slot holds; the node's isolation bound
            # (``reuse_limit``: another tenant's private context) may allow less. Then the
            # prompt is evaluated whole (an erase needs --slot-save-path; this does not).
            "cache_prompt": request.reuse_limit is None
            or _shared_prefix(self._context.get(request.slot, ()), tokens) <= request.reuse_limit,
            "return_tokens": True,
            "stream": stream,
        }
        if request.temperature <= 0:
            body["top_k"] = 1  # greedy: the argmax token, whatever the other samplers say
        else:
            body.update(top_k=request.top_k, top_p=request.top_p, min_p=request.min_p)
        body.update(repeat_penalty=request.repeat_penalty, frequency_penalty=request.frequency_penalty,
                    presence_penalty=request.presence_penalty)
        if request.logit_bias:
            body["logit_bias"] = [[token, bias] for token, bias in request.logit_bias.items()]
        if request.grammar:
            body["grammar"] = request.grammar
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = list(request.stop)
        return body

    def _finish(self, request: GenerationRequest, tokens: list[int], final: dict[str, Any],
                completion: list[int], text: str, started: float, first_token_at: float | None) -> GenerationResult:
        timings = final.get("timings") or {}
        prompt_n = int(timings.get("prompt_n", len(tokens)))
        cache_n = int(timings.get("cache_n", 0))
        predicted_n = int(timings.get("predicted_n", len(completion)))
        if prompt_n >= 8 and timings.get("prompt_ms"):
            self._measured.update("prefill", prompt_n / (timings["prompt_ms"] / 1000))
        if predicted_n >= 4 and timings.get("predicted_ms"):
            self._measured.update("decode", predicted_n / (timings["predicted_ms"] / 1000))
        cached = int(final.get("tokens_cached", len(tokens) + max(0, len(completion) - 1)))
        self._context[request.slot] = (tokens + completion)[:cached]
        total = time.monotonic() - started
        if first_token_at is not None:
            ttft = first_token_at - started
        else:  # not streamed: the server's prompt time plus one decode step
            ttft = (timings.get("prompt_ms", 0.0) + timings.get("predicted_per_token_ms", 0.0)) / 1000
        stop_type = final.get("stop_type", "")
        return GenerationResult(
            text=text,
            completion_tokens=completion,
            prompt_tokens=len(tokens),
            cached_tokens=cache_n,
            evaluated_tokens=prompt_n,
            ttft_s=min(ttft, total),
            total_s=total,
            finish_reason="length" if stop_type == "limit" else "stop",
        )

    def generate(self, request: GenerationRequest, *, on_text: TextSink | None = None) -> GenerationResult:
        if on_text is not None:
            return self._generate_streaming(request, on_text)
        tokens = self._prompt_tokens(request)
        started = time.monotonic()
        data = self._json("POST", "/completion", json=self._completion_body(request, tokens, stream=False))
        completion = list(data.get("tokens") or [])[: request.max_tokens] if request.max_tokens else []
        return self._finish(request, tokens, data, completion, data.get("content", "") if request.max_tokens else "",
                            started, None)

    def _generate_streaming(self, request: GenerationRequest, on_text: TextSink) -> GenerationResult:
        """Stream from the slot; a False from ``on_text`` closes the response, which makes
        llama-server stop the task and free the slot."""
        box: list[GenerationResult] = []  # this call's own result: other slots stream at the same time
        if not feed(self._stream(request, box), on_text):
            return box[0]
        tokens = self._prompt_tokens(request)
        self._context.pop(request.slot, None)  # what the slot kept after the cut is unknown
        return GenerationResult(text="", completion_tokens=[], prompt_tokens=len(tokens), cached_tokens=0,
                                evaluated_tokens=len(tokens), ttft_s=0.0, total_s=0.0, finish_reason="cancelled")

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        box: list[GenerationResult] = []
        yield from self._stream(request, box)
        self.last_stream = box[0]

    def _stream(self, request: GenerationRequest, box: list[GenerationResult]) -> Iterator[str]:
        tokens = self._prompt_tokens(request)
        body = self._completion_body(request, tokens, stream=True)
        started = time.monotonic()
        completion: list[int] = []
        pieces: list[str] = []
        first: float | None = None
        final: dict[str, Any] = {}
        try:
            with self._client.stream("POST", "/completion", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ProviderError(f"{self.name}: /completion -> HTTP {response.status_code}: "
                                        f"{self._error_text(response)}")
                for event in sse_events(response):
                    if event.get("stop"):
                        final = event
                        break
                    if first is None:
                        first = time.monotonic()
                    completion += list(event.get("tokens") or [])
                    piece = event.get("content", "")
                    pieces.append(piece)
                    if piece:
                        yield piece
        except httpx.ConnectError:
            raise ProviderUnavailable(f"{self.name}: {self.base_url} refused the connection") from None
        except httpx.RemoteProtocolError:
            raise ProviderCrashed(f"{self.name}: the server closed the connection mid-answer (crashed? see its log)"
                                  ) from None
        box.append(self._finish(request, tokens, final, completion, "".join(pieces), started, first))

    def calibrate(self, *, prompt_tokens: int = 256, decode_tokens: int = 16, slot: int = 0) -> Rates:
        """Measure prefill and decode once, on an idle slot, right after start: the node
        prices a replica from this until its real turns are observed (without it the
        first placements of a fleet have no rate to compare). A short warm-up first,
        below the sizes `_finish` measures: the first decode pays graph allocation."""
        unit = self.tokenize(CALIBRATION_TEXT, add_bos=False)
        tokens = (unit * (prompt_tokens // max(1, len(unit)) + 1))[:prompt_tokens]
        self.generate(GenerationRequest(prompt_tokens=tokens[:4], max_tokens=2, slot=slot, reuse_limit=0))
        self.generate(GenerationRequest(prompt_tokens=tokens, max_tokens=decode_tokens, slot=slot, reuse_limit=0))
        return self.rates()

    def context_tokens(self, slot: int = 0) -> list[int]:
        return list(self._context.get(slot, []))

    def forget_contexts(self) -> None:
        """The server (re)started or was attached: no slot's context is known."""
        self._context.clear()

    # ------------------------------------------------------------ slots
    def slots(self) -> list[dict[str, Any]]:
        return list(self._json("GET", "/slots"))

    def _slot_action(self, slot: int, action: str, filename: str | None = None) -> dict[str, Any]:
        if slot < 0:
            raise ProviderError(f"slot must be >= 0, got {slot}")
        body = {"filename": filename} if filename is not None else {}
        response = self._request("POST", f"/slots/{slot}", params={"action": action}, json=body)
        if response.status_code == 501:
            raise StateUnsupported(f"{self.name}: slot {action} is off (start llama-server with --slot-save-path)")
        if response.status_code >= 400:
            message = self._error_text(response)
            if action == "restore":
                raise StateCorrupt(f"{self.name}: slot {slot} restore of {filename!r} refused: {message}")
            raise ProviderError(f"{self.name}: slot {slot} {action} -> HTTP {response.status_code}: {message}")
        return response.json()

    def erase(self, slot: int) -> int:
        """Drop the slot's KV; returns the tokens erased."""
        result = self._slot_action(slot, "erase")
        self._context.pop(slot, None)
        return int(result.get("n_erased", 0))

    def _require_slot_dir(self) -> Path:
        if self.slot_dir is None:
            raise StateUnsupported(f"{self.name}: no slot-save directory configured")
        return self.slot_dir

    def save_state(self, slot: int, path: Path) -> SavedState:
        """Save ``slot`` to ``path`` (anywhere: a tier directory), with a sidecar."""
        slot_dir = self._require_slot_dir()
        path = Path(path)
        filename = f".am-save-{uuid.uuid4().hex}.bin"
        staged = slot_dir / filename
        started = time.monotonic()
        try:
            result = self._slot_action(slot, "save", filename)
            _fsync_file(staged)
            size = staged.stat().st_size
            digest = file_sha256(staged)
            _place(staged, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
        elapsed = time.monotonic() - started
        n_tokens = int(result.get("n_saved", 0))
        atomic_write_text(meta_path(path), json.dumps({
            "sha256": digest, "size_bytes": size, "n_tokens": n_tokens, "provider": "llama_server",
            "model": self.spec.model.digest if self.spec else None, "saved_at": time.time(),
        }, sort_keys=True) + "\n")
        save_ms = float((result.get("timings") or {}).get("save_ms", 0.0))
        if save_ms > 0:
            self._measured.update("save", size / (save_ms / 1000))
        return SavedState(path=path, n_tokens=n_tokens, size_bytes=size, save_s=elapsed)

    def restore_state(self, slot: int, path: Path, *, verify: bool = True) -> RestoredState:
        """Restore ``path`` into ``slot`` (any slot, not only the one it came from).

        Raises `StateCorrupt` for a digest or size mismatch (checked before the
        server reads the file) or a file the server refuses; the slot is then
        empty. With ``verify`` (the default) a file without its sidecar is
        refused too: llama-server aborts the whole process on some truncated
        state files (``GGML_ASSERT(nread <= state_size)`` in
        ``state_seq_load_file``), so only files whose size and digest we
        recorded at save time are handed to it.
        """
        slot_dir = self._require_slot_dir()
        path = Path(path)
        try:
            if verify and verify_state_file(path) is None:
                raise StateCorrupt(f"{path}: no {META_SUFFIX} sidecar with its digest; refusing an unverified "
                                   "state (a truncated file can abort llama-server)")
            tokens = read_slot_file_tokens(path)
        except StateCorrupt:
            self._context.pop(slot, None)
            with contextlib.suppress(ProviderError):
                self._slot_action(slot, "erase")
            raise
        filename = f".am-restore-{uuid.uuid4().hex}.bin"
        staged = slot_dir / filename
        started = time.monotonic()
        try:
            try:
                os.link(path, staged)
            except OSError:
                shutil.copyfile(path, staged)
            try:
                result = self._slot_action(slot, "restore", filename)
            except StateCorrupt:
                self._context.pop(slot, None)
                raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
        restored = int(result.get("n_restored", 0))
        self._context[slot] = tokens[:restored]
        # The server times the restore itself; the request's wall time also holds its wait
        # for the batch other slots are running (seconds, against a ~1 ms restore).
        restore_ms = float((result.get("timings") or {}).get("restore_ms", 0.0))
        n_read = int(result.get("n_read", 0)) or path.stat().st_size
        restore_s = restore_ms / 1000 if restore_ms > 0 else time.monotonic() - started
        self._measured.update("restore", n_read / restore_s)
        return RestoredState(n_tokens=restored, size_bytes=n_read, restore_s=restore_s)

    def prepare_slot(self, slot: int, prompt_tokens: list[int], candidate: Path | None) -> SlotPreparation:
        """Make ``slot`` hold as much of ``prompt_tokens`` as possible before a turn.

        A candidate state is restored only if its tokens are a prefix of the
        prompt; a corrupt or mismatched candidate is reported in ``reason``
        and the prompt is recomputed instead (prefill with no generation), so
        the turn that follows starts from a correct context either way.
        """
        reason = ""
        if candidate is not None:
            try:
                held = read_slot_file_tokens(candidate)
                if held != prompt_tokens[: len(held)]:
                    reason = f"{candidate}: its {len(held)} tokens are not a prefix of the prompt"
                else:
                    restored = self.restore_state(slot, candidate)
                    return SlotPreparation(slot, restored.n_tokens, 0, "restored")
            except StateCorrupt as exc:
                reason = str(exc)
        if not prompt_tokens:
            return SlotPreparation(slot, 0, 0, "empty", reason)
        if reason:
            with contextlib.suppress(ProviderError):
                self.erase(slot)
        result = self.generate(GenerationRequest(prompt_tokens=prompt_tokens, max_tokens=0, slot=slot))
        return SlotPreparation(slot, 0, result.evaluated_tokens, "recomputed", reason)

    # ------------------------------------------------------------ metrics, rates
    def metrics(self) -> dict[str, float]:
        """``/metrics`` (needs ``--metrics``) as {name: value}, labels summed."""
        response = self._request("GET", "/metrics")
        if response.status_code == 501:
            raise ProviderError(f"{self.name}: metrics are off (start llama-server with --metrics)")
        if response.status_code >= 400:
            raise ProviderError(f"{self.name}: /metrics -> HTTP {response.status_code}")
        return parse_prometheus(response.text)

    def rates(self) -> Rates:
        return self._measured.snapshot()

    # ------------------------------------------------------------ OpenAI pass-through
    def models(self) -> dict[str, Any]:
        return self._json("GET", "/v1/models")

    def completions(self, body: dict[str, Any]) -> dict[str, Any] | Iterator[dict[str, Any]]:
        return self._openai("/v1/completions", body)

    def chat_completions(self, body: dict[str, Any]) -> dict[str, Any] | Iterator[dict[str, Any]]:
        return self._openai("/v1/chat/completions", body)

    def _openai(self, path: str, body: dict[str, Any]) -> dict[str, Any] | Iterator[dict[str, Any]]:
        if body.get("stream"):
            return self._openai_stream(path, body)
        return self._json("POST", path, json=body)

    def _openai_stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        with self._client.stream("POST", path, json=body) as response:
            if response.status_code >= 400:
                response.read()
                raise ProviderError(f"{self.name}: {path} -> HTTP {response.status_code}: {self._error_text(response)}")
            yield from sse_events(response)


def sse_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """JSON events of a server-sent-event stream, until ``[DONE]`` or the end."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        if payload:
            yield json.loads(payload)


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text → {sample name: value}; samples that differ only by
    labels are summed (one engine, possibly several label sets)."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
    return values


# ------------------------------------------------------------------ the binary
BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build-llama-server.sh"


def locate_llama_server(build: bool = False, timeout_s: float = 3600) -> tuple[Path | None, str]:
    """Find a ``llama-server`` binary: ``$AGENT_MACHINE_LLAMA_SERVER``, the
    cache of ``scripts/build-llama-server.sh`` (building it when ``build``),
    then ``PATH``. Returns (path, how it was found) or (None, why not)."""
    import subprocess

    configured = os.environ.get("AGENT_MACHINE_LLAMA_SERVER")
    if configured:
        path = Path(configured)
        if os.access(path, os.X_OK):
            return path, "from AGENT_MACHINE_LLAMA_SERVER"
        return None, f"AGENT_MACHINE_LLAMA_SERVER={configured} is not an executable file"
    reasons = []
    if BUILD_SCRIPT.exists():
        args = [str(BUILD_SCRIPT)] + ([] if build else ["--path"])
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            done = subprocess.CompletedProcess(args, 124, "", f"build did not finish in {timeout_s:g}s")
        lines = done.stdout.strip().splitlines()
        if done.returncode == 0 and lines and os.access(lines[-1], os.X_OK):
            return Path(lines[-1]), f"built by {BUILD_SCRIPT.name}"
        reasons.append(f"{BUILD_SCRIPT.name}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
    else:
        reasons.append(f"{BUILD_SCRIPT} not found (not a source checkout)")
    found = shutil.which("llama-server")
    if found:
        return Path(found), "from PATH"
    reasons.append("no llama-server on PATH")
    return None, "; ".join(reasons)
