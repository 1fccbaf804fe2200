"""HTTP health of a provider, as every engine here reports it: ``GET <path>``
answers 200 when ready, 503 while the model loads (llama-server), and the
connection is refused before the server listens."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Literal

import httpx

HealthState = Literal["ok", "loading", "down", "error"]


@dataclass(frozen=True)
class HttpHealth:
    state: HealthState
    detail: str
    checked_at: float

    @property
    def ok(self) -> bool:
        return self.state == "ok"


def check_health(base_url: str, path: str = "/health", timeout_s: float = 2.0,
                 client: httpx.Client | None = None) -> HttpHealth:
    url = base_url.rstrip("/") + path
    now = time.time()
    try:
        if client is not None:
            response = client.get(url, timeout=timeout_s)
        else:
            response = httpx.get(url, timeout=timeout_s)
    except httpx.ConnectError:
        return HttpHealth("down", "connection refused", now)
    except httpx.TimeoutException:
        return HttpHealth("error", f"no answer within {timeout_s:g}s", now)
    except httpx.HTTPError as exc:
        return HttpHealth("error", f"{type(exc).__name__}: {exc}", now)
    if response.status_code == 200:
        return HttpHealth("ok", "ok", now)
    if response.status_code == 503:
        return HttpHealth("loading", "loading model", now)
    return HttpHealth("error", f"HTTP {response.status_code}: {response.text[:200]}", now)


class StartFailed(RuntimeError):
    """The provider did not become healthy; the message says what was seen."""


def wait_healthy(
    base_url: str,
    path: str,
    timeout_s: float,
    *,
    still_running: Callable[[], str | None] | None = None,
    interval_s: float = 0.2,
) -> HttpHealth:
    """Poll until healthy. ``still_running`` returns None while the process or
    container lives, else a reason (with its log tail) — then we fail at once
    instead of waiting out the timeout."""
    deadline = time.monotonic() + timeout_s
    last = HttpHealth("down", "not checked yet", time.time())
    with httpx.Client() as client:
        while True:
            last = check_health(base_url, path, client=client)
            if last.ok:
                return last
            if still_running is not None:
                reason = still_running()
                if reason is not None:
                    raise StartFailed(reason)
            if time.monotonic() >= deadline:
                raise StartFailed(f"{base_url}{path} not healthy after {timeout_s:g}s (last: {last.detail})")
            time.sleep(interval_s)
