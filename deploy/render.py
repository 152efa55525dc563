"""Render the Helm chart in ``deploy/helm/stoker`` to plain manifests, without Helm.

``python -m deploy.render`` (from the repository root) writes ``deploy/k8s/stoker.yaml``, which is
committed and applied with ``kubectl apply -f deploy/k8s/``. ``--check`` renders into memory and
fails when the committed file differs; ``--values FILE`` (repeatable) layers values over the chart's.

The chart stays a real Helm chart (``helm template`` renders it too); this module understands only
the subset of Go templates and Sprig that the chart uses, and refuses everything else by name, so a
template it renders renders to the same data under Helm (the text may differ in YAML quoting
style: ``toYaml`` here is PyYAML, not go-yaml). What it understands:

* text and actions ``{{ ... }}``, with ``{{-`` / ``-}}`` trimming the whitespace beside them, and
  comments ``{{/* ... */}}``;
* ``if`` / ``else if`` / ``else`` / ``end``, ``with`` (and its ``else``), ``range`` over lists and
  maps (maps in sorted key order, like Go) with ``range $v := ...`` and ``range $k, $v := ...``,
  ``define "name"`` (in any template; files named ``_*.tpl`` only define);
* variables ``$`` (the root), ``$name := pipeline``, and fields ``.Values.a.b``, ``$.Release.Name``,
  ``$v.key``; built-in objects ``.Values``, ``.Release`` (Name, Namespace, Service, IsInstall,
  IsUpgrade, Revision), ``.Chart`` (the fields of Chart.yaml, capitalised like Helm's) and
  ``.Template`` (Name, BasePath);
* pipelines ``a | f b`` (the value goes last), parenthesised pipelines, string, number and
  boolean literals;
* functions ``include``, ``toYaml``, ``indent``, ``nindent``, ``quote``, ``default``,
  ``required``, ``b64enc``, ``trunc``, ``trimSuffix``, ``lower``, ``not``, ``and``, ``or``,
  ``eq``, ``ne``, ``empty``, ``list``, ``dict``.

Stricter than Helm on purpose: a missing value printed as text, a field of a missing value, a
number that Go would print differently from Python (floats with no fraction, numbers of a
million or more: quote them in values) are errors rather than silently different output.
"""

from __future__ import annotations

import argparse
import base64
import copy
import difflib
import json
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent
CHART = ROOT / "helm" / "stoker"
OUT = ROOT / "k8s" / "stoker.yaml"
DEFAULT_RELEASE = "stoker"
DEFAULT_NAMESPACE = "stoker"

# Helm's install order (pkg/releaseutil/kind_sorter.go), so one file applies cleanly in order.
INSTALL_ORDER = [
    "PriorityClass",
    "Namespace",
    "NetworkPolicy",
    "ResourceQuota",
    "LimitRange",
    "PodSecurityPolicy",
    "PodDisruptionBudget",
    "ServiceAccount",
    "Secret",
    "SecretList",
    "ConfigMap",
    "StorageClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleList",
    "ClusterRoleBinding",
    "ClusterRoleBindingList",
    "Role",
    "RoleList",
    "RoleBinding",
    "RoleBindingList",
    "Service",
    "DaemonSet",
    "Pod",
    "ReplicationController",
    "ReplicaSet",
    "Deployment",
    "HorizontalPodAutoscaler",
    "StatefulSet",
    "Job",
    "CronJob",
    "IngressClass",
    "Ingress",
    "APIService",
]


class TemplateError(Exception):
    """A template the renderer cannot render; the message names the template and the line."""


# --------------------------------------------------------------------------- lexing


@dataclass
class _Text:
    text: str


@dataclass
class _Action:
    body: str
    line: int
    trim_left: bool
    trim_right: bool
    comment: bool = False


_ACTION = re.compile(r"\{\{(-\s)?")


