"""The workflow expression language: JSONPath-like selection and conditions over JSON, no code.

A *path* starts at ``$``, the context root, whose names are fixed:

- ``$.input``: the workflow's input;
- ``$.steps.<id>.output`` and ``$.steps.<id>.status``: a finished step (``ok`` or ``skipped``);
  a mapped step's output is the list of its items' outputs, in item order;
- ``$.item`` and ``$.index``: the current item and its position, in the ``input`` of a mapped step.

Segments: ``.name`` (letters, digits, ``_`` and ``-``, not starting with a digit or ``-``), ``['key']``,
``[index]`` (negative counts from the end), ``[*]`` or ``.*`` (every item or value) and ``..name``
(every value of ``name`` at any depth). A path without ``[*]``/``..`` selects one value, or
``None`` when anything along it is missing; with them it selects a list of what was found.

Conditions: ``==  !=  <  <=  >  >=  in  not in`` between paths and JSON literals (numbers,
quoted strings, ``true``, ``false``, ``null``, lists ``[...]``), combined with ``and``, ``or``,
``not`` and parentheses. Nothing is ever evaluated as Python: there are no calls, no attributes,
no arithmetic.

Templates are JSON values in which a string starting with ``$`` is an expression, replaced by its
value; ``$$`` at the start of a string stands for a literal ``$``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

__all__ = [
    "ROOTS",
    "Expr",
    "ExprError",
    "check_template",
    "json_equal",
    "parse",
    "references",
    "render",
    "roots",
    "truthy",
]

ROOTS: frozenset[str] = frozenset({"input", "steps", "item", "index"})
"""The names under ``$``: every path starts with one of them."""

STEP_FIELDS: frozenset[str] = frozenset({"output", "status"})
"""What ``$.steps.<id>`` holds."""


class ExprError(ValueError):
    """An expression that does not parse: why, and where (1-based column in the expression)."""

    def __init__(self, message: str, column: int, text: str = "", where: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.column = column
        self.text = text
        """The expression's text."""
        self.where = where
        """For template errors: where in the template the expression is, e.g. ``.order.id``."""

    def __str__(self) -> str:
        at = f"{self.where}: " if self.where else ""
        return f"{at}column {self.column}: {self.message}"


# ---------------------------------------------------------------------------------------------
# The syntax tree. Frozen and hashable, so parsed expressions can be cached.


@dataclass(frozen=True)
class _Key:
    name: str


@dataclass(frozen=True)
class _Index:
    index: int


@dataclass(frozen=True)
class _Wildcard:
    pass


@dataclass(frozen=True)
class _Descend:
    name: str


_Segment = _Key | _Index | _Wildcard | _Descend


@dataclass(frozen=True)
class _Path:
    segments: tuple[_Segment, ...]
    multi: bool


@dataclass(frozen=True)
class _Literal:
    value: Any


@dataclass(frozen=True)
class _List:
    items: tuple[_Node, ...]


_CompareOp = Literal["==", "!=", "<", "<=", ">", ">=", "in", "not in"]


@dataclass(frozen=True)
class _Compare:
    op: _CompareOp
    left: _Node
    right: _Node


@dataclass(frozen=True)
class _Not:
    operand: _Node


@dataclass(frozen=True)
class _Bool:
    op: Literal["and", "or"]
    left: _Node
    right: _Node


_Node = _Path | _Literal | _List | _Compare | _Not | _Bool


@dataclass(frozen=True)
class Expr:
    """A parsed expression. Evaluating it never raises: a missing path gives ``None``."""

    text: str
    node: _Node

    def evaluate(self, context: Mapping[str, Any]) -> Any:
        """The expression's JSON value in ``context`` (``input``, ``steps``, ``item``, ``index``)."""
        return _evaluate(self.node, context)

    def test(self, context: Mapping[str, Any]) -> bool:
        """The expression as a condition: its value's truthiness (``None`` is false)."""
        return truthy(self.evaluate(context))

    def references(self) -> set[str]:
        """The ids of the steps this expression reads (``$.steps.<id>``)."""
        return {_step_of(path) for path in _paths(self.node) if path.segments[0] == _Key("steps")}

    def roots(self) -> set[str]:
        """The context names this expression reads: a subset of ``input``, ``steps``, ``item``, ``index``."""
        names = set()
        for path in _paths(self.node):
            first = path.segments[0]
            assert isinstance(first, _Key)
            names.add(first.name)
        return names

    def __str__(self) -> str:
        return self.text


