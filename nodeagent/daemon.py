"""`agent-machine serve`: the API on its sockets plus the node's background duties.

Start-up, in order (each step's failure stops start-up with a clear message):

1. load the config; build the `Node`; ``node.start()`` recovers from SQLite
   (pods that were in flight when the last process died end Failed with
   reason ``agent-restart``) and starts the pod dispatchers;
2. take the listening sockets: those systemd passed (socket activation), else
   bind the Unix socket (0600 inside a 0700 directory) and, only when
   ``api.tcp`` is set *and* a token is configured, a TCP socket;
3. serve the API (uvicorn) on them; once every listener accepts, tell systemd
   ``READY=1`` with a one-line ``STATUS=``;
4. run the watchdog (``WATCHDOG=1`` every half ``$WATCHDOG_USEC``, only while
   the event loop turns and the pod dispatchers live) and the reconcile loop
   (``node.reconcile_once()`` every ``reconcile.interval_s``).

Signals: SIGTERM/SIGINT drain (``STOPPING=1``; the API keeps answering reads
while new pods get 503; in-flight pods finish or are cancelled by
``node.drain``), then the servers stop, the node closes and the socket file is
removed. SIGHUP reloads the configuration (``node.reload(loaded)`` when the node
has it); listener settings need a restart and say so in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import signal
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from nodeagent.config import ConfigError, LoadedConfig, load_config
from nodeagent.fleet import FleetError
from nodeagent.fsutil import ensure_private_dir, restrict_umask
from nodeagent.notify import Notifier, listen_fds, watchdog_interval
from nodeagent.paths import APP

log = logging.getLogger("agent_machine.daemon")

DEFAULT_DRAIN_TIMEOUT_S = 30.0


class ServeError(RuntimeError):
    """Start-up cannot proceed; the message says what to change."""


@dataclass
class Listener:
    sock: socket.socket
    kind: Literal["unix", "tcp"]
    label: str  # unix:/run/agent-machine/api.sock, tcp:127.0.0.1:8377
    owned_path: Path | None = None  # a socket file we created and remove on exit


# ---------------------------------------------------------------- sockets
def parse_tcp(value: str) -> tuple[str, int]:
    """'127.0.0.1:8377' / '[::1]:8377' / 'localhost:8377' -> (host, port)."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ServeError(f"api.tcp must be HOST:PORT (e.g. 127.0.0.1:8377; port 0 picks a free one), got {value!r}")
    return host.strip("[]"), int(port)


SocketDirState = Literal["missing", "private", "ours-open"]


def socket_dir_state(directory: Path) -> SocketDirState:
    """How `serve` finds the API socket's directory (`doctor` asks the same).

    ``missing``: it is created 0700; ``private``: used as it is;
    ``ours-open``: our own directory (ours, and named agent-machine or
    directly under one) open to others, tightened to 0700. Any other
    directory open to others raises ServeError rather than being changed,
    since it may be shared (``/tmp``).
    """
    if not directory.exists():
        return "missing"
    info = directory.stat()
    mode = stat.S_IMODE(info.st_mode)
    if not mode & 0o077:
        return "private"
    if info.st_uid == os.getuid() and APP in (directory.name, directory.parent.name):
        return "ours-open"
    raise ServeError(f"the API socket's directory {directory} has mode {mode:o}: others could reach the "
                     f"socket. Use a private directory (chmod 700 {directory}) or set api.socket elsewhere")


def _prepare_socket_dir(directory: Path) -> None:
    """Make sure only we can reach into ``directory`` (0700), or refuse it (`socket_dir_state`)."""
    socket_dir_state(directory)
    ensure_private_dir(directory)


def _refuse_non_socket(path: Path) -> None:
    if (path.exists() or path.is_symlink()) and not stat.S_ISSOCK(path.lstat().st_mode):
        raise ServeError(f"{path} exists and is not a socket; move it away or set api.socket")