def _split(source: str, name: str) -> list[_Text | _Action]:
    """Text and actions, trimming done."""
    parts: list[_Text | _Action] = []
    pos = 0
    while True:
        m = _ACTION.search(source, pos)
        if m is None:
            parts.append(_Text(source[pos:]))
            break
        parts.append(_Text(source[pos : m.start()]))
        line = source.count("\n", 0, m.start()) + 1
        end = _find_close(source, m.end(), name, line)
        inner = source[m.end() : end]
        trim_right = False
        if inner.endswith(" -") or inner.endswith("\n-") or inner.endswith("\t-"):
            trim_right = True
            inner = inner[:-1]
        comment = source.startswith("/*", m.end())
        parts.append(_Action(inner.strip(), line, m.group(1) is not None, trim_right, comment))
        pos = end + 2
    # Apply the trim markers to the neighbouring text.
    for i, part in enumerate(parts):
        if isinstance(part, _Action):
            if part.trim_left and i > 0 and isinstance(parts[i - 1], _Text):
                prev = parts[i - 1]
                assert isinstance(prev, _Text)
                prev.text = prev.text.rstrip(" \t\r\n")
            if part.trim_right and i + 1 < len(parts) and isinstance(parts[i + 1], _Text):
                nxt = parts[i + 1]
                assert isinstance(nxt, _Text)
                nxt.text = nxt.text.lstrip(" \t\r\n")
    return parts


def _find_close(source: str, start: int, name: str, line: int) -> int:
    """Index of the ``}}`` closing an action, skipping string literals and comments."""
    i = start
    if source.startswith("/*", i):  # Go: the comment starts right after `{{` or `{{- `
        close = source.find("*/", i)
        if close < 0:
            raise TemplateError(f"{name}:{line}: unclosed comment")
        end = source.find("}}", close)
        if end < 0:
            raise TemplateError(f"{name}:{line}: unclosed action")
        return end
    while i < len(source):
        ch = source[i]
        if ch in '"`':
            j = i + 1
            while j < len(source) and source[j] != ch:
                j += 2 if ch == '"' and source[j] == "\\" else 1
            i = j + 1
            continue
        if source.startswith("}}", i):
            return i
        i += 1
    raise TemplateError(f"{name}:{line}: unclosed action")


