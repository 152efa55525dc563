"""Unit tests of services.workflow.expr: grammar, evaluation (JSON semantics), templates, references."""

from __future__ import annotations

from typing import Any

import pytest

from services.workflow.expr import (
    ExprError,
    check_template,
    json_equal,
    parse,
    references,
    render,
    roots,
    truthy,
)

CTX: dict[str, Any] = {
    "input": {
        "order_id": "A-1",
        "order-no": 7,
        "first name": "Ada",
        "2fa": True,
        "items": [{"sku": "x", "n": 2}, {"sku": "y", "n": 1}, {"sku": "z"}],
        "tags": ["vip", "eu"],
        "nested": {"a": {"sku": "deep"}, "b": [{"sku": "deeper"}]},
        "zero": 0,
        "empty": "",
        "none": None,
        "ratio": 0.5,
        "émoji": "ok",
    },
    "steps": {
        "fetch": {"output": {"in_stock": True, "count": 3}, "status": "ok"},
        "notify": {"output": None, "status": "skipped"},
        "price-item": {"output": [10, 20, 30], "status": "ok"},
    },
}


def ev(text: str, context: dict[str, Any] = CTX) -> Any:
    return parse(text).evaluate(context)


# -- paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("$.input.order_id", "A-1"),
        ("$.input", CTX["input"]),
        ("$.input.order-no", 7),
        ("$.input['first name']", "Ada"),
        ('$.input["first name"]', "Ada"),
        ("$.input['2fa']", True),
        ("$['input'].order_id", "A-1"),
        ("$.input.émoji", "ok"),
        ("$.input.items[0].sku", "x"),
        ("$.input.items[-1].sku", "z"),
        ("$.input.items[ 1 ].n", 1),
        ("$.input.items[*].sku", ["x", "y", "z"]),
        ("$.input.items.*.sku", ["x", "y", "z"]),
        ("$.input.items[*].n", [2, 1]),  # missing values are left out of a multi-valued path
        ("$.input.nested[*]", [{"sku": "deep"}, [{"sku": "deeper"}]]),
        ("$.input.nested..sku", ["deep", "deeper"]),
        ("$.input..sku", ["x", "y", "z", "deep", "deeper"]),
        ("$.input..['sku']", ["x", "y", "z", "deep", "deeper"]),
        ("$.steps.fetch.output.in_stock", True),
        ("$.steps.fetch.status", "ok"),
        ("$.steps.notify.output", None),
        ("$.steps.price-item.output[1]", 20),
        ("$.steps['price-item'].output[-1]", 30),
    ],
)
def test_path_selection(text: str, value: Any) -> None:
    assert ev(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "$.input.missing",
        "$.input.items[3]",
        "$.input.items[-4]",
        "$.input.items.sku",  # a name on a list
        "$.input.order_id[0]",  # an index on a string
        "$.input.none.deeper.still",
        "$.steps.nope.output",
        "$.item",
        "$.index",
    ],
)
def test_a_missing_path_gives_none(text: str) -> None:
    assert ev(text) is None


def test_a_multi_valued_path_over_nothing_is_an_empty_list() -> None:
    assert ev("$.input.missing[*]") == []
    assert ev("$.input..nothing") == []


def test_item_and_index_come_from_the_context() -> None:
    context = {**CTX, "item": {"sku": "q"}, "index": 4}
    assert ev("$.item.sku", context) == "q"
    assert ev("$.index", context) == 4


def test_only_mappings_and_lists_are_entered() -> None:
    class Secret:
        name = "leak"

        def __getitem__(self, key: str) -> str:
            return "leak"

    context = {"input": {"obj": Secret()}}
    assert ev("$.input.obj.name", context) is None
    assert ev("$.input.obj['name']", context) is None
    assert ev("$.input.obj[*]", context) == []


