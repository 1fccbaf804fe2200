"""Who is asking, and what they may see and do: the API's one authorisation layer.

`nodeagent.api.auth.Authenticate` resolves each request's credential to a
`Principal` once; routes take it with ``Depends(get_principal)`` and ask it.
Nothing else in the API decides who may see what.

The rules:

* admin (the Unix socket's owner without a token, the ``api.token_file``
  token, a credential with ``admin = true``): every tenant's data, every control;
* a tenant credential: pods, receipts and cache entries of its tenant only (and,
  when it lists ``agents``, of those agents only). Another tenant's object is
  answered 404 exactly like a missing one, so its existence does not leak.
  Submitting or scoring a pod as another tenant or agent, or with a context
  segment of a cache scope the credential does not list, is 403 naming the field.
  Node-wide controls (dispatch pause/resume, model load/unload) are 403.
  Node-wide facts that hold no tenant's data (machine, models, providers,
  status, metrics, cache counters, checkpoints) are readable by every credential.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request

from nodeagent.api.errors import ApiError
from nodeagent.contracts.pod import AgentPod
from nodeagent.credentials import Credential
from nodeagent.idempotency import ADMIN_SCOPE

SCOPE_KEY = "agent_machine.principal"  # where `Authenticate` leaves the principal in the ASGI scope
OPENAI_AGENT = "openai"  # the agent OpenAI requests run as, unless the credential names exactly one


@dataclass(frozen=True, slots=True)
class Principal:
    credential: str  # the credential id ("socket" for the socket's owner, "admin" for api.token_file)
    tenant: str | None = None  # None: admin
    agents: frozenset[str] | None = None  # None: every agent of the tenant
    scopes: frozenset[str] | None = None  # None: every cache scope
    # A verified `nodeagent.governance.grants.Grant` the request carried (header GRANT_HEADER):
    # on top of the credential, every pod of the request must be inside it.
    grant: Any = None

    @classmethod
    def of(cls, credential: Credential) -> "Principal":
        return cls(credential=credential.id, tenant=credential.tenant,
                   agents=frozenset(credential.agents) if credential.agents is not None else None,
                   scopes=frozenset(credential.scopes) if credential.scopes is not None else None)

    @property
    def is_admin(self) -> bool:
        return self.tenant is None

    @property
    def key_scope(self) -> str:
        """The namespace of this principal's idempotency keys."""
        return self.tenant if self.tenant is not None else ADMIN_SCOPE

    # ------------------------------------------------------------ reads
    def sees(self, tenant: str | None, agent: str | None = None) -> bool:
        """May this principal see an object of ``tenant`` (and ``agent``, when the object has one)?"""
        if self.is_admin:
            return True
        if tenant != self.tenant:
            return False
        return agent is None or self.agents is None or agent in self.agents

    def sees_pod(self, pod: AgentPod) -> bool:
        return self.sees(pod.metadata.tenant, pod.metadata.agent)

    def tenant_filter(self, requested: str | None) -> str | None:
        """The tenant a listing is limited to: the request's for admin, always its own for a tenant."""
        if self.is_admin:
            return requested
        if requested is not None and requested != self.tenant:
            raise self._forbidden(f"this credential sees tenant {self.tenant!r} only, not {requested!r}", "tenant")
        return self.tenant

    # ------------------------------------------------------------ acts
    def require_admin(self, action: str) -> None:
        if not self.is_admin:
            raise self._forbidden(f"{action} needs an admin credential")

    def authorize_pod(self, pod: AgentPod) -> None:
        """May this principal run ``pod`` as written? 403 naming the first field that says no."""
        if self.is_admin:
            self.authorize_grant(pod)
            return
        if pod.metadata.tenant != self.tenant:
            raise self._forbidden(f"metadata.tenant {pod.metadata.tenant!r}: this credential may submit pods of "
                                  f"tenant {self.tenant!r} only", "metadata.tenant")
        if self.agents is not None and pod.metadata.agent not in self.agents:
            raise self._forbidden(f"metadata.agent {pod.metadata.agent!r}: this credential may submit pods of agents "
                                  f"{', '.join(sorted(self.agents))} only", "metadata.agent")
        if self.scopes is not None:
            for index, segment in enumerate(pod.spec.context):
                if segment.scope.value not in self.scopes:
                    field = f"spec.context[{index}].scope"
                    raise self._forbidden(f"{field} {segment.scope.value!r}: this credential may use cache scopes "
                                          f"{', '.join(sorted(self.scopes))} only", field)
        self.authorize_grant(pod)

    def authorize_grant(self, pod: AgentPod) -> None:
        """A request carrying a grant is held to it, admin or not: 403 with the grant's first refusal."""
        if self.grant is None:
            return
        refusals = self.grant.refusals(pod)
        if refusals:
            raise ApiError(403, "forbidden", f"{GRANT_HEADER}: {refusals[0]}", field=GRANT_HEADER)

    def chat_identity(self) -> tuple[str, str]:
        """(tenant, agent) an OpenAI request of this principal runs as.

        The tenant is the credential's, never a request field; admin keeps the
        ``default`` tenant. The agent is the credential's only agent when it names
        exactly one, else ``openai``. System messages become private segments, so a
        credential must be allowed the private scope.
        """
        if self.is_admin:
            return "default", OPENAI_AGENT
        assert self.tenant is not None
        agent = next(iter(self.agents)) if self.agents is not None and len(self.agents) == 1 else OPENAI_AGENT
        if self.agents is not None and agent not in self.agents:
            raise self._forbidden(f"this credential may act for agents {', '.join(sorted(self.agents))} only; "
                                  f"OpenAI requests run as agent {OPENAI_AGENT!r}: list it, or issue a token "
                                  "for one agent", "Authorization")
        if self.scopes is not None and "private" not in self.scopes:
            raise self._forbidden("OpenAI system messages are private context; this credential may not use the "
                                  "private cache scope", "Authorization")
        return self.tenant, agent

    def _forbidden(self, message: str, field: str | None = None) -> ApiError:
        bound = "" if self.is_admin else f" (credential {self.credential!r} is bound to tenant {self.tenant!r})"
        return ApiError(403, "forbidden", message + bound, field=field)


