"""`agent-machine models ...`: the model store, memory fit and residency."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from nodeagent.cli.output import CliError, add_format_option, add_group, emit, human_bytes, render_table

EPILOG_IMPORT = """\
examples:
  agent-machine models import ./qwen2.5-0.5b-instruct-q4_k_m.gguf --name qwen2.5:0.5b
  agent-machine models import /srv/models/llama.gguf            # name: llama:latest
  agent-machine models create-test-model --preset tiny /tmp/tiny.gguf && \\
      agent-machine models import /tmp/tiny.gguf --name tiny
"""

EPILOG_REF = """\
A model is named NAME[:TAG] (tag defaults to latest), sha256:<hex prefix>, or
a bare hex prefix of at least 6 characters.
"""


def register(subparsers: Any) -> None:
    group = add_group(subparsers, "models", "model store, memory fit and residency (load, unload, ps)")

    create = group.add_parser(
        "create-test-model", help="write a random-weight llama GGUF for tests and benchmarks",
        description="Write a llama-architecture GGUF with random weights (gibberish output, real shapes). "
        "Presets: tiny (~11 MB, 4 layers x 128) for tests, small (~300 MB, 12 layers x 768, f16) for benchmarks. "
        "The same parameters and seed always give the same file.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    create.add_argument("out", type=Path, metavar="OUT", help="file to write (or a directory)")
    create.add_argument("--preset", choices=("tiny", "small"), default="tiny")
    create.add_argument("--seed", type=int)
    create.add_argument("--layers", type=int, dest="n_layer")
    create.add_argument("--width", type=int, dest="n_embd")
    create.add_argument("--heads", type=int, dest="n_head")
    create.add_argument("--kv-heads", type=int, dest="n_head_kv")
    create.add_argument("--ffn", type=int, dest="n_ff")
    create.add_argument("--context", type=int, dest="n_ctx_train")
    create.add_argument("--vocab", type=int, dest="n_vocab")
    create.add_argument("--dtype", choices=("f32", "f16"))
    create.set_defaults(func=_create_test_model)

    imp = group.add_parser(
        "import", help="add a GGUF file to the content-addressed store",
        description="Check that PATH is a GGUF model, hash it (sha256) and place it in the store under the "
        "state directory (reflink or hardlink on the same filesystem, else a copy). Nothing is left behind "
        "when the file is refused.",
        epilog=EPILOG_IMPORT, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imp.add_argument("path", type=Path, metavar="PATH")
    imp.add_argument("--name", metavar="NAME[:TAG]", help="name to give it (default: the file name, tag latest)")
    imp.add_argument("--copy", action="store_true",
                     help="always copy (a hardlinked blob changes if the source file is edited in place)")
    imp.add_argument("--progress", action="store_true", help="show progress even when stderr is not a terminal")
    add_format_option(imp)
    imp.set_defaults(func=_import)

    ls = group.add_parser("ls", help="list stored models", description="List the models in the store.")
    add_format_option(ls)
    ls.set_defaults(func=_ls)

    inspect = group.add_parser("inspect", help="show a model's record and GGUF facts",
                               description="Show one model's record.", epilog=EPILOG_REF,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    inspect.add_argument("ref", metavar="MODEL")
    add_format_option(inspect)
    inspect.set_defaults(func=_inspect)

    template = group.add_parser(
        "template", help="show, set or clear the chat template a model is served with",
        description="Show the chat template MODEL is served with (its GGUF's own, an override set here, or "
        "ChatML when the model has none) and whether it is prefix-stable (turn k+1's prompt extends turn k's, "
        "which caching needs). --file sets an override (Jinja, checked before it is stored); --clear goes back "
        "to the GGUF's. A running agent renders the next pod with the change.",
        epilog="examples:\n  agent-machine models template smollm2\n"
               "  agent-machine models template smollm2 --file chatml-with-tools.jinja\n"
               "  agent-machine models template smollm2 --clear",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    template.add_argument("ref", metavar="MODEL")
    choice = template.add_mutually_exclusive_group()
    choice.add_argument("--file", metavar="JINJA", help="serve this template instead of the GGUF's")
    choice.add_argument("--clear", action="store_true", help="serve the GGUF's own template again")
    add_format_option(template)
    template.set_defaults(func=_template)

    rm = group.add_parser(
        "rm", help="remove a name, or a model by digest (refused while loaded)",
        description="Remove NAME[:TAG]; the file goes when no name points at it any more. "
        "Given a digest, every name and the file go. Refused while the model is loaded.",
        epilog=EPILOG_REF, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rm.add_argument("ref", metavar="MODEL")
    add_format_option(rm)
    rm.set_defaults(func=_rm)

    fit = group.add_parser(
        "fit", help="estimate the memory a model needs for a context",
        description="Estimate the bytes llama.cpp allocates for MODEL: weights, KV cache, compute buffer and "
        "overhead, per device, and compare with this machine's budgets.",
        epilog="examples:\n  agent-machine models fit tiny --ctx 4096\n"
        "  agent-machine models fit qwen2.5:7b --ctx 32768 --kv-type q8_0 --gpu-layers 20 --format json\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fit.add_argument("ref", metavar="MODEL")
    _add_load_options(fit)
    add_format_option(fit)
    fit.set_defaults(func=_fit)

    load = group.add_parser(
        "load", help="load a model in the running agent (or record the request for when it starts)",
        description="Check that MODEL fits this machine's budget, then load it in the running agent with the "
        "given context, keep-alive and pin. With no agent running, the request is recorded and `agent-machine "
        "serve` loads it when it starts. An over-commit is explained and exits 1.",
        epilog="keep-alive: 30s, 5m, 1h; -1 keeps it loaded forever; 0 unloads it as soon as it is idle.\n"
        + EPILOG_REF, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    load.add_argument("ref", metavar="MODEL")
    _add_load_options(load)
    load.add_argument("--keep-alive", default="5m", metavar="DURATION")
    load.add_argument("--pin", action="store_true", help="never evict it to make room")
    add_format_option(load)
    load.set_defaults(func=_load)

    unload = group.add_parser("unload", help="unload a model from the running agent (and forget a recorded request)",
                              description="Unload MODEL from the running agent, and forget any load request "
                              "recorded while no agent ran.", epilog=EPILOG_REF,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    unload.add_argument("ref", metavar="MODEL")
    add_format_option(unload)
    unload.set_defaults(func=_unload)

    ps = group.add_parser(
        "ps", help="loaded models (like `ollama ps`)",
        description="Models loaded by the daemon (as it recorded them), with size, processor split, context "
        "and when they unload. --all adds every stored model as cold or warm (file in the page cache).",
    )
    ps.add_argument("--all", action="store_true", help="also list models that are not loaded")
    add_format_option(ps)
    ps.set_defaults(func=_ps)


def _add_load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ctx", type=int, default=2048, metavar="N", help="context length in tokens (default 2048)")
    parser.add_argument("--parallel", type=int, default=1, metavar="N", help="parallel sequences (default 1)")
    parser.add_argument("--kv-type", default="f16", help="KV cache type: f16, q8_0, q4_0... (default f16)")
    parser.add_argument("--gpu-layers", type=int, default=0, metavar="N",
                        help="layers to offload to the GPU; more than the layer count offloads the output too")
    parser.add_argument("--reserve", type=float, default=0.10, metavar="FRACTION",
                        help="share of each memory pool kept free (default 0.10)")


# ------------------------------------------------------------------ helpers
def _store() -> Any:
    from nodeagent.models.store import ModelStore

    return ModelStore.open()


def _resolve(store: Any, ref: str) -> Any:
    from nodeagent.models.store import ModelStoreError

    try:
        return store.resolve(ref)
    except ModelStoreError as exc:
        raise CliError(str(exc)) from None


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


class _ProgressBar:
    def __init__(self, label: str, enabled: bool) -> None:
        self.label, self.enabled = label, enabled
        self.start = time.monotonic()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.1 and done < total):
            return
        self.last = now
        frac = done / total if total else 1.0
        rate = done / max(now - self.start, 1e-6)
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r{self.label} {frac:4.0%} [{bar:<30}] {human_bytes(done)}/{human_bytes(total)} "
                         f"{human_bytes(rate)}/s ")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _devices() -> list[Any]:
    """This machine's compute devices: from the probe when it exists, else system RAM via psutil."""
    try:
        from nodeagent.probe import probe  # type: ignore[attr-defined]
    except ImportError:
        probe = None
    if probe is not None:
        try:
            devices = list(probe().devices)
            if devices:
                return devices
        except Exception:  # a failed probe must not stop a memory check; fall back
            pass
    from nodeagent.models.residency import system_ram_devices

    return system_ram_devices()


