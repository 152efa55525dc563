"""Kubernetes Nodes -> Stoker node facts, and wanted taints -> a Node JSON patch. Pure functions.

Everything here works on the API's own JSON (``metadata.labels``, ``spec.taints``,
``status.allocatable``, camelCase, as a watch event's ``raw_object`` holds it), so it is tested
with plain dicts and needs no client library.

* :func:`node_to_registration` gives the fields a node registration carries: the same names and
  types as :class:`events.node.NodeHeartbeat` (``node``, ``labels``, ``taints``, ``capacity``),
  plus what only Kubernetes knows (``unschedulable``, ``ready``).
* :func:`cpu_millis` and :func:`memory_mb` read Kubernetes quantities ("2", "1500m", "8Gi",
  "8000Mi", "8388608Ki", "8G", "1e9").
* :func:`taint_patch` is the JSON patch that makes a node's taints with some keys exactly the
  wanted ones, leaving every other taint alone, and fails if the node changed in between.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any, get_args

from events.node import NodeCapacity, Taint

ROLE_LABEL = "stoker.io/role"
MAX_INSTANCES_KEY = "stoker.io/max-instances"
"""Annotation (or label) of a node that sets its ``capacity.max_instances``."""
MANAGED_TAINT_PREFIX = "stoker.io/"
"""Taint keys Stoker may add or remove; every other taint belongs to someone else."""
EFFECTS: tuple[str, ...] = get_args(Taint.model_fields["effect"].annotation)
"""NoSchedule, PreferNoSchedule, NoExecute."""

_MIB = Decimal(1024 * 1024)
_SUFFIXES: dict[str, Decimal] = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}
# Kubernetes' quantity grammar: a signed decimal number, then a binary or decimal SI suffix or a
# decimal exponent ("1e3", "1E-3").
_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?)$")


class QuantityError(ValueError):
    """Text that is not a Kubernetes quantity."""


def parse_quantity(value: str | int | float) -> Decimal:
    """A Kubernetes quantity ("1500m", "8Gi", "2", "1e3") as an exact decimal in base units."""
    if isinstance(value, bool):
        raise QuantityError(f"not a quantity: {value!r}")
    if isinstance(value, int | float):
        return Decimal(str(value))
    text = value.strip()
    m = _QUANTITY.match(text)
    if m is None:
        raise QuantityError(f"not a Kubernetes quantity: {value!r}")
    number, exponent, suffix = m.groups()
    try:
        amount = Decimal(number)
    except InvalidOperation as exc:  # pragma: no cover - the pattern admits only decimals
        raise QuantityError(f"not a Kubernetes quantity: {value!r}") from exc
    if exponent:
        return amount * (Decimal(10) ** int(exponent[1:]))
    return amount * _SUFFIXES[suffix or ""]


def _non_negative_floor(amount: Decimal, what: str, value: object) -> int:
    if amount < 0:
        raise QuantityError(f"negative {what}: {value!r}")
    return int(amount.to_integral_value(rounding=ROUND_FLOOR))


def cpu_millis(value: str | int | float) -> int:
    """CPU in millicores: "2" -> 2000, "1500m" -> 1500, "0.5" -> 500 (rounded down)."""
    return _non_negative_floor(parse_quantity(value) * 1000, "cpu", value)


def memory_mb(value: str | int | float) -> int:
    """Memory in MiB (the unit of function ``--memory``): "8Gi", "8192Mi", "8388608Ki" -> 8192.

    Decimal suffixes are bytes too: "8G" is 8e9 bytes, 7629 MiB. Rounded down.
    """
    return _non_negative_floor(parse_quantity(value) / _MIB, "memory", value)


def _get(obj: Mapping[str, Any] | None, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def node_name(node: Mapping[str, Any]) -> str:
    name = _get(node, "metadata", "name")
    if not isinstance(name, str) or not name:
        raise ValueError("a Node without metadata.name")
    return name


def node_taints(node: Mapping[str, Any]) -> list[Taint]:
    """``spec.taints`` as Stoker taints, in the node's order; effects Stoker does not know are left out."""
    taints = []
    for raw in _get(node, "spec", "taints") or []:
        if not isinstance(raw, Mapping) or not raw.get("key") or raw.get("effect") not in EFFECTS:
            continue
        taints.append(Taint(key=raw["key"], value=raw.get("value") or "", effect=raw["effect"]))
    return taints


def node_capacity(node: Mapping[str, Any], default_max_instances: int = 8) -> NodeCapacity:
    """What the node offers: ``status.allocatable`` (else ``status.capacity``) and max instances.

    ``max_instances`` comes from the node's ``stoker.io/max-instances`` annotation or label (a
    positive integer), else ``default_max_instances``. A resource the node does not report keeps
    the :class:`NodeCapacity` default.
    """
    status = _get(node, "status") or {}
    resources = status.get("allocatable") or status.get("capacity") or {}
    fields: dict[str, int] = {"max_instances": default_max_instances}
    for source in (_get(node, "metadata", "labels"), _get(node, "metadata", "annotations")):
        raw = (source or {}).get(MAX_INSTANCES_KEY)
        if isinstance(raw, str) and raw.strip().isdigit() and int(raw) > 0:
            fields["max_instances"] = int(raw)  # the annotation, read last, wins over the label
    if "cpu" in resources:
        fields["cpu_millis"] = cpu_millis(resources["cpu"])
    if "memory" in resources:
        fields["memory_mb"] = memory_mb(resources["memory"])
    return NodeCapacity(**fields)