_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<number>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?![\w.])
  | (?P<declare>:=)
  | (?P<assign>=)
  | (?P<pipe>\|)
  | (?P<lparen>\()
  | (?P<rparen>\))
  | (?P<comma>,)
  | (?P<variable>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    """,
    re.VERBOSE,
)


@dataclass
class _Tok:
    kind: str
    text: str


def _tokens(body: str, where: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    while pos < len(body):
        m = _TOKEN.match(body, pos)
        if m is None:
            raise TemplateError(f"{where}: cannot read {body[pos:]!r}")
        kind = m.lastgroup or ""
        if kind != "space":
            toks.append(_Tok(kind, m.group()))
        pos = m.end()
    return toks


# --------------------------------------------------------------------------- expressions


@dataclass
class _Literal:
    value: Any


@dataclass
class _Field:
    base: str | None
    """None for dot, ``""`` for ``$``, else the variable name."""
    path: list[str]


@dataclass
class _Call:
    name: str
    args: list[Any]


@dataclass
class _Pipeline:
    commands: list[Any]
    """Each a _Call, or a single operand (only as the first command)."""
    declare: list[str] = field(default_factory=list)
    assign: bool = False


def _parse_pipeline(toks: list[_Tok], where: str) -> _Pipeline:
    pos = 0
    declare: list[str] = []
    assign = False
    # `$a := ...`, `$k, $v := ...`
    names: list[str] = []
    scan = 0
    while scan < len(toks) and toks[scan].kind == "variable" and "." not in toks[scan].text:
        names.append(toks[scan].text[1:])
        scan += 1
        if scan < len(toks) and toks[scan].kind == "comma":
            scan += 1
            continue
        break
    if names and scan < len(toks) and toks[scan].kind in ("declare", "assign"):
        declare, assign, pos = names, toks[scan].kind == "assign", scan + 1
    pipeline, pos = _parse_commands(toks, pos, where)
    if pos != len(toks):
        raise TemplateError(f"{where}: unexpected {toks[pos].text!r}")
    pipeline.declare, pipeline.assign = declare, assign
    return pipeline


def _parse_commands(toks: list[_Tok], pos: int, where: str) -> tuple[_Pipeline, int]:
    commands: list[Any] = []
    while True:
        args: list[Any] = []
        while pos < len(toks) and toks[pos].kind not in ("pipe", "rparen"):
            tok = toks[pos]
            if tok.kind == "lparen":
                inner, pos = _parse_commands(toks, pos + 1, where)
                if pos >= len(toks) or toks[pos].kind != "rparen":
                    raise TemplateError(f"{where}: unclosed parenthesis")
                args.append(inner)
                pos += 1
                continue
            args.append(_operand(tok, where))
            pos += 1
        if not args:
            raise TemplateError(f"{where}: empty command in pipeline")
        head = args[0]
        if isinstance(head, _Call) and not head.args:
            commands.append(_Call(head.name, args[1:]))
        elif len(args) == 1:
            if commands:
                raise TemplateError(f"{where}: only a function can follow `|`")
            commands.append(head)
        else:
            raise TemplateError(f"{where}: cannot call a value with arguments (method calls are not supported)")
        if pos < len(toks) and toks[pos].kind == "pipe":
            pos += 1
            continue
        return _Pipeline(commands), pos


def _operand(tok: _Tok, where: str) -> Any:
    if tok.kind == "string":
        try:
            return _Literal(json.loads(tok.text))
        except ValueError as exc:
            raise TemplateError(f"{where}: string escapes beyond JSON's are not supported: {tok.text}") from exc
    if tok.kind == "raw":
        return _Literal(tok.text[1:-1])
    if tok.kind == "number":
        text = tok.text
        return _Literal(float(text) if any(c in text for c in ".eE") else int(text))
    if tok.kind == "field":
        return _Field(None, [p for p in tok.text.split(".") if p])
    if tok.kind == "variable":
        name, *path = tok.text[1:].split(".")
        return _Field(name, path)
    if tok.kind == "ident":
        if tok.text in ("true", "false"):
            return _Literal(tok.text == "true")
        if tok.text == "nil":
            return _Literal(None)
        if tok.text not in FUNCTIONS:
            raise TemplateError(f"{where}: function {tok.text!r} is not supported by deploy/render.py")
        return _Call(tok.text, [])
    raise TemplateError(f"{where}: unexpected {tok.text!r}")


# --------------------------------------------------------------------------- the tree


@dataclass
class _Node:
    kind: str
    """text, output, if, range, with, define, declare"""
    where: str = ""
    text: str = ""
    pipeline: _Pipeline | None = None
    body: list[_Node] = field(default_factory=list)
    orelse: list[_Node] = field(default_factory=list)
    name: str = ""
    elif_: bool = False
    """An ``else if``: closed by its outer block's end."""


def _parse_tree(source: str, name: str, defines: dict[str, list[_Node]]) -> list[_Node]:
    parts = _split(source, name)
    root: list[_Node] = []
    stack: list[tuple[_Node | None, list[_Node]]] = [(None, root)]
    for part in parts:
        current = stack[-1][1]
        if isinstance(part, _Text):
            if part.text:
                current.append(_Node("text", text=part.text))
            continue
        where = f"{name}:{part.line}"
        body = part.body
        if part.comment:
            if not body.endswith("*/"):
                raise TemplateError(f"{where}: a comment must be the whole action")
            continue
        if body.startswith("/*"):
            raise TemplateError(f"{where}: a comment must start right after `{{{{` or `{{{{- `")
        toks = _tokens(body, where)
        if not toks:
            raise TemplateError(f"{where}: empty action")
        word = toks[0].text if toks[0].kind == "ident" else ""
        if word in ("if", "range", "with"):
            node = _Node(word, where=where, pipeline=_parse_pipeline(toks[1:], where))
            current.append(node)
            stack.append((node, node.body))
        elif word == "define":
            if len(toks) != 2 or toks[1].kind != "string":
                raise TemplateError(f"{where}: define takes one quoted name")
            node = _Node("define", where=where, name=json.loads(toks[1].text))
            stack.append((node, node.body))
        elif word == "else":
            owner = stack[-1][0]
            if owner is None or owner.kind not in ("if", "range", "with") or owner.orelse:
                raise TemplateError(f"{where}: else without if/range/with")
            stack.pop()
            if len(toks) > 1:  # else if: a nested if in the else branch, closed by the same end
                if toks[1].text != "if" or owner.kind != "if":
                    raise TemplateError(f"{where}: only `else if` may follow else")
                nested = _Node("if", where=where, pipeline=_parse_pipeline(toks[2:], where), elif_=True)
                owner.orelse.append(nested)
                stack.append((owner, owner.orelse))
                stack.append((nested, nested.body))
            else:
                stack.append((owner, owner.orelse))
                owner.orelse.append(_Node("text", text=""))  # marks the else branch as started
        elif word == "end":
            if len(toks) != 1 or len(stack) == 1:
                raise TemplateError(f"{where}: end without a block")
            owner, _ = stack.pop()
            # an `else if` chain ends with the outer block
            while owner is not None and owner.elif_:
                owner, _ = stack.pop()
            if owner is not None and owner.kind == "define":
                defines[owner.name] = owner.body
        elif word in ("template", "block", "break", "continue"):
            raise TemplateError(f"{where}: `{word}` is not supported by deploy/render.py (use include)")
        else:
            pipeline = _parse_pipeline(toks, where)
            kind = "declare" if pipeline.declare else "output"
            current.append(_Node(kind, where=where, pipeline=pipeline))
    if len(stack) != 1:
        owner = stack[-1][0]
        raise TemplateError(f"{name}: {owner.kind if owner else 'block'} at {owner.where if owner else '?'} has no end")
    return root


# --------------------------------------------------------------------------- evaluation


class _Missing:
    """A value that is not there (Go's <no value>)."""

    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing()


def truthy(value: Any) -> bool:
    """Go template truth: false, 0, nil, and empty strings, lists and maps are false."""
    if value is None or value is MISSING:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, str | list | tuple | dict):
        return len(value) > 0
    return True