def _step_of(path: _Path) -> str:
    segment = path.segments[1]
    assert isinstance(segment, _Key)
    return segment.name


def _paths(node: _Node) -> Iterator[_Path]:
    if isinstance(node, _Path):
        yield node
    elif isinstance(node, _List):
        for item in node.items:
            yield from _paths(item)
    elif isinstance(node, _Compare | _Bool):
        yield from _paths(node.left)
        yield from _paths(node.right)
    elif isinstance(node, _Not):
        yield from _paths(node.operand)


# ---------------------------------------------------------------------------------------------
# Parsing: a recursive-descent parser over the text, positions kept for messages.

_NAME = re.compile(r"[^\W\d][\w-]*")
"""A dotted name: a letter or ``_``, then letters, digits, ``_`` or ``-``."""
_WORD = re.compile(r"[A-Za-z_]\w*")
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?")
_INDEX = re.compile(r"-?\d+")
_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_KEYWORDS = {"and", "or", "not", "in", "true", "false", "null"}
_MAX_LENGTH = 4096
_MAX_DEPTH = 64


def parse(text: str) -> Expr:
    """Parse ``text`` (a path or a condition); raises :class:`ExprError` with the column."""
    if not isinstance(text, str):
        raise ExprError(f"an expression is a string, not {type(text).__name__}", 1, str(text))
    return _parse(text)