def node_ready(node: Mapping[str, Any]) -> bool:
    """The node's ``Ready`` condition is ``True``."""
    for condition in _get(node, "status", "conditions") or []:
        if isinstance(condition, Mapping) and condition.get("type") == "Ready":
            return condition.get("status") == "True"
    return False


def node_to_registration(node: Mapping[str, Any], *, default_max_instances: int = 8) -> dict[str, Any]:
    """The registration facts of one Kubernetes Node (the API's JSON).

    Returns ``node``, ``labels``, ``taints`` (:class:`Taint`), ``capacity`` (:class:`NodeCapacity`):
    the fields of a :class:`NodeHeartbeat`, which ``NodeHeartbeat(incarnation=..., **fields)``
    accepts (it ignores the rest); and ``unschedulable`` (cordoned) and ``ready`` (its Ready
    condition), which only Kubernetes knows. Raises :class:`QuantityError` for a malformed
    quantity and ``ValueError`` for a Node without a name.
    """
    labels = _get(node, "metadata", "labels") or {}
    return {
        "node": node_name(node),
        "labels": {str(k): str(v) for k, v in labels.items()},
        "taints": node_taints(node),
        "capacity": node_capacity(node, default_max_instances),
        "unschedulable": bool(_get(node, "spec", "unschedulable")),
        "ready": node_ready(node),
    }


def _triple(taint: Mapping[str, Any] | Taint) -> tuple[str, str, str]:
    if isinstance(taint, Taint):
        return taint.key, taint.value, taint.effect
    return str(taint.get("key", "")), str(taint.get("value") or ""), str(taint.get("effect", ""))


def _as_api(taint: Taint) -> dict[str, str]:
    raw = {"key": taint.key, "effect": taint.effect}
    if taint.value:
        raw["value"] = taint.value
    return raw


def wanted_taints(
    current: Sequence[Mapping[str, Any]] | None,
    wanted: Iterable[Taint | Mapping[str, Any]],
    keys: Iterable[str] | None = None,
    *,
    allowed_prefix: str | None = MANAGED_TAINT_PREFIX,
) -> list[dict[str, Any]]:
    """The node's taints after the request: those with a key outside ``keys`` as they are (in
    order), then the wanted ones (an identical existing taint kept as is, with its ``timeAdded``).

    ``keys`` are the taint keys the request owns (default: the wanted taints' keys): their taints
    that are not wanted are removed. Raises ``ValueError`` for a wanted taint outside ``keys``,
    a duplicate (key, effect), an unknown effect, or a key outside ``allowed_prefix``.
    """
    wanted_list = [w if isinstance(w, Taint) else Taint.model_validate(w) for w in wanted]
    owned = set(keys) if keys is not None else {t.key for t in wanted_list}
    for key in owned:
        if allowed_prefix is not None and not key.startswith(allowed_prefix):
            raise ValueError(f"taint key {key!r} is not Stoker's to manage (only {allowed_prefix}*)")
    seen: set[tuple[str, str]] = set()
    for t in wanted_list:
        if t.key not in owned:
            raise ValueError(f"wanted taint {t.key!r} is outside the keys of the request {sorted(owned)}")
        if (t.key, t.effect) in seen:
            raise ValueError(f"taint {t.key}:{t.effect} is wanted twice")
        seen.add((t.key, t.effect))
    existing = [dict(t) for t in current or []]
    kept = [t for t in existing if _triple(t)[0] not in owned]
    by_triple = {_triple(t): t for t in existing if _triple(t)[0] in owned}
    return kept + [by_triple.get(_triple(t), _as_api(t)) for t in wanted_list]


def taint_patch(
    current: Sequence[Mapping[str, Any]] | None,
    wanted: Iterable[Taint | Mapping[str, Any]],
    keys: Iterable[str] | None = None,
    *,
    allowed_prefix: str | None = MANAGED_TAINT_PREFIX,
) -> list[dict[str, Any]]:
    """The JSON patch (RFC 6902) of a Node that makes its taints :func:`wanted_taints`.

    ``current`` is the node's ``spec.taints`` exactly as the API returned it (``None``: none).
    Empty when nothing changes (order aside). Otherwise the patch first *tests* that
    ``spec.taints`` is still ``current``, so a node changed meanwhile (the node controller adding
    ``node.kubernetes.io/not-ready``, say) makes the API refuse it (422) instead of the patch
    dropping the new taint; the caller re-reads the node and tries again. Send it with content type
    ``application/json-patch+json`` (kubernetes-asyncio does so for a list body).
    """
    desired = wanted_taints(current, wanted, keys, allowed_prefix=allowed_prefix)
    existing = [dict(t) for t in current or []]
    if Counter(_triple(t) for t in desired) == Counter(_triple(t) for t in existing):
        return []
    if not existing:
        # The API leaves an empty list out, so there is nothing to test: `add` creates the field.
        return [{"op": "add", "path": "/spec/taints", "value": desired}]
    test = {"op": "test", "path": "/spec/taints", "value": existing}
    if not desired:
        return [test, {"op": "remove", "path": "/spec/taints"}]
    return [test, {"op": "replace", "path": "/spec/taints", "value": desired}]
