"""`agent-machine tokens issue|ls|revoke`: API credentials bound to a tenant (nodeagent.credentials).

The file is edited directly (no running agent needed); a running agent reads
the change at its next request.
"""

from __future__ import annotations

import argparse
from typing import Any

from nodeagent.cli.output import CliError, add_format_option, add_group, emit, render_table

EPILOG = """\
examples:
  agent-machine tokens issue --tenant acme            a token for tenant acme (printed once)
  agent-machine tokens issue --tenant acme --agent coder --agent reviewer
                                                      only those agents' pods
  agent-machine tokens issue --tenant acme --scope private --scope tenant
                                                      no public-scope context segments
  agent-machine tokens issue --admin --id ci-admin    an admin token (sees every tenant)
  agent-machine tokens issue --tenant acme --format json | jq -r .token
  agent-machine tokens ls                             every credential (never the tokens)
  agent-machine tokens revoke acme-3f9a1c             refused from the next request on
"""

SCOPES = ("private", "tenant", "public")


def register(subparsers: Any) -> None:
    group = add_group(subparsers, "tokens", "API tokens bound to a tenant (or admin): issue, list, revoke")

    issue = group.add_parser(
        "issue", help="create a token; it is printed once and only its sha256 is kept", epilog=EPILOG,
        description="Create a bearer token for the API and append its sha256 to the credentials file "
        "(api.credentials_file, default <config dir>/credentials.toml, mode 0600). A tenant token sees and acts "
        "on that tenant's pods, receipts and cache entries only; OpenAI requests made with it run as that "
        "tenant. The token is printed once: store it now.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    who = issue.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenant", help="the tenant the token is bound to")
    who.add_argument("--admin", action="store_true", help="an admin token: every tenant, every control")
    issue.add_argument("--agent", action="append", metavar="AGENT", dest="agents",
                       help="only this agent's pods (repeat for several; default: every agent of the tenant)")
    issue.add_argument("--scope", action="append", choices=SCOPES, dest="scopes",
                       help="cache scopes its pods may declare (repeat; default: all)")
    issue.add_argument("--id", dest="credential_id", help="the credential's id (default: <tenant>-<6 hex>)")
    add_format_option(issue)
    issue.set_defaults(func=_issue)

    ls = group.add_parser("ls", help="list credentials (ids, tenants, limits; never tokens)", epilog=EPILOG,
                          description="List the credentials in the credentials file, revoked ones included.",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    add_format_option(ls)
    ls.set_defaults(func=_ls)

    revoke = group.add_parser("revoke", help="revoke a credential: its token is refused from the next request",
                              epilog=EPILOG, description="Mark the credential revoked (the entry stays, for the "
                              "record). A running agent refuses its token from the next request on.",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    revoke.add_argument("id", metavar="ID")
    add_format_option(revoke)
    revoke.set_defaults(func=_revoke)


def _path():
    from nodeagent.config import ConfigError, load_config
    from nodeagent.credentials import default_path

    try:
        return default_path(load_config())
    except (ConfigError, ValueError) as exc:
        raise CliError(f"cannot read the configuration: {exc}") from exc


def _issue(args: argparse.Namespace) -> int:
    from nodeagent.credentials import CredentialsError, issue

    if args.admin and (args.agents or args.scopes):
        raise CliError("--agent and --scope limit tenant tokens; an admin token sees everything", exit_code=2)
    path = _path()
    try:
        credential, token = issue(path, tenant=args.tenant, admin=args.admin, agents=args.agents,
                                  scopes=args.scopes, credential_id=args.credential_id)
    except (CredentialsError, OSError) as exc:
        raise CliError(str(exc)) from exc
    result = {**credential.to_dict(), "token": token, "file": str(path)}

    def text(r: dict[str, Any]) -> str:
        bound = "admin" if credential.admin else f"tenant {credential.tenant}"
        return (f"{r['token']}\n\ncredential {credential.id} ({bound}) added to {path}.\n"
                "This is the only time the token is shown. Use it as 'Authorization: Bearer <token>' "
                "(AGENT_MACHINE_TOKEN for the CLI, api_key for OpenAI clients).")

    emit(result, args.format, text)
    return 0


def _ls(args: argparse.Namespace) -> int:
    from nodeagent.credentials import CredentialsError, read

    path = _path()
    try:
        credentials = read(path)
    except CredentialsError as exc:
        raise CliError(str(exc)) from exc
    rows = [(c.id, "admin" if c.admin else c.tenant, ",".join(c.agents) if c.agents else "*",
             ",".join(c.scopes) if c.scopes else "*", c.created_at, c.revoked_at or "") for c in credentials]
    emit([c.to_dict() for c in credentials], args.format, lambda _: render_table(
        ("id", "tenant", "agents", "scopes", "created (UTC)", "revoked (UTC)"), rows)
        if rows else f"no credentials in {path} (issue one with: agent-machine tokens issue --tenant NAME)")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from nodeagent.credentials import CredentialsError, revoke

    try:
        credential = revoke(_path(), args.id)
    except (CredentialsError, OSError) as exc:
        raise CliError(str(exc)) from exc
    emit(credential.to_dict(), args.format, lambda c: f"revoked {c['id']} at {c['revokedAt']}")
    return 0