@lru_cache(maxsize=2048)
def _parse(text: str) -> Expr:
    if len(text) > _MAX_LENGTH:
        raise ExprError(f"longer than {_MAX_LENGTH} characters", _MAX_LENGTH + 1, text)
    return Expr(text, _Parser(text).parse())


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.depth = 0

    def error(self, message: str, pos: int | None = None) -> ExprError:
        return ExprError(message, (self.pos if pos is None else pos) + 1, self.text)

    def parse(self) -> _Node:
        self.skip()
        if self.at_end():
            raise self.error("empty expression")
        node = self.disjunction()
        self.skip()
        if not self.at_end():
            raise self.error(f"unexpected {self.describe()}")
        return node

    # -- helpers

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def describe(self) -> str:
        word = _WORD.match(self.text, self.pos)
        if word:
            return f"`{word.group()}`"
        return f"`{self.text[self.pos]}`" if not self.at_end() else "end of expression"

    def keyword(self, word: str) -> bool:
        """Consume ``word`` if it is next (as a whole word)."""
        self.skip()
        match = _WORD.match(self.text, self.pos)
        if match and match.group() == word:
            self.pos = match.end()
            return True
        return False

    def peek_keyword(self, word: str) -> bool:
        start = self.pos
        found = self.keyword(word)
        self.pos = start
        return found

    def expect(self, char: str, what: str) -> None:
        self.skip()
        if self.text.startswith(char, self.pos):
            self.pos += len(char)
            return
        raise self.error(f"expected {what}, found {self.describe()}")

    # -- conditions

    def disjunction(self) -> _Node:
        node = self.conjunction()
        while self.keyword("or"):
            node = _Bool("or", node, self.conjunction())
        return node

    def conjunction(self) -> _Node:
        node = self.negation()
        while self.keyword("and"):
            node = _Bool("and", node, self.negation())
        return node

    def negation(self) -> _Node:
        if self.keyword("not"):
            return _Not(self.negation())
        return self.comparison()

    def comparison(self) -> _Node:
        left = self.operand()
        op = self.operator()
        if op is None:
            return left
        right = self.operand()
        self.skip()
        at = self.pos
        if self.operator() is not None:
            raise self.error("comparisons do not chain: join them with `and`", at)
        return _Compare(op, left, right)

    def operator(self) -> _CompareOp | None:
        self.skip()
        for symbol in ("==", "!=", "<=", ">=", "<", ">"):
            if self.text.startswith(symbol, self.pos):
                self.pos += len(symbol)
                return symbol  # type: ignore[return-value]
        if self.text.startswith("=", self.pos):
            raise self.error("`=` is not an operator: compare with `==`")
        for symbol, word in (("&&", "and"), ("||", "or"), ("!", "not")):
            if self.text.startswith(symbol, self.pos):
                raise self.error(f"`{symbol}` is not an operator: use `{word}`")
        if self.keyword("in"):
            return "in"
        start = self.pos
        if self.keyword("not"):
            if self.keyword("in"):
                return "not in"
            self.pos = start
        return None

    # -- operands

    def operand(self) -> _Node:
        self.skip()
        if self.at_end():
            raise self.error("expected a value (a path, a literal or `(`), found end of expression")
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise self.error(f"nested more than {_MAX_DEPTH} deep")
        try:
            return self._operand()
        finally:
            self.depth -= 1

    def _operand(self) -> _Node:
        char = self.text[self.pos]
        if char == "$":
            return self.path()
        if char == "(":
            self.pos += 1
            node = self.disjunction()
            self.expect(")", "`)`")
            return node
        if char == "[":
            return self.list_literal()
        if char in "'\"":
            return _Literal(self.string())
        if char == "!":
            raise self.error("`!` is not an operator: use `not`")
        if char == "-" or char.isdigit():
            return _Literal(self.number())
        word = _WORD.match(self.text, self.pos)
        if word:
            value = word.group()
            if value in ("true", "false", "null"):
                self.pos = word.end()
                return _Literal({"true": True, "false": False, "null": None}[value])
            if value in _KEYWORDS:
                raise self.error(f"expected a value before `{value}`")
            raise self.error(f"unknown word `{value}`: paths start with `$`, strings are quoted")
        raise self.error(f"expected a value (a path, a literal or `(`), found `{char}`")

    def list_literal(self) -> _List:
        self.pos += 1  # [
        items: list[_Node] = []
        self.skip()
        if self.text.startswith("]", self.pos):
            self.pos += 1
            return _List(())
        while True:
            items.append(self.operand())
            self.skip()
            if self.text.startswith(",", self.pos):
                self.pos += 1
                continue
            self.expect("]", "`,` or `]` in a list")
            return _List(tuple(items))

    def string(self) -> str:
        start = self.pos
        quote = self.text[self.pos]
        self.pos += 1
        out: list[str] = []
        while True:
            if self.at_end():
                raise self.error("unterminated string", start)
            char = self.text[self.pos]
            if char == quote:
                self.pos += 1
                return "".join(out)
            if char == "\\":
                escape = self.text[self.pos + 1 : self.pos + 2]
                if escape in _ESCAPES:
                    out.append(_ESCAPES[escape])
                    self.pos += 2
                elif escape == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", self.text[self.pos + 2 : self.pos + 6]):
                    out.append(chr(int(self.text[self.pos + 2 : self.pos + 6], 16)))
                    self.pos += 6
                else:
                    raise self.error(f"unknown escape `\\{escape}` in a string")
                continue
            out.append(char)
            self.pos += 1

    def number(self) -> int | float:
        match = _NUMBER.match(self.text, self.pos)
        if not match:
            raise self.error("expected a number after `-`")
        self.pos = match.end()
        if self.pos < len(self.text) and (self.text[self.pos].isalnum() or self.text[self.pos] in "._"):
            raise self.error(f"malformed number `{match.group()}{self.text[self.pos]}`", match.start())
        if match.group(1) is None and match.group(2) is None:
            return int(match.group())
        value = float(match.group())
        if not math.isfinite(value):
            raise self.error("number out of range", match.start())
        return value

    # -- paths

    def path(self) -> _Path:
        self.pos += 1  # $
        segments: list[tuple[int, _Segment]] = []
        while not self.at_end():
            at = self.pos
            if self.text.startswith("..", self.pos):
                self.pos += 2
                if self.text.startswith("[", self.pos):
                    self.pos += 1
                    self.skip()
                    if self.at_end() or self.text[self.pos] not in "'\"":
                        raise self.error("after `..[` comes a quoted key")
                    key = self.string()
                    self.expect("]", "`]`")
                    segments.append((at, _Descend(key)))
                    continue
                segments.append((at, _Descend(self.name())))
            elif self.text.startswith(".", self.pos):
                self.pos += 1
                if self.text.startswith("*", self.pos):
                    self.pos += 1
                    segments.append((at, _Wildcard()))
                else:
                    segments.append((at, _Key(self.name())))
            elif self.text.startswith("[", self.pos):
                segments.append((at, self.bracket()))
            else:
                break
        return self.check_path(segments)

    def name(self) -> str:
        match = _NAME.match(self.text, self.pos)
        if not match:
            raise self.error("expected a name (use ['...'] for other keys)")
        self.pos = match.end()
        return match.group()

    def bracket(self) -> _Segment:
        self.pos += 1  # [
        self.skip()
        if self.at_end():
            raise self.error("unterminated `[`")
        char = self.text[self.pos]
        segment: _Segment
        if char == "*":
            self.pos += 1
            segment = _Wildcard()
        elif char in "'\"":
            segment = _Key(self.string())
        else:
            match = _INDEX.match(self.text, self.pos)
            if not match:
                raise self.error("expected an index, a quoted key or `*` in `[...]`")
            self.pos = match.end()
            segment = _Index(int(match.group()))
        self.expect("]", "`]`")
        return segment

    def check_path(self, located: list[tuple[int, _Segment]]) -> _Path:
        """Only the fixed context names may follow ``$``; steps are read one by one, by id."""
        segments = tuple(segment for _, segment in located)
        first = segments[0] if segments else None
        if not isinstance(first, _Key) or first.name not in ROOTS:
            at = located[0][0] if located else self.pos
            raise self.error("a path starts with $.input, $.steps.<id>, $.item or $.index", at)
        if first.name == "steps":
            if len(segments) < 2 or not isinstance(segments[1], _Key):
                at = located[1][0] if len(located) > 1 else self.pos
                raise self.error("name the step: $.steps.<id>.output", at)
            if len(segments) > 2:
                field = segments[2]
                if not isinstance(field, _Key) or field.name not in STEP_FIELDS:
                    raise self.error("a step has `.output` and `.status`", located[2][0])
        multi = any(isinstance(segment, _Wildcard | _Descend) for segment in segments)
        return _Path(segments, multi)