def go_string(value: Any, where: str) -> str:
    """How Go's fmt prints a value, for the values this renderer accepts."""
    if isinstance(value, str):
        return value
    if value is MISSING or value is None:
        raise TemplateError(f"{where}: renders a missing value (Helm would print nothing): check the values")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        # Helm reads values as float64: 1000000 prints as 1e+06, 2.0 as 2. Refuse what differs.
        if isinstance(value, float) and value.is_integer():
            raise TemplateError(f"{where}: {value!r} has no fraction: write it as an integer or quote it")
        if abs(value) >= 1_000_000 or (value != 0 and abs(value) < 0.0001):
            raise TemplateError(f"{where}: Go prints {value!r} in exponent form: quote it in the values")
        return repr(value)
    raise TemplateError(f"{where}: cannot print a {type(value).__name__} as text (use toYaml)")


@dataclass
class _Scope:
    dot: Any
    root: Any
    variables: list[dict[str, Any]]

    def lookup(self, name: str, where: str) -> Any:
        if name == "":
            return self.root
        for frame in reversed(self.variables):
            if name in frame:
                return frame[name]
        raise TemplateError(f"{where}: undefined variable ${name}")

    def child(self, dot: Any) -> _Scope:
        return _Scope(dot, self.root, [*self.variables, {}])


def _walk(value: Any, path: Sequence[str], where: str, shown: str) -> Any:
    for key in path:
        if value is MISSING or value is None:
            raise TemplateError(f"{where}: {shown}: nil pointer evaluating .{key} (a missing value has no fields)")
        if not isinstance(value, Mapping):
            raise TemplateError(f"{where}: {shown}: cannot take .{key} of a {type(value).__name__}")
        value = value.get(key, MISSING)
    return value