def _load_request(store: Any, record: Any, args: argparse.Namespace) -> Any:
    from nodeagent.models.residency import LoadRequest

    return LoadRequest(
        digest=record.digest, name=record.names[0] if record.names else None, path=record.path,
        meta=store.meta(record), n_ctx=args.ctx, n_parallel=args.parallel, kv_type=args.kv_type,
        n_gpu_layers=args.gpu_layers,
    )


def _manager(args: argparse.Namespace, conn: Any) -> Any:
    """A residency manager over this machine's budgets, minus what the daemon recorded as loaded."""
    from nodeagent.models.residency import (
        SYSTEM_POOL, PoolBudget, ResidencyManager, budgets_from_devices, recorded_residency,
    )

    if not 0 <= args.reserve < 1:
        raise CliError("--reserve must be a fraction between 0 and 1")
    pools = budgets_from_devices(_devices(), reserve_fraction=args.reserve)
    held: dict[str, int] = {}
    for row in recorded_residency(conn):
        for share in row.devices:
            pool = SYSTEM_POOL if share.device_id == "cpu" else share.device_id
            held[pool] = held.get(pool, 0) + share.bytes
    pools = [PoolBudget(p.pool, p.devices, p.total_bytes, p.reserve_bytes + held.get(p.pool, 0)) for p in pools]

    def no_loading(request: Any) -> Any:
        raise CliError("loading needs the daemon (`agent-machine serve`)")

    return ResidencyManager(pools, no_loading), pools