def bind_unix(path: Path) -> socket.socket:
    """Bind a stream socket at ``path`` with mode 0600 in a 0700 directory.

    A leftover socket file from a crashed agent is removed; a live one (another
    agent answers) is an error rather than a silent takeover.
    """
    _prepare_socket_dir(path.parent)
    _refuse_non_socket(path)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: nobody listens
        else:
            raise ServeError(f"another agent is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is 0600 from the moment it exists
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot bind the API socket {path}: {exc.strerror}") from exc
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a name such as localhost
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hint = " (another process uses the port)" if exc.errno == errno.EADDRINUSE else ""
        raise ServeError(f"cannot bind api.tcp {host}:{port}: {exc.strerror}{hint}") from exc
    sock.listen(128)
    return sock


def _label(sock: socket.socket) -> tuple[Literal["unix", "tcp"], str]:
    if sock.family == socket.AF_UNIX:
        name = sock.getsockname()
        name = name.decode(errors="replace") if isinstance(name, bytes) else name
        return "unix", f"unix:{name or '(unnamed)'}"
    host, port = sock.getsockname()[:2]
    return "tcp", f"tcp:{host}:{port}"


def socket_path(loaded: LoadedConfig) -> Path:
    """The Unix socket `serve` binds when systemd passes none: ``api.socket``, else <runtime>/api.sock."""
    api = loaded.config.api
    return Path(api.socket) if api.socket else loaded.paths.api_socket


def check_listen_config(loaded: LoadedConfig, token: str | None) -> Path:
    """What `open_listeners` refuses before it binds anything; `doctor` runs the same checks.

    TCP without a token, a malformed ``api.tcp``, a socket directory others
    can reach that is not ours, a non-socket at the socket's path. Returns
    the Unix socket's path.
    """
    api = loaded.config.api
    if api.tcp and not token:
        raise ServeError(f"api.tcp is set ({api.tcp}) but no token is configured: TCP is only served with a "
                         "bearer token. Set api.token_file to a 0600 file holding one.")
    if api.tcp:
        parse_tcp(api.tcp)
    path = socket_path(loaded)
    socket_dir_state(path.parent)
    _refuse_non_socket(path)
    return path


def open_listeners(loaded: LoadedConfig, token: str | None, env: dict[str, str] | None = None) -> list[Listener]:
    """Sockets handed over by systemd, else the configured ones. TCP always needs ``token``."""
    activated = listen_fds(env) if env is not None else listen_fds()
    listeners: list[Listener] = []
    if activated:
        for sock in activated:
            if sock.type != socket.SOCK_STREAM:
                raise ServeError(f"systemd passed a non-stream socket (fd {sock.fileno()}); use ListenStream=")
            kind, label = _label(sock)
            if kind == "tcp" and not token:
                raise ServeError(f"systemd passed a TCP socket ({label}) but no API token is configured: "
                                 "set api.token_file (or the api-token credential), or listen on a Unix socket")
            listeners.append(Listener(sock, kind, label))
        return listeners
    api = loaded.config.api
    path = check_listen_config(loaded, token)
    unix = bind_unix(path)
    listeners.append(Listener(unix, "unix", f"unix:{path}", owned_path=path))
    if api.tcp:
        host, port = parse_tcp(api.tcp)
        try:
            tcp = bind_tcp(host, port)
        except ServeError:
            close_listeners(listeners)
            raise
        listeners.append(Listener(tcp, "tcp", _label(tcp)[1]))
    return listeners


def close_listeners(listeners: list[Listener]) -> None:
    for listener in listeners:
        with contextlib.suppress(OSError):
            listener.sock.close()
        if listener.owned_path is not None:
            with contextlib.suppress(FileNotFoundError):
                listener.owned_path.unlink()


# ---------------------------------------------------------------- the daemon
def _uvicorn_server(app: Any, *, access_log: bool, graceful_s: float) -> Any:
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn without its own signal handling: the daemon owns SIGTERM/SIGINT/SIGHUP."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=access_log,
                            timeout_graceful_shutdown=int(graceful_s), server_header=False)
    return _Server(config)


