"""The registry of training methods: one file per method, one line here per method.

``get(name, pivot=...)`` gives the method that runs (``orc`` with a pivot is pivot mode);
``register`` adds one (a user's, or a test's) under its ``name``.
"""

from __future__ import annotations

from .base import MemberLosses, Method, MethodDefaults, StepOutput, loss_form
from .dml import DML
from .independent import Independent
from .kd import KD
from .kdcl import KDCL
from .orc_peer import OrcPeer
from .orc_pivot import OrcPivot

REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` known by its name (to the trainer's --method, compare's protocols, ...)."""
    if not method.name:
        raise ValueError("a method needs a name")
    REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def method_flags() -> tuple[str, ...]:
    """Every flag some method reads (``Method.reads``): another method would silently ignore it."""
    variants = [v for m in REGISTRY.values() for v in (m, m.pivot_variant) if v is not None]
    return tuple(dict.fromkeys(flag for variant in variants for flag in variant.reads))


def get(name: str, pivot: bool = False) -> Method:
    """The method called ``name``; with ``pivot``, its pivot-mode variant where it has one."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(REGISTRY)}")
    method = REGISTRY[name]
    return method.pivot_variant if pivot and method.pivot_variant is not None else method


for _method in (OrcPeer(), Independent(), KD(), DML(), KDCL()):
    register(_method)

__all__ = ["REGISTRY", "Method", "MethodDefaults", "MemberLosses", "StepOutput", "OrcPivot", "get", "loss_form",
           "method_flags", "names", "register", "unregister"]