class Renderer:
    """Renders one chart's templates with one set of values."""

    def __init__(self, defines: dict[str, list[_Node]] | None = None) -> None:
        self.defines: dict[str, list[_Node]] = defines if defines is not None else {}
        self._depth = 0

    def parse(self, source: str, name: str) -> list[_Node]:
        return _parse_tree(source, name, self.defines)

    def render(self, nodes: list[_Node], dot: Any) -> str:
        return self._exec(nodes, _Scope(dot, dot, [{}]))

    def _exec(self, nodes: list[_Node], scope: _Scope) -> str:
        out: list[str] = []
        for node in nodes:
            if node.kind == "text":
                out.append(node.text)
            elif node.kind == "output":
                assert node.pipeline is not None
                out.append(go_string(self._pipeline(node.pipeline, scope, node.where), node.where))
            elif node.kind == "declare":
                assert node.pipeline is not None
                self._pipeline(node.pipeline, scope, node.where)
            elif node.kind == "if":
                assert node.pipeline is not None
                inner = scope.child(scope.dot)
                if truthy(self._pipeline(node.pipeline, inner, node.where)):
                    out.append(self._exec(node.body, inner))
                else:
                    out.append(self._exec(node.orelse, scope.child(scope.dot)))
            elif node.kind == "with":
                assert node.pipeline is not None
                inner = scope.child(scope.dot)
                value = self._pipeline(node.pipeline, inner, node.where)
                if truthy(value):
                    inner.dot = value
                    out.append(self._exec(node.body, inner))
                else:
                    out.append(self._exec(node.orelse, scope.child(scope.dot)))
            elif node.kind == "range":
                out.append(self._range(node, scope))
            else:  # pragma: no cover - the parser makes no other kinds
                raise TemplateError(f"{node.where}: unknown node {node.kind}")
        return "".join(out)

    def _range(self, node: _Node, scope: _Scope) -> str:
        assert node.pipeline is not None
        pipeline = node.pipeline
        names = pipeline.declare
        bare = _Pipeline(pipeline.commands)
        value = self._pipeline(bare, scope, node.where)
        items: list[tuple[Any, Any]]
        if value is MISSING or value is None:
            items = []
        elif isinstance(value, Mapping):
            items = [(k, value[k]) for k in sorted(value)]
        elif isinstance(value, list | tuple):
            items = list(enumerate(value))
        elif isinstance(value, int) and not isinstance(value, bool):
            items = [(i, i) for i in range(value)]
        else:
            raise TemplateError(f"{node.where}: cannot range over a {type(value).__name__}")
        if not items:
            return self._exec(node.orelse, scope.child(scope.dot))
        if len(names) > 2:
            raise TemplateError(f"{node.where}: range declares at most two variables")
        out = []
        for key, item in items:
            inner = scope.child(item)
            if len(names) == 1:
                inner.variables[-1][names[0]] = item
            elif len(names) == 2:
                inner.variables[-1][names[0]] = key
                inner.variables[-1][names[1]] = item
            out.append(self._exec(node.body, inner))
        return "".join(out)

    def _pipeline(self, pipeline: _Pipeline, scope: _Scope, where: str) -> Any:
        value: Any = MISSING
        for i, command in enumerate(pipeline.commands):
            if isinstance(command, _Call):
                args = [self._arg(a, scope, where) for a in command.args]
                if i > 0:
                    args.append(value)
                value = self._call(command.name, args, scope, where)
            else:
                value = self._arg(command, scope, where)
        if pipeline.declare:
            if len(pipeline.declare) != 1:
                raise TemplateError(f"{where}: only range declares two variables")
            name = pipeline.declare[0]
            if pipeline.assign:
                for frame in reversed(scope.variables):
                    if name in frame:
                        frame[name] = value
                        break
                else:
                    raise TemplateError(f"{where}: assignment to undeclared ${name}")
            else:
                scope.variables[-1][name] = value
        return value

    def _arg(self, arg: Any, scope: _Scope, where: str) -> Any:
        if isinstance(arg, _Literal):
            return arg.value
        if isinstance(arg, _Field):
            base = scope.dot if arg.base is None else scope.lookup(arg.base, where)
            shown = ("$" + arg.base if arg.base is not None else "") + "".join("." + p for p in arg.path)
            return _walk(base, arg.path, where, shown or ".")
        if isinstance(arg, _Pipeline):
            return self._pipeline(arg, scope, where)
        if isinstance(arg, _Call):  # a function named as an argument: call it without arguments
            return self._call(arg.name, [], scope, where)
        raise TemplateError(f"{where}: cannot evaluate {arg!r}")  # pragma: no cover

    def _call(self, name: str, args: list[Any], scope: _Scope, where: str) -> Any:
        if name == "include":
            if len(args) != 2:
                raise TemplateError(f"{where}: include takes a name and a value")
            template = args[0]
            if template not in self.defines:
                raise TemplateError(f"{where}: no template {template!r} is defined")
            self._depth += 1
            if self._depth > 50:
                raise TemplateError(f"{where}: include nested too deep (recursion?)")
            try:
                return self._exec(self.defines[template], _Scope(args[1], scope.root, [{}]))
            finally:
                self._depth -= 1
        return FUNCTIONS[name](where, *args)


def _need(where: str, name: str, args: tuple[Any, ...], count: int) -> None:
    if len(args) != count:
        raise TemplateError(f"{where}: {name} takes {count} argument(s), got {len(args)}")


def _to_yaml(where: str, *args: Any) -> str:
    _need(where, "toYaml", args, 1)
    value = args[0]
    if value is MISSING or value is None:
        return "null"
    # Helm's toYaml trims the final newline; keys come out sorted, like go-yaml's.
    text = yaml.safe_dump(value, default_flow_style=False, sort_keys=True, allow_unicode=True, width=1_000_000)
    if text.endswith("...\n"):  # a bare scalar: PyYAML marks the document end
        text = text[: -len("...\n")]
    return text.rstrip("\n")