@dataclass
class Daemon:
    node: Any
    listeners: list[Listener]
    token: str | None
    notifier: Notifier
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    access_log: bool = False
    reload_config: Callable[[], LoadedConfig] = load_config
    recovered: list[str] = field(default_factory=list)
    credentials: Any = None  # nodeagent.credentials.CredentialSet; None: the admin token alone
    _stop: asyncio.Event | None = None
    _stop_reason: str = ""
    _servers: list[Any] = field(default_factory=list)

    # ------------------------------------------------------------ status
    def summary(self) -> str:
        from nodeagent.api.routes.health import pod_phase_counts
        from nodeagent.contracts.pod import TERMINAL_PHASES, PodPhase

        counts = pod_phase_counts(self.node)
        in_flight = sum(n for phase, n in counts.items() if PodPhase(phase) not in TERMINAL_PHASES)
        state = "ready" if self.node.ready() else ("draining" if not self.node.accepting else "not ready")
        where = ", ".join(listener.label for listener in self.listeners)
        detail = f"{in_flight} pod(s) in flight"
        status_line = getattr(self.node, "status_line", None)
        if status_line is not None:
            try:
                detail = status_line()
            except Exception:  # noqa: BLE001 - a status line must never fail the caller
                pass
        return f"{state}; {detail}; listening on {where}"

    # ------------------------------------------------------------ run
    async def run(self) -> None:
        from nodeagent.api import create_app
        from nodeagent.api.auth import Authenticate, open_paths
        from nodeagent.credentials import CredentialSet

        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = create_app(self.node, listeners=[listener.label for listener in self.listeners])
        unix = [lst.sock for lst in self.listeners if lst.kind == "unix"]
        tcp = [lst.sock for lst in self.listeners if lst.kind == "tcp"]
        credentials = self.credentials if self.credentials is not None else CredentialSet(None, self.token)
        # Every listener resolves the request's principal; only TCP insists on a token.
        def paths_open() -> frozenset[str]:
            return open_paths(self.node.config.api)

        plan = [(Authenticate(app, credentials, token_required=False), unix)] if unix else []
        if tcp:
            assert self.token, "open_listeners refuses TCP without a token"
            plan.append((Authenticate(app, credentials, token_required=True, paths_open=paths_open), tcp))
        for sock in unix + tcp:
            sock.setblocking(False)
        serve_tasks = []
        for asgi, socks in plan:
            server = _uvicorn_server(asgi, access_log=self.access_log, graceful_s=5)
            self._servers.append(server)
            serve_tasks.append(asyncio.create_task(server.serve(sockets=socks)))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, signal.Signals(sig).name)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))

        while not all(server.started for server in self._servers):
            failed = [task for task in serve_tasks if task.done()]
            if failed:
                failed[0].result()  # re-raise what stopped it
                raise ServeError("the API server stopped during start-up")
            await asyncio.sleep(0.01)
        self.notifier.ready(self.summary())
        log.info("agent-machine ready: %s%s", self.summary(),
                 f"; recovered {len(self.recovered)} pod(s) as Failed (agent-restart)" if self.recovered else "")
        threading.Thread(target=self._warm_profile, name="warm-profile", daemon=True).start()
        background = [asyncio.create_task(self._watchdog()), asyncio.create_task(self._reconcile())]
        try:
            await self._stop.wait()
        finally:
            log.info("stopping (%s): draining pods for up to %gs", self._stop_reason, self.drain_timeout_s)
            self.notifier.stopping(f"draining ({self._stop_reason})")
            await asyncio.to_thread(self.node.drain, self.drain_timeout_s)
            for task in background:
                task.cancel()
            for server in self._servers:
                server.should_exit = True
            await asyncio.gather(*serve_tasks, *background, return_exceptions=True)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def request_stop(self, reason: str = "requested") -> None:
        if self._stop is not None and not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    async def reload(self) -> None:
        self.notifier.reloading()
        try:
            loaded = await asyncio.to_thread(self.reload_config)  # validate before touching the node
        except (ConfigError, ValueError) as exc:
            log.error("config reload failed, keeping the running configuration: %s", exc)
            self.notifier.send(READY=1, STATUS=f"{self.summary()}; last reload failed: {exc}")
            return
        old_api = self.node.config.api
        reload = getattr(self.node, "reload", None)
        try:
            if reload is None:
                # Node reads its config on every use; swapping it applies limits and intervals.
                self.node.loaded, self.node.config = loaded, loaded.config
            elif _takes_argument(reload):
                await asyncio.to_thread(reload, loaded)
            else:
                await asyncio.to_thread(reload)  # the node re-reads the same file itself
        except Exception as exc:  # noqa: BLE001 - a failed reload must not stop the agent
            log.exception("node reload failed")
            self.notifier.send(READY=1, STATUS=f"{self.summary()}; last reload failed: {exc}")
            return
        new_api = self.node.config.api
        if (old_api.socket, old_api.tcp, old_api.token_file, old_api.credentials_file) != \
                (new_api.socket, new_api.tcp, new_api.token_file, new_api.credentials_file):
            log.warning("api.socket/api.tcp/api.token_file/api.credentials_file changed: restart the agent to "
                        "apply them (the credentials file's content applies at once)")
        log.info("configuration reloaded from %s", loaded.file)
        self.notifier.send(READY=1, STATUS=self.summary())

    # ------------------------------------------------------------ background duties
    def _warm_profile(self) -> None:
        """Probe once in the background so the first GET /v1/machine is served from cache."""
        try:
            self.node.machine()
        except Exception as exc:  # noqa: BLE001 - the API reports probe errors on request
            log.warning("machine probe failed (GET /v1/machine will retry): %s: %s", type(exc).__name__, exc)

    def _dispatchers_alive(self) -> bool:
        # A dispatcher that died is restarted here too (its pod ends Failed with a
        # receipt); only one that cannot be brought back withholds the ping.
        self.node.supervise_dispatchers()
        return not self.node.accepting or bool(self.node.ready())

    async def _watchdog(self) -> None:
        interval = watchdog_interval()
        if interval is None:
            return
        while True:
            # Runs on the event loop: a stuck loop (or dead dispatchers) stops the pings
            # and systemd restarts us.
            if self._dispatchers_alive():
                self.notifier.watchdog()
            else:
                log.error("pod dispatchers died: withholding the watchdog ping so systemd restarts the agent")
            await asyncio.sleep(interval)

    async def _reconcile(self) -> None:
        last_status = ""
        await asyncio.to_thread(self._keep_features)
        while True:
            await asyncio.sleep(float(self.node.config.reconcile.interval_s))
            await asyncio.to_thread(self._keep_features)
            step = getattr(self.node, "reconcile_once", None)
            if step is not None:
                began = time.monotonic()
                try:
                    await asyncio.to_thread(step)
                except Exception:  # noqa: BLE001 - one failed pass must not end the loop
                    log.exception("reconcile pass failed")
                else:
                    log.debug("reconcile pass took %.3fs", time.monotonic() - began)
            status = await asyncio.to_thread(self.summary)
            if status != last_status:
                self.notifier.status(status)
                last_status = status

    def _keep_features(self) -> None:
        """``[cluster] nfd_dir``: keep the node's NFD feature file there current (`nodeagent.probe.nfd`)."""
        cluster = getattr(getattr(self.node, "config", None), "cluster", None)
        if cluster is None or not cluster.nfd_dir:
            return
        from nodeagent.probe.nfd import FeatureFileKeeper

        keeper = getattr(self, "_features", None)
        if keeper is None or str(keeper.directory) != cluster.nfd_dir or keeper.expiry_s != cluster.nfd_expiry_s:
            keeper = self._features = FeatureFileKeeper(cluster.nfd_dir, cluster.nfd_expiry_s)
        try:
            keeper.update(self.node)
        except Exception:  # noqa: BLE001 - labels are a courtesy; the node serves without them
            log.exception("could not write the NFD feature file into %s", cluster.nfd_dir)