# -- literals and conditions ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", 1),
        ("-12", -12),
        ("0.25", 0.25),
        ("2e3", 2000.0),
        ("-1.5E-1", -0.15),
        ("'a\\'b'", "a'b"),
        ('"tab\\there"', "tab\there"),
        ('"\\u00e9\\n\\\\"', "é\n\\"),
        ("true", True),
        ("false", False),
        ("null", None),
        ("[]", []),
        ("[1, 'a', [null]]", [1, "a", [None]]),
        ("[$.input.zero, $.input.ratio]", [0, 0.5]),
        ("(((1)))", 1),
    ],
)
def test_literals(text: str, value: Any) -> None:
    result = ev(text)
    assert result == value and type(result) is type(value)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("$.steps.fetch.output.in_stock == true", True),
        ("$.steps.fetch.output.in_stock != true", False),
        ("$.input.order-no == 7.0", True),
        ("1 == true", False),
        ("0 == false", False),
        ("null == false", False),
        ("$.input.missing == null", True),
        ("$.input.tags == ['vip', 'eu']", True),
        ("$.input.tags == ['eu', 'vip']", False),
        ("$.input.ratio < 1", True),
        ("$.input.ratio <= 0.5", True),
        ("$.input.ratio > 0.5", False),
        ("$.input.ratio >= 0.5", True),
        ("'abc' < 'abd'", True),
        ("'b' > 'abc'", True),
        ("$.input.missing < 1", False),
        ("$.input.missing > 1", False),
        ("'1' < 2", False),
        ("true > false", False),
        ("not ($.input.missing < 1)", True),
        ("'vip' in $.input.tags", True),
        ("'us' in $.input.tags", False),
        ("'us' not in $.input.tags", True),
        ("1 in [1.0, 2]", True),
        ("true in [1]", False),
        ("'ell' in 'hello'", True),
        ("'order_id' in $.input", True),
        ("1 in 'a1'", False),
        ("'x' in $.input.missing", False),
        ("'x' not in $.input.missing", True),
        ("$.input.tags[0] in ['vip']", True),
        ("true and false or true", True),
        ("true and (false or false)", False),
        ("not true and false", False),
        ("not (true and false)", True),
        ("not not $.input.order_id", True),
        ("$.input.zero or $.input.empty", False),
        ("$.input.order_id and $.input.tags", True),
        ("false or $.input.ratio", True),
    ],
)
def test_conditions(text: str, value: bool) -> None:
    assert ev(text) is value


def test_names_do_not_start_with_a_digit() -> None:
    with pytest.raises(ExprError) as info:
        parse("$.input.2fa")
    assert "['...']" in info.value.message
    assert ev("$.input['2fa']") is True


def test_and_or_give_booleans_and_short_circuit_nothing_observable() -> None:
    assert ev("$.input.order_id and $.input.ratio") is True
    assert ev("$.input.zero or $.input.none") is False


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, False),
        (False, False),
        (0, False),
        (0.0, False),
        ("", False),
        ([], False),
        ({}, False),
        (True, True),
        (1, True),
        (-0.1, True),
        ("false", True),
        ([0], True),
        ({"a": None}, True),
    ],
)
def test_truthiness(value: Any, expected: bool) -> None:
    assert truthy(value) is expected
    assert parse("$.input.v").test({"input": {"v": value}}) is expected


def test_json_equality() -> None:
    assert json_equal({"a": [1, 2.0]}, {"a": [1.0, 2]})
    assert not json_equal({"a": 1}, {"a": 1, "b": None})
    assert not json_equal([1], [1, 1])
    assert not json_equal(True, 1)
    assert not json_equal(False, 0)
    assert not json_equal(None, False)
    assert not json_equal("1", 1)
    assert not json_equal([], {})
    assert json_equal(None, None)


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "column", "fragment"),
    [
        ("", 1, "empty"),
        ("   ", 4, "empty"),
        ("$", 2, "a path starts with"),
        ("$.foo", 2, "a path starts with"),
        ("$..input", 2, "a path starts with"),
        ("$[0]", 2, "a path starts with"),
        ("$.steps", 8, "name the step"),
        ("$.steps[*].output", 8, "name the step"),
        ("$.steps..output", 8, "name the step"),
        ("$.steps.a.result", 10, "`.output` and `.status`"),
        ("$.steps.a[0]", 10, "`.output` and `.status`"),
        ("$.input.", 9, "expected a name"),
        ("$.input.-x", 9, "expected a name"),
        ("$.input[", 9, "unterminated `[`"),
        ("$.input[x]", 9, "expected an index"),
        ("$.input[0", 10, "expected `]`"),
        ("$.input['a]", 9, "unterminated string"),
        ("$.input..[0]", 11, "quoted key"),
        ("'\\x'", 2, "unknown escape"),
        ("$.input.a = 1", 11, "compare with `==`"),
        ("$.input.a && true", 11, "use `and`"),
        ("$.input.a || true", 11, "use `or`"),
        ("!$.input.a", 1, "use `not`"),
        ("1 < 2 < 3", 7, "do not chain"),
        ("$.input.a ==", 13, "found end of expression"),
        ("$.input.a == 1 extra", 16, "unexpected `extra`"),
        ("(1", 3, "expected `)`"),
        ("[1, 2", 6, "`,` or `]`"),
        ("foo", 1, "unknown word `foo`"),
        ("__import__('os')", 1, "unknown word `__import__`"),
        ("$.input.__class__()", 18, "unexpected `(`"),
        ("and", 1, "expected a value before `and`"),
        ("- 1", 1, "expected a number"),
        ("1.", 1, "malformed number"),
        ("01", 1, "malformed number"),
        ("1e999", 1, "out of range"),
        ("$.input.a == #", 14, "found `#`"),
        ("$.input.a in", 13, "found end of expression"),
        ("not", 4, "found end of expression"),
        ("'it''s'", 5, "unexpected `'`"),
        ("$.input.a == {'sku': 'x'}", 14, "found `{`"),
    ],
)
def test_parse_errors_say_where(text: str, column: int, fragment: str) -> None:
    with pytest.raises(ExprError) as info:
        parse(text)
    assert fragment in info.value.message
    assert info.value.column == column, info.value
    assert info.value.text == text
    assert str(info.value).startswith(f"column {column}: ")


