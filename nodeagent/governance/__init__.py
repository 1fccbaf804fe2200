"""Governance: grants, activation decisions, storage evidence, plans, wipe, teardown, evidence bundles.

One module per concept (docs/governance.md):

    grants      AgentRegistryGrant: issue, verify, revoke, the node's installed grants
    storage     StorageReceipt: where models, KV tiers, scratch and receipts live
    activation  ActivationDecision: the gate before a pod runs or a provider starts
    plan        `render plan POD`: what the node would do, without doing it
    wipe        a tenant's (or agent's) states and texts removed, with a receipt
    teardown    every provider the node started stopped and removed, with a receipt
    bundle      the evidence bundle and its offline verification

Every decision and event is a node event in the machine's receipt log
(`nodeagent.receipts.events`), verifiable offline with the machine key alone.
"""

from nodeagent.governance.activation import Activation, ActivationDecision, Precondition, activation_for, install_gates
from nodeagent.governance.grants import Grant, GrantError, GrantStore, RevocationList, issue_grant, verify_grant
from nodeagent.governance.storage import StorageReceipt, take_storage_receipt

__all__ = ["Activation", "ActivationDecision", "Grant", "GrantError", "GrantStore", "Precondition", "RevocationList",
           "StorageReceipt", "activation_for", "install_gates", "issue_grant", "take_storage_receipt", "verify_grant"]