# ------------------------------------------------------------------ handlers
def _create_test_model(args: argparse.Namespace) -> int:
    from nodeagent.models.testmodel import create_test_model

    names = ("seed", "n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "n_ctx_train", "n_vocab", "dtype")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    try:
        path = create_test_model(args.out, args.preset, **overrides)
    except ValueError as exc:
        raise CliError(str(exc), exit_code=2) from None
    print(f"{path} ({human_bytes(path.stat().st_size)})")
    return 0


def _import(args: argparse.Namespace) -> int:
    from nodeagent.models.gguf_meta import GGUFError
    from nodeagent.models.store import ModelStoreError

    store = _store()
    bar = _ProgressBar(f"importing {args.path.name}", args.progress or sys.stderr.isatty())
    try:
        record = store.import_model(args.path, args.name, progress=bar, mode="copy" if args.copy else "auto")
    except (GGUFError, ModelStoreError) as exc:
        raise CliError(str(exc)) from None
    emit(record, args.format, lambda r: f"imported {', '.join(r.names)} {r.digest} ({human_bytes(r.size_bytes)})")
    return 0


def _ls(args: argparse.Namespace) -> int:
    records = _store().list()
    rows = [
        (", ".join(r.names) or "-", _short(r.digest), r.gguf.architecture, _params(r.gguf.parameters),
         r.gguf.file_type, r.gguf.context_length, human_bytes(r.size_bytes), r.imported_at.strftime("%Y-%m-%d %H:%M"))
        for r in records
    ]
    emit(records, args.format,
         lambda _: render_table(("name", "digest", "arch", "params", "type", "context", "size", "imported"), rows))
    return 0


def _params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def template_facts(store: Any, record: Any) -> dict[str, Any]:
    """The chat template a model is served with, where it comes from, and whether caching can extend it."""
    from nodeagent.templates import model_template

    served = model_template(record.path, store.template_override(record.digest))
    stability = served.stability()
    return {"origin": served.origin, "prefixStable": stability.stable, "detail": stability.detail,
            "template": served.source}


def _template(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nodeagent.templates import TemplateError

    store = _store()
    record = _resolve(store, args.ref)
    try:
        if args.file:
            try:
                text = Path(args.file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise CliError(f"--file {args.file}: {exc}") from None
            store.set_template(record.digest, text)
        elif args.clear:
            store.set_template(record.digest, None)
    except TemplateError as exc:
        raise CliError(f"--file {args.file}: {exc}") from None
    facts = template_facts(store, record)
    emit(facts, args.format, lambda f: f"origin: {f['origin']}\nprefix-stable: {'yes' if f['prefixStable'] else 'no'}"
                                       f" ({f['detail']})\n\n{f['template']}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    store = _store()
    record = _resolve(store, args.ref)
    facts = template_facts(store, record)

    def table(r: Any) -> str:
        g = r.gguf
        rows = [
            ("names", ", ".join(r.names)), ("digest", r.digest), ("path", r.path), ("source", r.source_path),
            ("size", human_bytes(r.size_bytes)), ("architecture", g.architecture), ("model name", g.name),
            ("parameters", f"{g.parameters} ({_params(g.parameters)})"), ("quantization", g.file_type),
            ("layers", g.n_layer), ("width", g.n_embd), ("ffn", g.n_ff), ("heads", g.n_head),
            ("kv heads", g.n_head_kv), ("head size", f"k {g.head_dim_k}, v {g.head_dim_v}"),
            ("context", g.context_length), ("vocabulary", g.vocab_size),
            ("chat template", f"{facts['origin']}, " + ("prefix-stable" if facts["prefixStable"]
                                                         else f"NOT prefix-stable: {facts['detail']}")),
            ("tensor types", ", ".join(f"{k} x{v}" for k, v in g.tensor_types.items())),
        ]
        return render_table(("field", "value"), rows)

    summary = {k: v for k, v in facts.items() if k != "template"}
    emit({**record.to_wire(), "chatTemplate": summary} if args.format == "json" else record, args.format, table)
    return 0


def _rm(args: argparse.Namespace) -> int:
    from nodeagent.models.residency import recorded_residency
    from nodeagent.models.store import ModelStoreError

    store = _store()
    loaded = {row.digest for row in recorded_residency(store.conn)}
    try:
        record, dropped = store.remove(args.ref, loaded=loaded)
    except ModelStoreError as exc:
        raise CliError(str(exc)) from None
    result = {"digest": record.digest, "removed": args.ref, "blobDeleted": dropped}
    emit(result, args.format, lambda r: f"removed {args.ref}" + (f" and its file {_short(r['digest'])}" if dropped else
                                                                 " (the file stays: other names point at it)"))
    return 0


def _fit(args: argparse.Namespace) -> int:
    from nodeagent.models.residency import OverCommit, ResidencyError

    store = _store()
    record = _resolve(store, args.ref)
    try:
        request = _load_request(store, record, args)
        manager, pools = _manager(args, store.conn)
        fit = manager.fit_for(request)
    except ValueError as exc:
        raise CliError(str(exc), exit_code=2) from None
    verdict, problem = "fits", None
    try:
        manager.plan(request)
    except (OverCommit, ResidencyError) as exc:
        verdict, problem = "does not fit", str(exc)
    data = {"model": record.digest, "names": record.names, "fit": fit.to_dict(), "verdict": verdict,
            "problem": problem,
            "budgets": [{"pool": p.pool, "devices": list(p.devices), "totalBytes": p.total_bytes,
                         "reserveBytes": p.reserve_bytes, "budgetBytes": p.budget_bytes} for p in pools]}

    def table(_: Any) -> str:
        rows = [(d.device_id, d.layers, human_bytes(d.weights_bytes), human_bytes(d.kv_bytes),
                 human_bytes(d.compute_bytes), human_bytes(d.overhead_bytes), human_bytes(d.total_bytes))
                for d in fit.devices]
        text = render_table(("device", "layers", "weights", "kv", "compute", "overhead", "total"), rows)
        text += f"\n\n{record.names[0] if record.names else _short(record.digest)} at {fit.n_ctx} tokens " \
                f"(KV {fit.kv_type}, {fit.kv_cells} cells, ubatch {fit.n_ubatch}): {human_bytes(fit.total_bytes)}, " \
                f"{fit.processor}: {verdict}"
        return text + (f"\n{problem}" if problem else "")

    emit(data, args.format, table)
    return 0 if problem is None else 1


def _load(args: argparse.Namespace) -> int:
    from nodeagent.models.residency import OverCommit, ResidencyError, parse_keep_alive, record_intent

    store = _store()
    record = _resolve(store, args.ref)
    try:
        keep_alive = parse_keep_alive(args.keep_alive)
        request = _load_request(store, record, args)
        manager, _ = _manager(args, store.conn)
        plan = manager.plan(request)
    except (OverCommit, ResidencyError) as exc:
        raise CliError(str(exc)) from None
    except ValueError as exc:
        raise CliError(str(exc), exit_code=2) from None
    loaded = _via_daemon("post", f"/v1/models/{record.digest}:load",
                         json={"keepAliveS": keep_alive, "pin": args.pin or None})
    if loaded is not None:
        emit(loaded, args.format, lambda row: (
            f"loaded {record.names[0] if record.names else _short(record.digest)} in the running agent: "
            f"{human_bytes((row or {}).get('sizeBytes'))} ({(row or {}).get('processor', '-')}), "
            f"provider {(row or {}).get('provider', '-')}"))
        return 0
    record_intent(store.conn, record.digest, keep_alive_s=keep_alive, pinned=args.pin, n_ctx=args.ctx)
    data = {"model": record.digest, "names": record.names, "fit": plan.fit.to_dict(), "keepAliveS": keep_alive,
            "pinned": args.pin, "recorded": True, "loaded": False,
            "note": "no agent running: the request is recorded; `agent-machine serve` loads it at start"}
    emit(data, args.format, lambda d: (
        f"{record.names[0] if record.names else _short(record.digest)} fits: {human_bytes(plan.fit.total_bytes)} "
        f"({plan.fit.processor}, context {plan.fit.n_ctx}). Recorded the load request (keep-alive "
        f"{'forever' if keep_alive < 0 else f'{keep_alive:g}s'}{', pinned' if args.pin else ''}).\n"
        f"No agent is running: `agent-machine serve` loads it when it starts."))
    return 0


def _via_daemon(method: str, path: str, **kwargs: Any) -> Any:
    """The running agent's answer, or None when no agent is running."""
    from nodeagent.client import AgentClient, AgentNotRunning, ApiError

    try:
        with AgentClient.from_env() as client:
            return getattr(client, method)(path, **kwargs)
    except AgentNotRunning:
        return None
    except ApiError as exc:
        raise CliError(str(exc)) from exc


def _unload(args: argparse.Namespace) -> int:
    from nodeagent.models.residency import clear_intent, recorded_residency

    store = _store()
    record = _resolve(store, args.ref)
    cleared = clear_intent(store.conn, record.digest)
    answer = _via_daemon("post", f"/v1/models/{record.digest}:unload")
    if answer is not None:
        emit(answer, args.format, lambda a: "unloaded from the running agent" if a.get("unloaded")
             else "the running agent did not hold it")
        return 0
    hot = any(row.digest == record.digest for row in recorded_residency(store.conn))
    data = {"model": record.digest, "intentCleared": cleared, "loadedInDaemon": hot}
    emit(data, args.format, lambda d: (
        ("withdrew the recorded load request" if cleared else "no recorded load request")
        + ("; the daemon still holds it: unload it through the daemon's API" if hot else "")))
    return 0


def _ps(args: argparse.Namespace) -> int:
    from nodeagent.contracts.model import ModelResidency
    from nodeagent.models.residency import page_cache_fraction, recorded_residency

    store = _store()
    rows = recorded_residency(store.conn)
    if args.all:
        hot = {r.digest for r in rows}
        for record in store.list():
            if record.digest in hot:
                continue
            cached = page_cache_fraction(record.path)
            rows.append(ModelResidency(
                name=record.names[0] if record.names else None, digest=record.digest,
                state="warm" if cached is not None and cached >= 0.9 else "cold", size_bytes=record.size_bytes,
            ))

    def until(r: Any) -> str:
        if r.state != "hot":
            return "-"
        if r.in_use:
            return "in use"
        if r.keep_alive_s is not None and r.keep_alive_s < 0:
            return "Forever"
        return r.until.astimezone().strftime("%Y-%m-%d %H:%M:%S") if r.until else "-"

    table_rows = [
        (r.name or "-", _short(r.digest), human_bytes(r.size_bytes), r.processor or "-", r.context_length or "-",
         until(r), r.provider or "-", r.state + (" pinned" if r.pinned else ""))
        for r in rows
    ]
    if args.format == "json":  # the fleet, for machines: GET /v1/fleet
        emit(rows, "json", str)
        return 0
    fleet = _via_daemon("get", "/v1/fleet")

    def view(_: Any) -> str:
        text = render_table(("name", "digest", "size", "processor", "context", "until", "provider", "state"),
                            table_rows)
        if fleet is None:
            return text + "\nfleet: the agent is not running (`agent-machine config show` lists the declarations)"
        text += f"\nfleet: {fleet['rule']}"
        declared = [(d["name"], d["model"], d["kind"], d["mode"], f"{len(d['running'])}/{d['replicas']}",
                     d["slots"], d["ctxPerSlot"], d["load"] + ("" if d.get("declared", True) else " (default)"))
                    for d in fleet["declared"]]
        if declared:
            text += "\n" + render_table(("provider", "model", "kind", "mode", "running", "slots", "ctx/slot", "load"),
                                        declared)
        if fleet["adopted"]:
            text += "\nadopted (started with `providers up`): " + ", ".join(fleet["adopted"])
        return text

    emit(rows, "table", view)
    return 0