def test_parse_rejects_non_strings_and_huge_expressions() -> None:
    with pytest.raises(ExprError):
        parse(123)  # type: ignore[arg-type]
    with pytest.raises(ExprError):
        parse(["$.input"])  # type: ignore[arg-type]
    with pytest.raises(ExprError, match="longer than"):
        parse("$.input.a" + " or $.input.a" * 400)
    with pytest.raises(ExprError, match="nested"):
        parse("(" * 100 + "1" + ")" * 100)


def test_whitespace_is_free_around_tokens_only() -> None:
    assert ev("  ( $.input.ratio<1 )and\t'eu'in $.input.tags  ") is True
    with pytest.raises(ExprError):
        parse("$ .input")


def test_parsed_expressions_are_cached_and_keep_their_text() -> None:
    first = parse("$.input.order_id == 'A-1'")
    assert parse("$.input.order_id == 'A-1'") is first
    assert str(first) == "$.input.order_id == 'A-1'"


# -- templates -----------------------------------------------------------------------------


def test_render_fills_expressions_recursively_and_keeps_literals() -> None:
    template = {
        "order": "$.input.order_id",
        "lines": ["$.input.items[0].sku", "literal", 3, None, True, {"deep": "$.steps.fetch.output.count"}],
        "$.input.order_id": "keys are literal",
        "price": "$$9.99",
        "dollars": "$$$",
        "suffix": "costs 5$",
        "stock": "$.steps.fetch.output.in_stock == true",
        "missing": "$.input.nope",
    }
    assert render(template, CTX) == {
        "order": "A-1",
        "lines": ["x", "literal", 3, None, True, {"deep": 3}],
        "$.input.order_id": "keys are literal",
        "price": "$9.99",
        "dollars": "$$",
        "suffix": "costs 5$",
        "stock": True,
        "missing": None,
    }


def test_render_of_a_whole_expression_returns_the_value_itself() -> None:
    assert render("$.input.items", CTX) == CTX["input"]["items"]
    assert render("$.input", CTX) == CTX["input"]
    assert render(42, CTX) == 42
    assert render(None, CTX) is None


def test_render_does_not_change_the_template() -> None:
    template = {"a": ["$.input.order_id"]}
    render(template, CTX)
    assert template == {"a": ["$.input.order_id"]}


def test_render_raises_for_a_template_that_does_not_check() -> None:
    with pytest.raises(ExprError):
        render({"a": "$.bad"}, CTX)


def test_check_template_reports_each_bad_expression_with_where() -> None:
    template = {
        "ok": "$.input.a",
        "bad": "$.input[",
        "list": ["$.input.b", "$.nope"],
        "odd key": {"x": "$.input.a =="},
        "escaped": "$$.nope",
        "plain": "nope $.",
    }
    errors = check_template(template)
    assert [(e.where, e.column) for e in errors] == [(".bad", 9), (".list[1]", 2), ('["odd key"].x', 13)]
    assert str(errors[0]) == ".bad: column 9: unterminated `[`"
    assert check_template("$.input") == []
    assert [e.where for e in check_template("$.x")] == ["."]
    assert check_template({"a": 1, "b": [True, None]}) == []


def test_references_and_roots() -> None:
    template = {
        "a": "$.steps.fetch.output.x",
        "b": ["$.steps['price-item'].status", "$.item.sku", "$$.steps.escaped.output"],
        "c": "$.steps.fetch.output == $.steps.check.output and $.index > 0",
        "d": "$.bad[",
        "e": "$.input",
    }
    assert references(template) == {"fetch", "price-item", "check"}
    assert roots(template) == {"steps", "item", "index", "input"}
    expr = parse("'a' in $.steps.tags.output or not $.input.x")
    assert references(expr) == expr.references() == {"tags"}
    assert roots(expr) == expr.roots() == {"steps", "input"}
    assert references("literal") == set()
    assert references(parse("[$.steps.a.output, $.steps.b.status]")) == {"a", "b"}