# The Unix socket's owner: the socket is 0600 in a 0700 directory, so whoever can
# connect is the agent's own user, who can read every tenant's state anyway.
SOCKET_OWNER = Principal(credential="socket")
GRANT_HEADER = "X-Agent-Machine-Grant"  # an AgentRegistryGrant: its DSSE envelope, base64 (docs/governance.md)


async def get_principal(request: Request) -> Principal:
    """The request's principal. An app served bare, without `Authenticate` (as the
    tests do on a private socket), answers as to the socket's owner. A grant header
    is verified here (signature, revocation, expiry: 403 naming what failed) and
    installed on the node, so activation holds the agent's pods to it."""
    principal = request.scope.get(SCOPE_KEY)
    principal = principal if isinstance(principal, Principal) else SOCKET_OWNER
    header = request.headers.get(GRANT_HEADER)
    if header:
        principal = replace(principal, grant=_verified_grant(request, header))
    return principal


def _verified_grant(request: Request, header: str) -> Any:
    from nodeagent.governance.activation import activation_for
    from nodeagent.governance.grants import GrantError, read_grant_text

    node = request.app.state.node
    activation = getattr(getattr(node, "executor", None), "activation", None) or activation_for(node)
    try:
        grant = activation.verify(read_grant_text(header))
    except GrantError as exc:
        raise ApiError(403, "forbidden", f"{GRANT_HEADER}: grant refused: {exc}", field=GRANT_HEADER) from None
    activation.grants.install(grant)
    return grant


__all__ = ["GRANT_HEADER", "Principal", "SOCKET_OWNER", "get_principal"]