def _takes_argument(function: Callable[..., Any]) -> bool:
    import inspect

    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in parameters)


def default_node(loaded: LoadedConfig) -> Any:
    """The production node: the embedded executor (models, providers, KV tiers, receipts) when wired."""
    from nodeagent import node as node_module

    factory = getattr(node_module, "default_executor", None)
    return node_module.Node(loaded, executor_factory=factory)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (lower API latency), else asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _configure_logging(level: str) -> None:
    under_journal = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s" if under_journal else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    chosen = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=chosen, format=fmt)
    # httpx logs every request at INFO: each replica's health check every few seconds and
    # every slot action would fill the journal. They show at debug.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(max(chosen, logging.WARNING) if chosen > logging.DEBUG else chosen)


def load_start(loaded: LoadedConfig | None = None,
               env: dict[str, str] | None = None) -> tuple[LoadedConfig, str | None, Any]:
    """What `serve` reads before it builds the node: (config, API token, credentials).

    Raises ConfigError, TokenError or CredentialsError (all ValueErrors) with
    a message naming the setting or file; `doctor` calls this too, so whatever
    stops serve here fails doctor.
    """
    from nodeagent.api.auth import load_token
    from nodeagent.credentials import CredentialSet, default_path

    loaded = loaded or load_config(env)
    token = load_token(loaded.config.api.token_file, env)
    credentials = CredentialSet.open(default_path(loaded), token)
    return loaded, token, credentials


def serve(loaded: LoadedConfig | None = None, *, node_factory: Callable[[LoadedConfig], Any] | None = None,
          paused: bool = False, drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S, access_log: bool = False,
          log_level: str = "info") -> int:
    """Run the agent until SIGTERM/SIGINT. Returns the process exit code."""
    from nodeagent.api.auth import TokenError

    _configure_logging(log_level)
    # A hand-started serve (umask 022) creates its files as the unit's UMask=0077 would:
    # state.db's -wal/-shm, the receipt log, providers' slot files.
    restrict_umask()
    notifier = Notifier.from_env()
    try:
        loaded, token, credentials = load_start(loaded)  # CredentialsError is a ValueError
    except (ConfigError, TokenError, ValueError) as exc:
        notifier.status(f"failed: {exc}")
        raise ServeError(str(exc)) from exc
    node = (node_factory or default_node)(loaded)
    try:
        recovered = node.start()
        if paused:
            node.pause_dispatch()
        listeners = open_listeners(loaded, token)
    except BaseException as exc:
        node.close()
        notifier.status(f"failed: {exc}")
        if isinstance(exc, FleetError):  # a bad [[providers]] declaration: named, not a traceback
            raise ServeError(str(exc)) from exc
        raise
    daemon = Daemon(node=node, listeners=listeners, token=token, notifier=notifier,
                    drain_timeout_s=drain_timeout_s, access_log=access_log, recovered=list(recovered or []),
                    credentials=credentials)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(daemon.run())
    finally:
        close_listeners(listeners)
        node.close()
    log.info("stopped")
    return 0
