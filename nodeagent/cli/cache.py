"""`agent-machine cache ls|stats|evict|pin|unpin`: the KV-cache tiers (T1 RAM, T2 disk)."""

from __future__ import annotations

import argparse
from typing import Any

from nodeagent.cli.output import CliError, add_format_option, add_group, emit, human_bytes, render_table

EPILOG = """\
examples:
  agent-machine cache ls                      saved states, hottest first per tier
  agent-machine cache ls --tier T2 --tenant acme
  agent-machine cache stats                   hits and misses per tier, bytes, evictions
  agent-machine cache evict 3f2a9c            drop one entry (unique id prefix)
  agent-machine cache evict --tier T1 --to-bytes 0   demote everything unpinned from RAM to disk
  agent-machine cache evict --all             drop every unpinned entry
"""


def register(subparsers: Any) -> None:
    group = add_group(subparsers, "cache", "KV-cache tiers: saved prefix states in RAM (T1) and on disk (T2)")

    ls = group.add_parser("ls", help="list saved states", epilog=EPILOG,
                          description="List the saved KV states the index knows, per tier, highest "
                          "GreedyDual-Size-Frequency priority (kept longest) first.",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    add_format_option(ls)
    ls.add_argument("--tier", choices=("T1", "T2"))
    ls.add_argument("--tenant")
    ls.add_argument("--model", metavar="DIGEST", help="only states of this model digest (sha256:...)")
    ls.set_defaults(func=_ls)

    stats = group.add_parser("stats", help="tier usage and hit/miss/eviction counters",
                             description="Bytes used against each tier's budget, and the counters kept since "
                             "the index was created: hits and hit tokens per tier (T0 = a provider's live "
                             "context), misses, demotions T1->T2, promotions T2->T1, evictions, entries "
                             "dropped because their digest did not match, states rejected for lack of room.")
    add_format_option(stats)
    stats.set_defaults(func=_stats)

    evict = group.add_parser("evict", help="drop entries, or shrink a tier", epilog=EPILOG,
                             description="Drop the named entries (unique id prefixes of 6+ characters), or "
                             "shrink a tier to a byte target by its eviction policy (T1 entries are demoted "
                             "to T2 first), or drop every entry with --all. Pinned entries are kept unless "
                             "--force.", formatter_class=argparse.RawDescriptionHelpFormatter)
    add_format_option(evict)
    evict.add_argument("ids", nargs="*", metavar="ID")
    evict.add_argument("--tier", choices=("T1", "T2"))
    evict.add_argument("--to-bytes", type=int, metavar="N", help="with --tier: shrink it to at most N bytes")
    evict.add_argument("--all", action="store_true", help="drop every entry (pinned ones only with --force)")
    evict.add_argument("--force", action="store_true", help="also drop pinned entries")
    evict.set_defaults(func=_evict)

    for name, pinned in (("pin", True), ("unpin", False)):
        sub = group.add_parser(name, help=f"{name} entries ({'never' if pinned else 'again'} evicted by policy)")
        add_format_option(sub)
        sub.add_argument("ids", nargs="+", metavar="ID")
        sub.set_defaults(func=_pin, pinned=pinned)


def _manager():
    from nodeagent.config import ConfigError, load_config
    from nodeagent.kvcache.manager import open_from_config

    try:
        return open_from_config(load_config())
    except (ConfigError, ValueError, RuntimeError, OSError) as exc:
        raise CliError(f"cannot open the KV cache: {exc}") from exc


def _resolve(cm, prefix: str) -> str:
    if len(prefix) < 6:
        raise CliError(f"entry id {prefix!r} is too short: give at least 6 characters", exit_code=2)
    matches = [e.id for e in cm.entries() if e.id.startswith(prefix.lower())]
    if not matches:
        raise CliError(f"no cache entry with id {prefix!r}")
    if len(matches) > 1:
        raise CliError(f"entry id {prefix!r} is ambiguous ({len(matches)} entries); give more characters")
    return matches[0]


def _ls(args: argparse.Namespace) -> int:
    cm = _manager()
    entries = cm.entries(tier=args.tier, tenant=args.tenant, model_digest=args.model)
    rows = [(e.id[:12], e.tier, e.tokens, human_bytes(e.bytes), e.hits, e.scope, e.owner,
             e.model_digest.removeprefix("sha256:")[:12], e.last_used_at.strftime("%Y-%m-%d %H:%M:%S"),
             "yes" if e.pinned else "") for e in entries]
    emit(entries, args.format, lambda _: render_table(
        ("id", "tier", "tokens", "bytes", "hits", "scope", "owner", "model", "last used (UTC)", "pinned"), rows)
        if rows else "no saved states")
    return 0


def _stats(args: argparse.Namespace) -> int:
    stats = _manager().stats()

    def text(s) -> str:
        tiers = render_table(("tier", "used", "budget", "entries", "directory"),
                             [(t.tier, human_bytes(t.used_bytes), human_bytes(t.budget_bytes), t.entries, t.directory)
                              for t in s.tiers])
        counters = render_table(("tier", "hits", "hit tokens"), [(t, s.hits[t], s.hit_tokens[t])
                                                               for t in ("T0", "T1", "T2")])
        looked = s.lookup_tokens
        hit_tokens = sum(s.hit_tokens.values())
        rate = f"{hit_tokens / looked:.1%} of {looked} looked-up tokens" if looked else "no lookups recorded"
        return (f"{tiers}\n\n{counters}\nmisses {s.misses}; token hit rate {rate}\n"
                f"stored {s.stored} ({human_bytes(s.stored_bytes)}), demoted {s.demotions}, promoted "
                f"{s.promotions}, evicted {s.evictions}, corrupt {s.corrupt}, rejected {s.rejected}")

    emit(stats, args.format, text)
    return 0


def _evict(args: argparse.Namespace) -> int:
    chosen = [bool(args.ids), args.to_bytes is not None, args.all]
    if sum(chosen) != 1:
        raise CliError("give entry ids, or --tier T --to-bytes N, or --all", exit_code=2)
    if args.to_bytes is not None and not args.tier:
        raise CliError("--to-bytes needs --tier T1 or --tier T2", exit_code=2)
    if args.to_bytes is not None and args.to_bytes < 0:
        raise CliError("--to-bytes must be >= 0", exit_code=2)
    cm = _manager()
    done: list[str] = []
    if args.to_bytes is not None:
        moved = cm.shrink(args.tier, args.to_bytes)
        result = {"tier": args.tier, "entriesMoved": moved, "usedBytes": cm.index.used_bytes(args.tier)}
        emit(result, args.format, lambda r: f"{args.tier}: {r['entriesMoved']} entries moved out, "
             f"{human_bytes(r['usedBytes'])} left")
        return 0
    ids = [_resolve(cm, p) for p in args.ids] if args.ids else [e.id for e in cm.entries(tier=args.tier)]
    skipped = []
    for entry_id in ids:
        try:
            if cm.evict(entry_id, force=args.force):
                done.append(entry_id)
        except ValueError as exc:
            if args.ids:
                raise CliError(str(exc)) from exc
            skipped.append(entry_id)
    emit({"evicted": done, "skippedPinned": skipped}, args.format,
         lambda r: f"evicted {len(done)} entries" + (f"; kept {len(skipped)} pinned" if skipped else ""))
    return 0


def _pin(args: argparse.Namespace) -> int:
    cm = _manager()
    ids = [_resolve(cm, p) for p in args.ids]
    for entry_id in ids:
        cm.pin(entry_id, args.pinned)
    emit({"pinned" if args.pinned else "unpinned": ids}, args.format,
         lambda r: f"{'pinned' if args.pinned else 'unpinned'} {len(ids)} entries")
    return 0