def _indent(where: str, *args: Any) -> str:
    _need(where, "indent", args, 2)
    width, text = args
    pad = " " * int(width)
    return pad + go_string(text, where).replace("\n", "\n" + pad)


def _nindent(where: str, *args: Any) -> str:
    return "\n" + _indent(where, *args)


def _quote(where: str, *args: Any) -> str:
    shown = [a for a in args if a is not None and a is not MISSING]  # Sprig's quote skips nil
    return " ".join(json.dumps(go_string(a, where), ensure_ascii=False) for a in shown)


def _default(where: str, *args: Any) -> Any:
    if len(args) == 1:
        return args[0]  # `default x` with nothing piped in: Sprig gives the default
    _need(where, "default", args, 2)
    return args[1] if truthy(args[1]) else args[0]


def _required(where: str, *args: Any) -> Any:
    _need(where, "required", args, 2)
    message, value = args
    if value is None or value is MISSING or value == "":
        raise TemplateError(f"{where}: {message}")
    return value


def _b64enc(where: str, *args: Any) -> str:
    _need(where, "b64enc", args, 1)
    return base64.b64encode(go_string(args[0], where).encode()).decode()


def _trunc(where: str, *args: Any) -> str:
    _need(where, "trunc", args, 2)
    count, text = args
    text = go_string(text, where)
    return text[: int(count)] if count >= 0 else text[int(count) :]


def _trim_suffix(where: str, *args: Any) -> str:
    _need(where, "trimSuffix", args, 2)
    suffix, text = go_string(args[0], where), go_string(args[1], where)
    return text[: -len(suffix)] if suffix and text.endswith(suffix) else text


def _lower(where: str, *args: Any) -> str:
    _need(where, "lower", args, 1)
    return go_string(args[0], where).lower()


def _not(where: str, *args: Any) -> bool:
    _need(where, "not", args, 1)
    return not truthy(args[0])


def _and(where: str, *args: Any) -> Any:
    if not args:
        raise TemplateError(f"{where}: and needs arguments")
    for a in args:
        if not truthy(a):
            return a
    return args[-1]


def _or(where: str, *args: Any) -> Any:
    if not args:
        raise TemplateError(f"{where}: or needs arguments")
    for a in args:
        if truthy(a):
            return a
    return args[-1]


def _eq(where: str, *args: Any) -> bool:
    if len(args) < 2:
        raise TemplateError(f"{where}: eq needs two or more arguments")
    return any(args[0] == other for other in args[1:])


def _ne(where: str, *args: Any) -> bool:
    _need(where, "ne", args, 2)
    return bool(args[0] != args[1])


def _empty(where: str, *args: Any) -> bool:
    _need(where, "empty", args, 1)
    return not truthy(args[0])


def _list(where: str, *args: Any) -> list[Any]:
    return list(args)


def _dict(where: str, *args: Any) -> dict[str, Any]:
    if len(args) % 2:
        raise TemplateError(f"{where}: dict takes key/value pairs")
    return {go_string(args[i], where): args[i + 1] for i in range(0, len(args), 2)}


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "include": lambda where, *a: None,  # handled by Renderer._call (needs the defines)
    "toYaml": _to_yaml,
    "indent": _indent,
    "nindent": _nindent,
    "quote": _quote,
    "default": _default,
    "required": _required,
    "b64enc": _b64enc,
    "trunc": _trunc,
    "trimSuffix": _trim_suffix,
    "lower": _lower,
    "not": _not,
    "and": _and,
    "or": _or,
    "eq": _eq,
    "ne": _ne,
    "empty": _empty,
    "list": _list,
    "dict": _dict,
}


# --------------------------------------------------------------------------- charts


def deep_merge(base: Any, over: Any) -> Any:
    """Helm's values coalescing: maps merge key by key, anything else is replaced (null deletes)."""
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for key, value in over.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = deep_merge(base.get(key), value)
        return merged
    return copy.deepcopy(over)


def _capitalised(chart: Mapping[str, Any]) -> dict[str, Any]:
    return {key[:1].upper() + key[1:]: value for key, value in chart.items()}


@dataclass(frozen=True)
class Rendered:
    """One template's output."""

    template: str
    """e.g. ``stoker/templates/gateway.yaml``."""
    text: str