# ---------------------------------------------------------------------------------------------
# Evaluation: JSON semantics, never Python's (``true != 1``, ``"a" < 1`` is simply false).


def _evaluate(node: _Node, context: Mapping[str, Any]) -> Any:
    if isinstance(node, _Path):
        found = _select(node.segments, context)
        if node.multi:
            return found
        return found[0] if found else None
    if isinstance(node, _Literal):
        return node.value
    if isinstance(node, _List):
        return [_evaluate(item, context) for item in node.items]
    if isinstance(node, _Not):
        return not truthy(_evaluate(node.operand, context))
    if isinstance(node, _Bool):
        left = truthy(_evaluate(node.left, context))
        if node.op == "and":
            return left and truthy(_evaluate(node.right, context))
        return left or truthy(_evaluate(node.right, context))
    return _compare(node.op, _evaluate(node.left, context), _evaluate(node.right, context))


def _select(segments: tuple[_Segment, ...], root: Any) -> list[Any]:
    nodes = [root]
    for segment in segments:
        found: list[Any] = []
        for value in nodes:
            if isinstance(segment, _Key):
                if isinstance(value, Mapping) and segment.name in value:
                    found.append(value[segment.name])
            elif isinstance(segment, _Index):
                if isinstance(value, list) and -len(value) <= segment.index < len(value):
                    found.append(value[segment.index])
            elif isinstance(segment, _Wildcard):
                if isinstance(value, Mapping):
                    found.extend(value.values())
                elif isinstance(value, list):
                    found.extend(value)
            else:
                found.extend(_descend(value, segment.name))
        nodes = found
    return nodes


