"""vLLM's OpenAI-compatible server as a `Provider`.

vLLM keeps its KV cache to itself: prefix caching (``--enable-prefix-caching``)
reuses blocks inside the engine (tier T0) and the agent cannot save or
restore them, so `save_state`/`restore_state`/`context_tokens` raise
`StateUnsupported`. What the scheduler gets instead is `metrics()`: KV-cache
usage and prefix-cache hit counters from ``/metrics``.

Metric names (vLLM V1 engine, documented under "Production Metrics"):
``vllm:kv_cache_usage_perc`` (gauge, 0..1), ``vllm:prefix_cache_queries_total``
and ``vllm:prefix_cache_hits_total`` (counters, in tokens),
``vllm:num_requests_running|waiting``, ``vllm:prompt_tokens_total``,
``vllm:generation_tokens_total``. Older releases named them
``vllm:gpu_cache_usage_perc`` and ``vllm:gpu_prefix_cache_queries|hits``;
both spellings are read. Samples carry ``model_name`` and ``engine`` labels:
counters are summed over engines, usage is averaged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx

from nodeagent.contracts.provider import ProviderSpec
from nodeagent.launch.health import check_health
from nodeagent.providers.base import (
    MeasuredRates,
    GenerationRequest,
    GenerationResult,
    Health,
    ProviderError,
    ProviderUnavailable,
    Rates,
    RestoredState,
    SavedState,
    StateUnsupported,
    TextSink,
    feed,
)
from nodeagent.providers.llama_server import Launcher, sse_events


# canonical field -> metric names that carry it, newest first
_GAUGES_MEAN = {"kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")}
_GAUGES_SUM = {
    "requests_running": ("vllm:num_requests_running",),
    "requests_waiting": ("vllm:num_requests_waiting",),
}
_COUNTERS = {
    "prefix_cache_queries": ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"),
    "prefix_cache_hits": ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"),
    "prompt_tokens": ("vllm:prompt_tokens_total",),
    "generation_tokens": ("vllm:generation_tokens_total",),
    "preemptions": ("vllm:num_preemptions_total",),
}


@dataclass(frozen=True)
class VllmMetrics:
    kv_cache_usage: float | None  # fraction of KV blocks in use, 0..1
    prefix_cache_queries: float | None  # tokens looked up in the prefix cache (counter)
    prefix_cache_hits: float | None  # of those, tokens found (counter)
    requests_running: float | None
    requests_waiting: float | None
    prompt_tokens: float | None
    generation_tokens: float | None
    preemptions: float | None

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        if not self.prefix_cache_queries:
            return None
        return (self.prefix_cache_hits or 0.0) / self.prefix_cache_queries


def parse_vllm_metrics(text: str) -> VllmMetrics:
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(float(sample.value))

    def first(names: tuple[str, ...]) -> list[float] | None:
        for name in names:
            if name in samples:
                return samples[name]
        return None

    values: dict[str, float | None] = {}
    for key, names in _GAUGES_MEAN.items():
        found = first(names)
        values[key] = sum(found) / len(found) if found else None
    for key, names in {**_GAUGES_SUM, **_COUNTERS}.items():
        found = first(names)
        values[key] = sum(found) if found else None
    return VllmMetrics(**values)  # type: ignore[arg-type]


class VllmProvider:
    kind = "vllm"

    def __init__(self, name: str, base_url: str, *, served_model: str, spec: ProviderSpec | None = None,
                 launcher: Launcher | None = None, timeout_s: float = 600.0) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.served_model = served_model
        self.spec = spec
        self.launcher = launcher
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout_s)
        self._measured = MeasuredRates()

    @classmethod
    def from_spec(cls, spec: ProviderSpec, launcher: Launcher | None = None, **kwargs: Any) -> "VllmProvider":
        if spec.provider_kind != "vllm":
            raise ProviderError(f"{spec.name} is a {spec.provider_kind} spec, not vllm")
        served = spec.model.name or Path(spec.model.path).name
        return cls(spec.name, spec.base_url, served_model=served, spec=spec, launcher=launcher, **kwargs)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self.spec is None or self.launcher is None:
            raise ProviderError(f"{self.name}: attached to {self.base_url}; it has no spec/launcher to start")
        self.launcher.up(self.spec, wait=True)

    def stop(self) -> None:
        if self.launcher is not None:
            self.launcher.down(self.name, missing_ok=True)

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------ HTTP
    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise ProviderUnavailable(f"{self.name}: {self.base_url} refused the connection (not running?)") from None
        except httpx.TimeoutException:
            raise ProviderUnavailable(f"{self.name}: {method} {path} timed out") from None
        if response.status_code >= 400:
            try:
                detail = response.json()
                message = detail.get("message") or detail.get("error", {}).get("message") or response.text
            except ValueError:
                message = response.text[:500]
            raise ProviderError(f"{self.name}: {method} {path} -> HTTP {response.status_code}: {message}")
        return response.json()

    # ------------------------------------------------------------ Provider protocol
    def health(self) -> Health:
        result = check_health(self.base_url, "/health", client=self._client)
        return Health(result.ok, result.detail, result.checked_at)

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        # vLLM's Hugging Face tokenizer always parses special-token text.
        data = self._json("POST", "/tokenize", json={"model": self.served_model, "prompt": text,
                                                      "add_special_tokens": add_bos})
        return list(data["tokens"])

    def detokenize(self, tokens: list[int]) -> str:
        return self._json("POST", "/detokenize", json={"model": self.served_model, "tokens": list(tokens)})["prompt"]

    def _body(self, request: GenerationRequest, stream: bool) -> dict[str, Any]:
        if request.prompt_tokens is None and request.prompt_text is None:
            raise ProviderError("a generation request needs prompt_tokens or prompt_text")
        body: dict[str, Any] = {
            "model": self.served_model,
            "prompt": list(request.prompt_tokens) if request.prompt_tokens is not None else request.prompt_text,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "stream": stream,
            "return_token_ids": True,  # vLLM >= 0.10.2: prompt_token_ids / token_ids in the choice
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        if request.grammar:
            raise ProviderError(f"{self.name}: vLLM takes no GBNF grammar; JSON output needs a llama.cpp provider")
        if request.temperature > 0:
            body.update(top_p=request.top_p, min_p=request.min_p)
            if request.top_k > 0:
                body["top_k"] = request.top_k
        body.update(frequency_penalty=request.frequency_penalty, presence_penalty=request.presence_penalty,
                    repetition_penalty=request.repeat_penalty)
        if request.logit_bias:
            body["logit_bias"] = {str(token): bias for token, bias in request.logit_bias.items()}
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = list(request.stop)
        return body

    def _result(self, request: GenerationRequest, choice: dict[str, Any], usage: dict[str, Any],
                text: str, token_ids: list[int], started: float, first: float | None) -> GenerationResult:
        total = time.monotonic() - started
        prompt_tokens = int(usage.get("prompt_tokens", len(request.prompt_tokens or [])))
        details = usage.get("prompt_tokens_details") or {}
        cached = int(details.get("cached_tokens") or 0)
        completion = int(usage.get("completion_tokens", len(token_ids)))
        if first is not None and prompt_tokens - cached >= 8 and first - started > 0:
            self._measured.update("prefill", (prompt_tokens - cached) / (first - started))
        if first is not None and completion >= 4 and total - (first - started) > 0:
            self._measured.update("decode", (completion - 1) / (total - (first - started)))
        return GenerationResult(
            text=text,
            completion_tokens=token_ids,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached,
            evaluated_tokens=prompt_tokens - cached,
            ttft_s=(first - started) if first is not None else total,
            total_s=total,
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
        )

    def generate(self, request: GenerationRequest, *, on_text: TextSink | None = None) -> GenerationResult:
        if on_text is not None:
            if not feed(self.stream(request), on_text):
                return self.last_stream
            return GenerationResult(text="", completion_tokens=[], prompt_tokens=len(request.prompt_tokens or []),
                                    cached_tokens=0, evaluated_tokens=len(request.prompt_tokens or []), ttft_s=0.0,
                                    total_s=0.0, finish_reason="cancelled")
        started = time.monotonic()
        data = self._json("POST", "/v1/completions", json=self._body(request, stream=False))
        choice = data["choices"][0]
        return self._result(request, choice, data.get("usage") or {}, choice.get("text", ""),
                            list(choice.get("token_ids") or []), started, None)

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        started = time.monotonic()
        first: float | None = None
        pieces: list[str] = []
        token_ids: list[int] = []
        choice: dict[str, Any] = {}
        usage: dict[str, Any] = {}
        with self._client.stream("POST", "/v1/completions", json=self._body(request, stream=True)) as response:
            if response.status_code >= 400:
                response.read()
                raise ProviderError(f"{self.name}: /v1/completions -> HTTP {response.status_code}: {response.text[:500]}")
            for event in sse_events(response):
                if event.get("usage"):
                    usage = event["usage"]
                for item in event.get("choices") or []:
                    choice = item
                    piece = item.get("text") or ""
                    token_ids += list(item.get("token_ids") or [])
                    if piece:
                        if first is None:
                            first = time.monotonic()
                        pieces.append(piece)
                        yield piece
        self.last_stream = self._result(request, choice, usage, "".join(pieces), token_ids, started, first)

    def context_tokens(self, slot: int = 0) -> list[int]:
        raise StateUnsupported(f"{self.name}: vLLM keeps its prefix cache internally; no per-slot context")

    def save_state(self, slot: int, path: Path) -> SavedState:
        raise StateUnsupported(f"{self.name}: vLLM cannot save KV state to a file (tiering is left to vLLM)")

    def restore_state(self, slot: int, path: Path, *, verify: bool = True) -> RestoredState:
        raise StateUnsupported(f"{self.name}: vLLM cannot restore KV state from a file (tiering is left to vLLM)")

    def rates(self) -> Rates:
        return self._measured.snapshot()

    # ------------------------------------------------------------ extras
    def metrics(self) -> VllmMetrics:
        try:
            response = self._client.get("/metrics")
        except httpx.ConnectError:
            raise ProviderUnavailable(f"{self.name}: {self.base_url} refused the connection") from None
        if response.status_code >= 400:
            raise ProviderError(f"{self.name}: /metrics -> HTTP {response.status_code}")
        return parse_vllm_metrics(response.text)

    def models(self) -> dict[str, Any]:
        return self._json("GET", "/v1/models")

    def completions(self, body: dict[str, Any]) -> dict[str, Any] | Iterator[dict[str, Any]]:
        return self._openai("/v1/completions", body)

    def chat_completions(self, body: dict[str, Any]) -> dict[str, Any] | Iterator[dict[str, Any]]:
        return self._openai("/v1/chat/completions", body)

    def _openai(self, path: str, body: dict[str, Any]) -> dict[str, Any] | Iterator[dict[str, Any]]:
        body = {"model": self.served_model, **body}
        if body.get("stream"):
            return self._openai_stream(path, body)
        return self._json("POST", path, json=body)

    def _openai_stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        with self._client.stream("POST", path, json=body) as response:
            if response.status_code >= 400:
                response.read()
                raise ProviderError(f"{self.name}: {path} -> HTTP {response.status_code}: {response.text[:500]}")
            yield from sse_events(response)
