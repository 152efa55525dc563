"""What nodewatch knows and decides, without I/O: the nodes it saw, what it last published about
each, the taints asked for each, and so what to publish and which patch to send next.

The service feeds it Kubernetes watch events and taint requests, in one task at a time, and acts on
what it returns; so every decision here is testable with plain dicts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from events.node import Taint
from services.nodewatch.mapping import node_to_registration, taint_patch, wanted_taints


@dataclass(frozen=True)
class TaintWish:
    """The taints one node should carry for the keys the requester owns."""

    taints: tuple[Taint, ...]
    keys: tuple[str, ...]
    reason: str = ""


@dataclass
class NodeBook:
    default_max_instances: int = 8
    published: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Node -> the registration last published for it."""
    taints: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Node -> its ``spec.taints`` as the API last returned them (the base of the next patch)."""
    wishes: dict[str, TaintWish] = field(default_factory=dict)

    def observe(self, node: Mapping[str, Any]) -> dict[str, Any] | None:
        """A node was added or changed: its registration if it differs from the one published."""
        registration = node_to_registration(node, default_max_instances=self.default_max_instances)
        name = registration["node"]
        self.taints[name] = [dict(t) for t in (node.get("spec") or {}).get("taints") or []]
        if self.published.get(name) == registration:
            return None
        self.published[name] = registration
        return registration

    def remove(self, name: str) -> bool:
        """A node was deleted (or left the selection): True if a tombstone is due."""
        self.taints.pop(name, None)
        return self.published.pop(name, None) is not None

    def resync(self, nodes: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[str], list[str]]:
        """A full list: the registrations to publish, the nodes gone since (tombstones), and why
        nodes could not be read (those keep their last registration)."""
        listed = {n for n in (_name_of(node) for node in nodes) if n}
        gone = sorted(name for name in set(self.published) | set(self.taints) if name not in listed)
        for name in gone:
            self.remove(name)
        changed: list[dict[str, Any]] = []
        unreadable: list[str] = []
        for node in nodes:
            try:
                registration = self.observe(node)
            except ValueError as exc:  # QuantityError, or a Node without a name
                unreadable.append(f"{_name_of(node) or '(no name)'}: {exc}")
                continue
            if registration is not None:
                changed.append(registration)
        return changed, gone, unreadable

    def want(self, node: str, taints: Iterable[Taint], keys: Iterable[str] = (), reason: str = "") -> None:
        """Record the taints asked for a node. Raises ``ValueError`` for a request nodewatch refuses
        (a key outside ``stoker.io/``, a taint outside its keys, a duplicate)."""
        wanted = tuple(taints)
        owned = tuple(keys) or tuple(sorted({t.key for t in wanted}))
        wanted_taints([], wanted, owned)  # validates
        self.wishes[node] = TaintWish(wanted, owned, reason)

    def forget_wish(self, node: str) -> None:
        """The request was withdrawn (tombstone): taints stay as they are."""
        self.wishes.pop(node, None)

    def patch(self, node: str) -> list[dict[str, Any]]:
        """The JSON patch that brings a known node to its wish; empty when there is nothing to do."""
        wish = self.wishes.get(node)
        if wish is None or node not in self.taints:
            return []
        return taint_patch(self.taints[node], wish.taints, wish.keys)

    def pending(self) -> list[str]:
        """Known nodes whose taints differ from their wish."""
        return [node for node in sorted(self.wishes) if self.patch(node)]


def _name_of(node: Mapping[str, Any]) -> str | None:
    name = (node.get("metadata") or {}).get("name")
    return name if isinstance(name, str) and name else None
