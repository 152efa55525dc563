"""Workflow definitions in YAML: parse, validate everything at once, and build a ``WorkflowSpec``.

The format is documented in ``docs/workflows.md``. :func:`load` either returns a spec that the
engine can run without further checks, or raises :class:`WorkflowInvalid` with every problem it
found, each with its line in the YAML (line 0: the problem is not in the text, e.g. the name).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import ValidationError

from events.function import FUNCTION_NAME
from events.workflow import StepSpec, WorkflowSpec
from services.workflow.expr import Expr, ExprError, parse

__all__ = ["MAX_STEPS", "STEP_ID", "WorkflowInvalid", "load"]

STEP_ID = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
"""Step ids are DNS labels starting with a letter, so ``$.steps.<id>`` needs no quoting."""

MAX_STEPS = 500
MAX_VALUES = 100_000
"""Values in a definition once YAML aliases are expanded: a guard against alias bombs."""
MAX_DEPTH = 64
"""How deeply a template may nest (a recursive YAML alias would nest forever)."""

TOP_KEYS = ("name", "description", "prewarm", "steps", "output")
STEP_KEYS = (
    "id",
    "description",
    "function",
    "input",
    "after",
    "when",
    "map",
    "max_parallel",
    "timeout_s",
    "retries",
    "backoff_s",
)

Problem = tuple[int, str]
"""A line of the YAML (1-based; 0 when the problem is not in the text) and the reason."""


class WorkflowInvalid(ValueError):
    """A definition that cannot be created: every problem found, sorted by line."""

    def __init__(self, name: str, errors: list[Problem]) -> None:
        self.name = name
        self.errors: list[Problem] = sorted(dict.fromkeys(errors), key=lambda problem: problem[0])
        super().__init__(str(self))

    def __str__(self) -> str:
        lines = [f"line {line}: {reason}" if line else reason for line, reason in self.errors]
        return f"workflow {self.name!r} is invalid:\n  " + "\n  ".join(lines)


class _TooLarge(Exception):
    pass


@dataclass
class _Draft:
    """One step as read from the YAML, before it becomes a ``StepSpec``."""

    line: int
    fields: dict[str, Any] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    """Field name -> the line of its value."""
    exprs: list[tuple[str, int, Expr]] = field(default_factory=list)
    """(field, line, expression) for every expression of the step that parsed."""
    after: list[tuple[str, int]] = field(default_factory=list)

    @property
    def id(self) -> str | None:
        value = self.fields.get("id")
        return value if isinstance(value, str) else None


def load(name: str, yaml_text: str, known_function: Callable[[str], bool]) -> WorkflowSpec:
    """Validate the YAML definition of workflow ``name`` and return its spec.

    ``known_function(name)`` says whether a function exists. Raises :class:`WorkflowInvalid` with
    all the problems found: bad YAML, unknown keys, bad ids, unknown or cyclic ``after``, unknown
    functions, expressions that do not parse or read steps the step does not run after, numbers
    out of range.
    """
    return _Loader(name, yaml_text, known_function).load()


class _Loader:
    def __init__(self, name: str, text: str, known_function: Callable[[str], bool]) -> None:
        self.name = name
        self.text = text
        self.known_function = known_function
        self.problems: list[Problem] = []
        self.budget = MAX_VALUES
        self.yaml: Any = None

    def problem(self, line: int, reason: str, value: Any = None) -> None:
        """Record a problem, unless it is about a value whose YAML was already reported."""
        if value is not _REPORTED:
            self.problems.append((line, reason))

    def invalid(self) -> WorkflowInvalid:
        return WorkflowInvalid(self.name, self.problems)

    def load(self) -> WorkflowSpec:
        if not isinstance(self.name, str) or not FUNCTION_NAME.match(self.name):
            self.problem(0, f"workflow names are lowercase DNS labels ([a-z0-9-], at most 63 chars): {self.name!r}")
        if not isinstance(self.text, str):
            self.problem(0, "the definition must be YAML text")
            raise self.invalid()
        self.yaml = yaml.SafeLoader(self.text)
        try:
            return self._load()
        except _TooLarge:
            self.problem(1, f"too large: more than {MAX_VALUES} values once YAML aliases are expanded")
            raise self.invalid() from None
        finally:
            self.yaml.dispose()

    def _load(self) -> WorkflowSpec:
        try:
            root = self.yaml.get_single_node()
        except yaml.MarkedYAMLError as error:
            self.problem(*_yaml_problem(error))
            raise self.invalid() from None
        except yaml.YAMLError as error:
            self.problem(1, f"invalid YAML: {error}")
            raise self.invalid() from None
        if root is None:
            self.problem(1, "the definition is empty: it needs a mapping with `steps`")
            raise self.invalid()
        top = self.mapping(root, "the top level", TOP_KEYS)
        if top is None:
            raise self.invalid()

        if "name" in top:
            declared = self.scalar(top["name"])
            if declared != self.name:
                self.problem(
                    _line(top["name"]), f"`name` is {declared!r} but the workflow is created as {self.name!r}", declared
                )
        if "description" in top and not isinstance(description := self.scalar(top["description"]), str):
            self.problem(_line(top["description"]), "`description` must be a string", description)
        prewarm = True
        if "prewarm" in top:
            value = self.scalar(top["prewarm"])
            if isinstance(value, bool):
                prewarm = value
            else:
                self.problem(_line(top["prewarm"]), "`prewarm` must be true or false", value)

        drafts = self.steps(top.get("steps"), _line(root))
        specs = self.check_steps(drafts)

        output: Any = None
        if "output" in top:
            exprs: list[tuple[str, int, Expr]] = []
            output = self.template(top["output"], "output", exprs)
            ids = {draft.id for draft in drafts if draft.id}
            for _, line, expr in exprs:
                for step in sorted(expr.references() - ids):
                    self.problem(line, f"`output` reads `$.steps.{step}` but there is no step `{step}`")
                for local in sorted(expr.roots() & {"item", "index"}):
                    self.problem(line, f"`output` reads `$.{local}`, which only exists in a step with `map`")

        if self.problems:
            raise self.invalid()
        return WorkflowSpec(name=self.name, steps=specs, output=output, prewarm=prewarm, source=self.text)

    # -- structure

    def mapping(self, node: Any, what: str, allowed: tuple[str, ...]) -> dict[str, Any] | None:
        """A mapping node's keys -> value nodes; unknown or repeated keys are problems."""
        if not isinstance(node, yaml.MappingNode):
            self.problem(_line(node), f"{what} must be a mapping, not {_kind(node)}")
            return None
        own_keys = [key for key, _ in node.value if key.tag != "tag:yaml.org,2002:merge"]
        try:
            self.yaml.flatten_mapping(node)
        except yaml.MarkedYAMLError as error:
            self.problem(*_yaml_problem(error))
            return None
        seen: set[Any] = set()
        for key in own_keys:
            value = self.scalar(key) if isinstance(key, yaml.ScalarNode) else None
            if value in seen and isinstance(value, str):
                self.problem(_line(key), f"`{value}` is given twice in {what}")
            seen.add(value)
        found: dict[str, Any] = {}
        for key, value in node.value:
            name = self.scalar(key) if isinstance(key, yaml.ScalarNode) else None
            if not isinstance(name, str):
                self.problem(_line(key), f"keys of {what} are names, not {_kind(key)}")
            elif name not in allowed:
                self.problem(_line(key), f"unknown key `{name}` in {what} (known: {', '.join(allowed)})")
            else:
                found[name] = value
        return found

    def steps(self, node: Any, root_line: int) -> list[_Draft]:
        if node is None:
            self.problem(root_line, "`steps` is missing: a workflow needs at least one step")
            return []
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            self.problem(_line(node), "`steps` must be a non-empty list of steps")
            return []
        if len(node.value) > MAX_STEPS:
            self.problem(_line(node), f"more than {MAX_STEPS} steps")
            return []
        return [draft for item in node.value if (draft := self.step(item)) is not None]

    def step(self, node: Any) -> _Draft | None:
        self.spend()
        keys = self.mapping(node, "a step", STEP_KEYS)
        if keys is None:
            return None
        draft = _Draft(line=_line(node))
        draft.fields["line"] = draft.line
        for key, value_node in keys.items():
            draft.lines[key] = _line(value_node)
        where = _line(node)

        if "id" not in keys:
            self.problem(where, "a step needs an `id`")
        else:
            step_id = self.scalar(keys["id"])
            if not isinstance(step_id, str) or not STEP_ID.match(step_id):
                self.problem(
                    draft.lines["id"],
                    f"step id {step_id!r} must be a lowercase DNS label starting with a letter ([a-z0-9-], at most 63)",
                    step_id,
                )
            else:
                draft.fields["id"] = step_id
        label = f"step `{draft.id}`" if draft.id else "a step"

        if "function" not in keys:
            self.problem(where, f"{label} needs a `function`")
        else:
            function = self.scalar(keys["function"])
            if not isinstance(function, str) or not function:
                self.problem(draft.lines["function"], f"`function` of {label} must be a function name", function)
            else:
                draft.fields["function"] = function

        if "description" in keys and not isinstance(description := self.scalar(keys["description"]), str):
            self.problem(draft.lines["description"], f"`description` of {label} must be a string", description)

        if "input" in keys:
            draft.fields["input"] = self.template(keys["input"], f"`input` of {label}", draft.exprs, "input")

        if "after" in keys:
            self.after(keys["after"], draft, label)

        for name in ("when", "map"):
            if name not in keys:
                continue
            value = self.scalar(keys[name]) if isinstance(keys[name], yaml.ScalarNode) else None
            if name == "when" and isinstance(value, bool):
                value = "true" if value else "false"
            if not isinstance(value, str):
                self.problem(draft.lines[name], f"`{name}` of {label} must be an expression (a string)", value)
                continue
            expr = self.expression(value, draft.lines[name], f"`{name}` of {label}")
            if expr is not None:
                draft.exprs.append((name, draft.lines[name], expr))
            draft.fields[name] = value

        for name, kind in (("max_parallel", int), ("retries", int), ("timeout_s", float), ("backoff_s", float)):
            if name not in keys:
                continue
            number = self.scalar(keys[name]) if isinstance(keys[name], yaml.ScalarNode) else None
            if not _is_number(number, integer=kind is int):
                wanted = "a whole number" if kind is int else "a number (seconds)"
                self.problem(draft.lines[name], f"`{name}` of {label} must be {wanted}, not {number!r}", number)
                continue
            draft.fields[name] = number
        if "max_parallel" in keys and "map" not in keys:
            self.problem(draft.lines["max_parallel"], f"`max_parallel` of {label} only applies to a step with `map`")
        return draft

    def after(self, node: Any, draft: _Draft, label: str) -> None:
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        names: list[str] = []
        for item in items:
            self.spend()
            value = self.scalar(item) if isinstance(item, yaml.ScalarNode) else None
            if not isinstance(value, str):
                self.problem(_line(item), f"`after` of {label} lists step ids, not {_kind(item)}", value)
                continue
            if value not in names:
                names.append(value)
                draft.after.append((value, _line(item)))
        draft.fields["after"] = names

    # -- the whole graph

    def check_steps(self, drafts: list[_Draft]) -> list[StepSpec]:
        by_id: dict[str, _Draft] = {}
        for draft in drafts:
            if draft.id is None:
                continue
            if draft.id in by_id:
                self.problem(draft.lines["id"], f"step id `{draft.id}` is already used on line {by_id[draft.id].line}")
            else:
                by_id[draft.id] = draft

        graph: dict[str, list[str]] = {}
        for step_id, draft in by_id.items():
            deps: list[str] = []
            for dep, line in draft.after:
                if dep == step_id:
                    self.problem(line, f"step `{step_id}` cannot run after itself")
                elif dep not in by_id:
                    self.problem(line, f"step `{step_id}` runs after `{dep}`, but there is no step `{dep}`")
                else:
                    deps.append(dep)
            graph[step_id] = deps
        for cycle in _cycles(graph):
            self.problem(
                by_id[cycle[0]].line, "cycle in `after`: " + " -> ".join(cycle) + " (each runs after the next)"
            )

        ancestors = _ancestors(graph)
        for step_id, draft in by_id.items():
            for name, line, expr in draft.exprs:
                where = f"`{name}` of step `{step_id}`"
                for ref in sorted(expr.references()):
                    if ref == step_id:
                        self.problem(line, f"{where} reads its own step (`$.steps.{ref}`)")
                    elif ref not in by_id:
                        self.problem(line, f"{where} reads `$.steps.{ref}`, but there is no step `{ref}`")
                    elif ref not in ancestors[step_id]:
                        self.problem(
                            line,
                            f"{where} reads `$.steps.{ref}`, but step `{step_id}` does not run after `{ref}`: "
                            f"add `{ref}` to its `after`",
                        )
                for local in sorted(expr.roots() & {"item", "index"}):
                    if name != "input":
                        self.problem(line, f"{where} reads `$.{local}`, which only exists in a mapped step's `input`")
                    elif "map" not in draft.fields:
                        self.problem(line, f"{where} reads `$.{local}`, which only exists in a step with `map`")

        verdicts: dict[str, bool] = {}
        specs: list[StepSpec] = []
        for draft in drafts:
            function = draft.fields.get("function")
            if isinstance(function, str):
                if function not in verdicts:
                    verdicts[function] = bool(self.known_function(function))
                if not verdicts[function]:
                    self.problem(draft.lines["function"], f"unknown function `{function}`")
            if "id" not in draft.fields or "function" not in draft.fields:
                continue
            try:
                specs.append(StepSpec.model_validate(draft.fields))
            except ValidationError as error:
                for detail in error.errors():
                    key = str(detail["loc"][0]) if detail["loc"] else ""
                    self.problem(draft.lines.get(key, draft.line), f"`{key}` of step `{draft.id}`: {detail['msg']}")
        return specs

    # -- values

    def spend(self, n: int = 1) -> None:
        self.budget -= n
        if self.budget < 0:
            raise _TooLarge

    def scalar(self, node: Any) -> Any:
        """The Python value of a scalar node (YAML 1.1 types, as ``yaml.safe_load`` gives them)."""
        self.spend()
        if not isinstance(node, yaml.ScalarNode):
            return _Unconvertible(_kind(node))
        try:
            return self.yaml.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as error:
            self.problem(*_yaml_problem(error))
            return _REPORTED

    def expression(self, text: str, line: int, where: str) -> Expr | None:
        try:
            return parse(text)
        except ExprError as error:
            self.problem(line, f"{where}: cannot parse `{text}`: column {error.column}: {error.message}")
            return None

    def template(
        self, node: Any, where: str, exprs: list[tuple[str, int, Expr]], name: str = "output", depth: int = 0
    ) -> Any:
        """A JSON template from its node: checks JSON types and parses each ``$`` string."""
        self.spend()
        if depth > MAX_DEPTH:
            self.problem(_line(node), f"{where}: nested deeper than {MAX_DEPTH} levels")
            return None
        if isinstance(node, yaml.ScalarNode):
            value = self.scalar(node)
            if isinstance(value, _Unconvertible):
                return None
            if not _is_json_scalar(value):
                self.problem(
                    _line(node), f"{where}: {node.value!r} is not a JSON value ({type(value).__name__}): quote it"
                )
                return None
            if isinstance(value, str) and value.startswith("$") and not value.startswith("$$"):
                expr = self.expression(value, _line(node), where)
                if expr is not None:
                    exprs.append((name, _line(node), expr))
            return value
        if isinstance(node, yaml.SequenceNode):
            return [self.template(item, where, exprs, name, depth + 1) for item in node.value]
        if isinstance(node, yaml.MappingNode):
            try:
                self.yaml.flatten_mapping(node)
            except yaml.MarkedYAMLError as error:
                self.problem(*_yaml_problem(error))
                return None
            result: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = self.scalar(key_node)
                if not isinstance(key, str):
                    self.problem(_line(key_node), f"{where}: keys are strings, not {_kind(key_node)}: quote it")
                    continue
                result[key] = self.template(value_node, where, exprs, name, depth + 1)
            return result
        self.problem(_line(node), f"{where}: not a JSON value")
        return None