def render_chart(
    chart_dir: Path = CHART,
    values: Mapping[str, Any] | None = None,
    *,
    release: str = DEFAULT_RELEASE,
    namespace: str = DEFAULT_NAMESPACE,
) -> list[Rendered]:
    """Render every template of a chart (values merged over the chart's values.yaml)."""
    chart = yaml.safe_load((chart_dir / "Chart.yaml").read_text())
    base_values = yaml.safe_load((chart_dir / "values.yaml").read_text()) or {}
    merged = deep_merge(base_values, dict(values or {}))
    name = chart["name"]
    templates_dir = chart_dir / "templates"
    renderer = Renderer()
    parsed: list[tuple[str, list[_Node]]] = []
    for path in sorted(templates_dir.rglob("*")):
        if not path.is_file() or path.suffix not in (".yaml", ".yml", ".tpl") or path.name == "NOTES.txt":
            continue
        rel = f"{name}/templates/{path.relative_to(templates_dir).as_posix()}"
        nodes = renderer.parse(path.read_text(), rel)
        if not path.name.startswith("_"):
            parsed.append((rel, nodes))
    out = []
    for rel, nodes in parsed:
        dot = {
            "Values": merged,
            "Release": {
                "Name": release,
                "Namespace": namespace,
                "Service": "Helm",
                "IsInstall": True,
                "IsUpgrade": False,
                "Revision": 1,
            },
            "Chart": _capitalised(chart),
            "Template": {"Name": rel, "BasePath": f"{name}/templates"},
        }
        out.append(Rendered(rel, renderer.render(nodes, dot)))
    return out


def _order(kind: str) -> int:
    return INSTALL_ORDER.index(kind) if kind in INSTALL_ORDER else len(INSTALL_ORDER)


def manifest_text(rendered: list[Rendered]) -> str:
    """All documents as one file in Helm's install order, each under a ``# Source:`` line."""
    docs: list[tuple[int, int, str, str]] = []
    for i, part in enumerate(rendered):
        for chunk in re.split(r"(?m)^---[ \t]*$", part.text):
            body = chunk.strip("\n")
            data = yaml.safe_load(body) if body.strip() else None
            if not data:
                continue
            if not isinstance(data, dict) or "kind" not in data:
                raise TemplateError(f"{part.template}: a document without a kind")
            docs.append((_order(data["kind"]), i, part.template, body))
    docs.sort(key=lambda d: (d[0], d[1]))  # stable: template order within a kind
    header = (
        "# Rendered from deploy/helm/stoker by `python -m deploy.render`: do not edit, change the chart.\n"
        "# Apply with `kubectl apply -f deploy/k8s/`.\n"
    )
    return header + "".join(f"---\n# Source: {template}\n{body}\n" for _, _, template, body in docs)


def documents(text: str) -> list[dict[str, Any]]:
    """The manifests in a rendered file."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def iter_values_files(paths: Sequence[str]) -> Iterator[dict[str, Any]]:
    for p in paths:
        data = yaml.safe_load(Path(p).read_text()) or {}
        if not isinstance(data, dict):
            raise SystemExit(f"{p}: values must be a mapping")
        yield data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.render", description=__doc__.split("\n\n")[0])
    parser.add_argument("--chart", type=Path, default=CHART)
    parser.add_argument("--values", "-f", action="append", default=[], help="values file layered over values.yaml")
    parser.add_argument("--release", default=DEFAULT_RELEASE)
    parser.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    parser.add_argument("--out", type=Path, default=OUT, help="file to write (default deploy/k8s/stoker.yaml)")
    parser.add_argument("--stdout", action="store_true", help="print instead of writing")
    parser.add_argument("--check", action="store_true", help="fail if the file differs from a fresh render")
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for layer in iter_values_files(args.values):
        values = deep_merge(values, layer)
    try:
        text = manifest_text(render_chart(args.chart, values, release=args.release, namespace=args.namespace))
    except TemplateError as exc:
        print(f"render failed: {exc}", file=sys.stderr)
        return 1
    if args.stdout:
        sys.stdout.write(text)
        return 0
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            diff = difflib.unified_diff(current.splitlines(True), text.splitlines(True), str(args.out), "fresh render")
            sys.stderr.writelines(diff)
            print(f"{args.out} is stale: run `python -m deploy.render`", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(documents(text))} manifests)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
