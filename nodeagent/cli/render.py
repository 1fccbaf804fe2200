"""`agent-machine render`: what the node would deploy or do, written out; nothing starts.

Each kind of rendering lives in its own module (`render_kube`: Kubernetes
manifests; `render_plan`: a pod's plan) and registers its sub-command here.
"""

from __future__ import annotations

import importlib
from typing import Any

from nodeagent.cli.output import add_group

RENDERERS = ("nodeagent.cli.render_kube", "nodeagent.cli.render_plan")


def register(subparsers: Any) -> None:
    group = add_group(subparsers, "render", "write out what the node would deploy or do, without doing it")
    for name in RENDERERS:
        importlib.import_module(name).register(group)