@dataclass(frozen=True)
class _Unconvertible:
    kind: str

    def __repr__(self) -> str:
        return self.kind


_REPORTED = _Unconvertible("a value YAML could not read")


def _line(node: Any) -> int:
    mark = getattr(node, "start_mark", None)
    return mark.line + 1 if mark is not None else 0


def _kind(node: Any) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if isinstance(node, yaml.ScalarNode):
        return f"`{node.value}`"
    return "nothing"


def _yaml_problem(error: Any) -> Problem:
    mark = error.problem_mark or error.context_mark
    line = mark.line + 1 if mark is not None else 1
    reason = ": ".join(part for part in (error.context, error.problem) if part)
    return line, f"invalid YAML: {reason or error}"


def _is_number(value: Any, integer: bool) -> bool:
    if isinstance(value, bool):
        return False
    if integer:
        return isinstance(value, int)
    return isinstance(value, int | float) and math.isfinite(value)


def _is_json_scalar(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, str | int | bool)


def _cycles(graph: dict[str, list[str]]) -> Iterator[list[str]]:
    """Each cycle once, as a path ``a, b, ..., a`` (a runs after b ...), in definition order."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in graph:
        if start in state:
            continue
        path: list[str] = [start]
        state[start] = 1
        stack: list[Iterator[str]] = [iter(graph[start])]
        while stack:
            dep = next(stack[-1], None)
            if dep is None:
                stack.pop()
                state[path.pop()] = 2
            elif state.get(dep) == 1:
                yield path[path.index(dep) :] + [dep]
            elif dep not in state:
                state[dep] = 1
                path.append(dep)
                stack.append(iter(graph[dep]))


def _ancestors(graph: dict[str, list[str]]) -> dict[str, set[str]]:
    """Every step each step runs after, directly or not (cycles tolerated)."""
    result: dict[str, set[str]] = {}
    for step in graph:
        seen: set[str] = set()
        todo = list(graph[step])
        while todo:
            dep = todo.pop()
            if dep not in seen:
                seen.add(dep)
                todo.extend(graph.get(dep, ()))
        result[step] = seen
    return result