def _descend(value: Any, name: str) -> Iterator[Any]:
    """Every value of key ``name`` at any depth under ``value``, in document order."""
    stack = [value]
    while stack:
        current = stack.pop()
        if isinstance(current, Mapping):
            if name in current:
                yield current[name]
            stack.extend(reversed(list(current.values())))
        elif isinstance(current, list):
            stack.extend(reversed(current))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values: numbers by value (``1 == 1.0``), booleans only equal booleans."""
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(json_equal(a[key], b[key]) for key in a)
    if type(a) is not type(b) or isinstance(a, list | Mapping):
        return False
    return bool(a == b)


def _compare(op: _CompareOp, left: Any, right: Any) -> bool:
    if op == "==":
        return json_equal(left, right)
    if op == "!=":
        return not json_equal(left, right)
    if op in ("in", "not in"):
        found = _contains(right, left)
        return found if op == "in" else not found
    if _is_number(left) and _is_number(right) or isinstance(left, str) and isinstance(right, str):
        if op == "<":
            return bool(left < right)
        if op == "<=":
            return bool(left <= right)
        if op == ">":
            return bool(left > right)
        return bool(left >= right)
    return False


def _contains(container: Any, value: Any) -> bool:
    if isinstance(container, list):
        return any(json_equal(value, item) for item in container)
    if isinstance(container, str):
        return isinstance(value, str) and value in container
    if isinstance(container, Mapping):
        return isinstance(value, str) and value in container
    return False


def truthy(value: Any) -> bool:
    """JSON truthiness: ``null``, ``false``, ``0``, ``""``, ``[]`` and ``{}`` are false."""
    if value is None or value is False:
        return False
    if _is_number(value):
        return bool(value != 0)
    if isinstance(value, str | list | Mapping):
        return len(value) > 0
    return True


# ---------------------------------------------------------------------------------------------
# Templates.


def _expression_text(value: Any) -> str | None:
    """The expression a template string stands for, or ``None`` for a literal string."""
    if isinstance(value, str) and value.startswith("$") and not value.startswith("$$"):
        return value
    return None


def render(template: Any, context: Mapping[str, Any]) -> Any:
    """Fill ``template``: each ``$`` string becomes its expression's value; ``$$x`` becomes ``$x``.

    Dict keys are literal. Raises :class:`ExprError` only for a template that
    :func:`check_template` would have rejected.
    """
    if isinstance(template, str):
        if template.startswith("$$"):
            return template[1:]
        if template.startswith("$"):
            return parse(template).evaluate(context)
        return template
    if isinstance(template, Mapping):
        return {key: render(value, context) for key, value in template.items()}
    if isinstance(template, list):
        return [render(value, context) for value in template]
    return template


def _expressions(template: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """Every expression in ``template`` with its location (``.key[0]``), depth first."""
    stack: list[tuple[str, Any]] = [(where, template)]
    while stack:
        at, value = stack.pop()
        text = _expression_text(value)
        if text is not None:
            yield at, text
        elif isinstance(value, Mapping):
            stack.extend(reversed([(f"{at}{_location(key)}", item) for key, item in value.items()]))
        elif isinstance(value, list):
            stack.extend(reversed([(f"{at}[{i}]", item) for i, item in enumerate(value)]))


def _location(key: Any) -> str:
    key = str(key)
    return f".{key}" if _NAME.fullmatch(key) else f"[{json.dumps(key)}]"


def check_template(template: Any) -> list[ExprError]:
    """Every expression of ``template`` that does not parse (each error says ``where``)."""
    errors: list[ExprError] = []
    for where, text in _expressions(template):
        try:
            parse(text)
        except ExprError as error:
            errors.append(ExprError(error.message, error.column, error.text, where or "."))
    return errors


def _parsed(source: Expr | Any) -> Iterator[Expr]:
    if isinstance(source, Expr):
        yield source
        return
    for _, text in _expressions(source):
        try:
            yield parse(text)
        except ExprError:
            continue


def references(source: Expr | Any) -> set[str]:
    """The step ids an expression or a template reads (expressions that do not parse are left out)."""
    found: set[str] = set()
    for expr in _parsed(source):
        found |= expr.references()
    return found


def roots(source: Expr | Any) -> set[str]:
    """The context names (``input``, ``steps``, ``item``, ``index``) an expression or a template reads."""
    found: set[str] = set()
    for expr in _parsed(source):
        found |= expr.roots()
    return found
