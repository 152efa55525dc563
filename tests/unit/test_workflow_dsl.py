"""Unit tests of services.workflow.dsl: the YAML format, and every create-time error with its line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from events import decode, encode
from events.workflow import WorkflowSpec
from services.workflow.dsl import WorkflowInvalid, load

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "workflows"

ISSUE_EXAMPLE = """\
steps:
  - id: fetch
    function: fetch-order
    input: {order: $.input.order_id}
  - id: check
    function: check-stock
    after: [fetch]
    input: $.steps.fetch.output
  - id: notify
    function: send-mail
    after: [check]
    when: $.steps.check.output.in_stock == true
  - id: price
    function: price-item
    after: [fetch]
    map: $.steps.fetch.output.items
    max_parallel: 4
    input: {sku: $.item.sku, n: $.index}
    timeout_s: 5
    retries: 2
    backoff_s: 0.2
output: {stock: $.steps.check.output, prices: $.steps.price.output}
"""


def anything(function: str) -> bool:
    return True


def problems(text: str, name: str = "wf", known: set[str] | None = None) -> list[tuple[int, str]]:
    """The problems ``load`` reports for a (dedented) definition."""
    with pytest.raises(WorkflowInvalid) as info:
        load(name, textwrap.dedent(text), anything if known is None else known.__contains__)
    return info.value.errors


def has(errors: list[tuple[int, str]], line: int, fragment: str) -> bool:
    return any(at == line and fragment in reason for at, reason in errors)


# -- good definitions ----------------------------------------------------------------------


def test_the_issue_example_loads_into_a_spec() -> None:
    spec = load("orders", ISSUE_EXAMPLE, anything)
    assert spec.name == "orders"
    assert spec.source == ISSUE_EXAMPLE
    assert spec.prewarm is True
    assert [step.id for step in spec.steps] == ["fetch", "check", "notify", "price"]
    fetch, check, notify, price = spec.steps
    assert fetch.input == {"order": "$.input.order_id"} and fetch.after == [] and fetch.line == 2
    assert check.after == ["fetch"] and check.input == "$.steps.fetch.output" and check.line == 5
    assert notify.when == "$.steps.check.output.in_stock == true"
    assert notify.input == "$.input"  # the default: the workflow's input
    assert (notify.timeout_s, notify.retries, notify.backoff_s, notify.map) == (30.0, 0, 0.5, None)
    assert price.map == "$.steps.fetch.output.items"
    assert (price.max_parallel, price.timeout_s, price.retries, price.backoff_s) == (4, 5.0, 2, 0.2)
    assert price.input == {"sku": "$.item.sku", "n": "$.index"}
    assert spec.output == {"stock": "$.steps.check.output", "prices": "$.steps.price.output"}


def test_a_spec_survives_the_codec() -> None:
    spec = load("orders", ISSUE_EXAMPLE, anything)
    decoded = decode(encode(spec))
    assert isinstance(decoded, WorkflowSpec)
    assert decoded.steps == spec.steps and decoded.output == spec.output and decoded.source == spec.source


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_the_examples_load(path: Path) -> None:
    spec = load(path.stem, path.read_text(), anything)
    assert len(spec.steps) >= 4


def test_the_greetings_example_needs_only_hello() -> None:
    spec = load("greetings", (EXAMPLES / "greetings.yaml").read_text(), {"hello"}.__contains__)
    assert {step.function for step in spec.steps} == {"hello"}


def test_optional_keys_and_short_forms() -> None:
    spec = load(
        "wf",
        textwrap.dedent(
            """\
            name: wf
            description: what it does
            prewarm: false
            steps:
              - id: a
                description: the first
                function: f
                input: [1, "two", null, true, {k: "$$literal"}]
              - id: b
                function: g
                after: a
                when: yes
              - id: c
                function: g
                after: [a, a, b]
                when: false
                timeout_s: 1
                backoff_s: 0
            """
        ),
        anything,
    )
    a, b, c = spec.steps
    assert spec.prewarm is False and spec.output is None
    assert a.input == [1, "two", None, True, {"k": "$$literal"}]
    assert b.after == ["a"] and b.when == "true"
    assert c.after == ["a", "b"] and c.when == "false" and c.timeout_s == 1.0 and c.backoff_s == 0.0


def test_anchors_and_merge_keys_work() -> None:
    spec = load(
        "wf",
        textwrap.dedent(
            """\
            steps:
              - &first
                id: a
                function: f
                timeout_s: 60
                retries: 3
              - <<: *first
                id: b
                after: [a]
                retries: 1
            """
        ),
        anything,
    )
    a, b = spec.steps
    assert (b.function, b.timeout_s, b.retries, b.after) == ("f", 60.0, 1, ["a"])
    assert a.retries == 3


def test_a_step_may_read_any_step_it_runs_after_transitively() -> None:
    spec = load(
        "wf",
        textwrap.dedent(
            """\
            steps:
              - {id: a, function: f}
              - {id: b, function: f, after: [a]}
              - id: c
                function: f
                after: [b]
                when: $.steps.a.output.go
                map: $.steps.b.output
                input: {a: $.steps.a.output, b: $.steps.b.status, item: $.item, i: $.index}
            output: {a: $.steps.a.output, c: $.steps.c.output}
            """
        ),
        anything,
    )
    assert spec.steps[2].map == "$.steps.b.output"


def test_known_function_is_asked_once_per_name() -> None:
    asked: list[str] = []

    def known(name: str) -> bool:
        asked.append(name)
        return True

    load("wf", "steps:\n  - {id: a, function: f}\n  - {id: b, function: f}\n  - {id: c, function: g}\n", known)
    assert asked == ["f", "g"]


# -- bad definitions: each problem with its line --------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("", 1, "empty"),
        ("# only a comment\n", 1, "empty"),
        ("[1, 2]", 1, "the top level must be a mapping"),
        ("just text", 1, "the top level must be a mapping"),
        ("steps:\n  - id: a\n    function: f\n   bad: x\n", 4, "invalid YAML"),
        ("steps: [\n", 2, "invalid YAML"),
        ("a: 1\n---\nb: 2\n", 2, "single document"),
        ("steps:\n  - id: a\n    function: !!python/object:os.system x\n", 3, "invalid YAML"),
        ("steps:\n  - id: a\n    function: !custom f\n", 3, "invalid YAML"),
        ("output: 1\n", 1, "`steps` is missing"),
        ("steps: []\n", 1, "non-empty list"),
        ("steps: {a: 1}\n", 1, "non-empty list"),
        ("steps:\n", 1, "non-empty list"),
        ("stepz: []\nsteps:\n  - {id: a, function: f}\n", 1, "unknown key `stepz`"),
        ("steps:\n  - {id: a, function: f}\nsteps:\n  - {id: b, function: f}\n", 3, "given twice"),
        ("1: x\nsteps:\n  - {id: a, function: f}\n", 1, "keys of the top level are names"),
        ("prewarm: maybe\nsteps:\n  - {id: a, function: f}\n", 1, "`prewarm` must be true or false"),
        ("description: [1]\nsteps:\n  - {id: a, function: f}\n", 1, "`description` must be a string"),
        ("name: other\nsteps:\n  - {id: a, function: f}\n", 1, "created as 'wf'"),
        ("steps:\n  - just-a-string\n", 2, "a step must be a mapping"),
        ("steps:\n  - function: f\n", 2, "a step needs an `id`"),
        ("steps:\n  - id: a\n", 2, "step `a` needs a `function`"),
        ("steps:\n  - id: a\n    function: [f]\n", 3, "`function` of step `a` must be a function name"),
        ("steps:\n  - id: A\n    function: f\n", 2, "lowercase DNS label"),
        ("steps:\n  - id: 1a\n    function: f\n", 2, "starting with a letter"),
        ("steps:\n  - id: a-\n    function: f\n", 2, "lowercase DNS label"),
        ("steps:\n  - id: a_b\n    function: f\n", 2, "lowercase DNS label"),
        ("steps:\n  - id: " + "a" * 64 + "\n    function: f\n", 2, "at most 63"),
        ("steps:\n  - id: 12\n    function: f\n", 2, "step id 12"),
        ("steps:\n  - id: a\n    function: f\n    colour: red\n", 4, "unknown key `colour` in a step"),
        ("steps:\n  - id: a\n    function: f\n    id: b\n", 4, "`id` is given twice"),
        ("steps:\n  - {id: a, function: f}\n  - {id: a, function: g}\n", 3, "already used on line 2"),
        ("steps:\n  - id: a\n    function: f\n    after: [a]\n", 4, "cannot run after itself"),
        ("steps:\n  - id: a\n    function: f\n    after: [ghost]\n", 4, "there is no step `ghost`"),
        ("steps:\n  - id: a\n    function: f\n    after: [{x: 1}]\n", 4, "lists step ids"),
        ("steps:\n  - id: a\n    function: f\n    when: 3\n", 4, "`when` of step `a` must be an expression"),
        ("steps:\n  - id: a\n    function: f\n    map: [1, 2]\n", 4, "`map` of step `a` must be an expression"),
        ("steps:\n  - id: a\n    function: f\n    when: $.input.x = 1\n", 4, "column 11"),
        ("steps:\n  - id: a\n    function: f\n    when: $.nope\n", 4, "a path starts with"),
        ("steps:\n  - id: a\n    function: f\n    map: $.input.[\n", 4, "cannot parse `$.input.[`"),
        ("steps:\n  - id: a\n    function: f\n    input:\n      x: $.bad\n", 5, "`input` of step `a`"),
        ("steps:\n  - id: a\n    function: f\n    input:\n      - 1\n      - $.input[\n", 6, "unterminated"),
        ("steps:\n  - id: a\n    function: f\n    input: 2024-01-01\n", 4, "not a JSON value (date)"),
        ("steps:\n  - id: a\n    function: f\n    input: .nan\n", 4, "not a JSON value"),
        ("steps:\n  - id: a\n    function: f\n    input: {1: x}\n", 4, "keys are strings"),
        ("steps:\n  - id: a\n    function: f\n    input: $.item\n", 4, "only exists in a step with `map`"),
        ("steps:\n  - id: a\n    function: f\n    input: {i: $.index}\n", 4, "`$.index`"),
        ("steps:\n  - id: a\n    function: f\n    map: $.input\n    when: $.item\n", 5, "mapped step's `input`"),
        ("steps:\n  - id: a\n    function: f\n    map: $.item\n", 4, "mapped step's `input`"),
        ("steps:\n  - id: a\n    function: f\n    input: $.steps.a.output\n", 4, "reads its own step"),
        ("steps:\n  - id: a\n    function: f\n    input: $.steps.zz.output\n", 4, "there is no step `zz`"),
        ("steps:\n  - {id: a, function: f}\n  - id: b\n    function: f\n    when: $.steps.a.output\n", 5, "add `a`"),
        ("steps:\n  - id: a\n    function: f\n    retries: 21\n", 4, "`retries` of step `a`: Input should be less"),
        ("steps:\n  - id: a\n    function: f\n    retries: -1\n", 4, "greater than or equal to 0"),
        ("steps:\n  - id: a\n    function: f\n    retries: 1.5\n", 4, "must be a whole number"),
        ("steps:\n  - id: a\n    function: f\n    retries: true\n", 4, "must be a whole number"),
        (
            "steps:\n  - id: a\n    function: f\n    timeout_s: 0\n",
            4,
            "`timeout_s` of step `a`: Input should be greater",
        ),
        ("steps:\n  - id: a\n    function: f\n    timeout_s: 3601\n", 4, "less than or equal to 3600"),
        ("steps:\n  - id: a\n    function: f\n    timeout_s: fast\n", 4, "must be a number (seconds)"),
        ("steps:\n  - id: a\n    function: f\n    timeout_s: .inf\n", 4, "must be a number"),
        ("steps:\n  - id: a\n    function: f\n    backoff_s: -1\n", 4, "`backoff_s`"),
        ("steps:\n  - id: a\n    function: f\n    map: $.input\n    max_parallel: 0\n", 5, "`max_parallel`"),
        ("steps:\n  - id: a\n    function: f\n    max_parallel: 2\n", 4, "only applies to a step with `map`"),
        ("steps:\n  - {id: a, function: f}\noutput: $.steps.b.output\n", 3, "`output` reads `$.steps.b`"),
        ("steps:\n  - {id: a, function: f}\noutput: {x: $.item}\n", 3, "`output` reads `$.item`"),
        ("steps:\n  - {id: a, function: f}\noutput: {x: $.input.a ==}\n", 3, "cannot parse"),
    ],
)
def test_problems_are_reported_with_their_line(text: str, line: int, fragment: str) -> None:
    errors = problems(text)
    assert has(errors, line, fragment), errors


def test_an_unknown_function_is_reported_where_it_is_named() -> None:
    errors = problems("steps:\n  - id: a\n    function: ghost\n  - id: b\n    function: f\n", known={"f"})
    assert errors == [(3, "unknown function `ghost`")]


def test_the_workflow_name_itself_is_checked() -> None:
    errors = problems("steps:\n  - {id: a, function: f}\n", name="Not_A_Name")
    assert errors == [(0, errors[0][1])] and "DNS labels" in errors[0][1]


@pytest.mark.parametrize(
    ("after", "cycle"),
    [
        ({"a": ["b"], "b": ["a"]}, "a -> b -> a"),
        ({"a": ["c"], "b": ["a"], "c": ["b"]}, "a -> c -> b -> a"),
        ({"a": [], "b": ["a", "d"], "c": ["b"], "d": ["c"]}, "b -> d -> c -> b"),
    ],
)
def test_a_cycle_is_reported_with_its_path(after: dict[str, list[str]], cycle: str) -> None:
    steps = "".join(
        f"  - id: {step}\n    function: f\n    after: [{', '.join(deps)}]\n" for step, deps in after.items()
    )
    errors = problems("steps:\n" + steps)
    cycles = [(line, reason) for line, reason in errors if reason.startswith("cycle")]
    assert len(cycles) == 1, errors
    first = cycle.split(" -> ")[0]
    assert cycles[0] == (2 + 3 * list(after).index(first), f"cycle in `after`: {cycle} (each runs after the next)")


def test_separate_cycles_are_each_reported_once() -> None:
    text = """\
    steps:
      - {id: a, function: f, after: [b]}
      - {id: b, function: f, after: [a]}
      - {id: c, function: f, after: [d]}
      - {id: d, function: f, after: [c]}
      - {id: e, function: f, after: [a, c]}
    """
    errors = problems(text)
    assert [(line, reason.split(" (")[0]) for line, reason in errors] == [
        (2, "cycle in `after`: a -> b -> a"),
        (4, "cycle in `after`: c -> d -> c"),
    ]


def test_every_problem_is_reported_at_once_sorted_by_line() -> None:
    text = """\
    name: other
    steps:
      - id: a
        function: nope
        after: [c]
        input: {x: $.steps.zz.output, y: "$.input[", z: $.item}
        retries: 99
        colour: red
      - id: b
        function: f
        after: a
        when: $.input.x = 1
        max_parallel: 3
      - id: c
        function: f
        after: [b, ghost]
        timeout_s: fast
      - id: c
        function: f
      - id: Bad_Id
        function: f
      - function: f
        input: 2024-01-01
    output: $.steps.zzz.output
    """
    errors = problems(text, name="orders", known={"f"})
    assert [line for line, _ in errors] == sorted(line for line, _ in errors)
    expected = [
        (1, "created as 'orders'"),
        (3, "cycle in `after`: a -> c -> b -> a"),
        (4, "unknown function `nope`"),
        (6, "there is no step `zz`"),
        (6, "unterminated `[`"),
        (6, "only exists in a step with `map`"),
        (7, "`retries` of step `a`"),
        (8, "unknown key `colour`"),
        (12, "compare with `==`"),
        (13, "only applies to a step with `map`"),
        (16, "no step `ghost`"),
        (17, "must be a number"),
        (18, "already used on line 14"),
        (20, "lowercase DNS label"),
        (22, "needs an `id`"),
        (23, "not a JSON value"),
        (24, "no step `zzz`"),
    ]
    for line, fragment in expected:
        assert has(errors, line, fragment), (line, fragment, errors)
    assert len(errors) == len(expected), errors


def test_the_message_lists_every_problem() -> None:
    with pytest.raises(WorkflowInvalid) as info:
        load("wf", "steps:\n  - id: a\n    function: f\n    retries: x\n    when: 1 <\n", anything)
    message = str(info.value)
    assert message.startswith("workflow 'wf' is invalid:\n")
    assert "  line 4: `retries` of step `a` must be a whole number, not 'x'" in message
    assert "  line 5: `when` of step `a`: cannot parse `1 <`: column 4:" in message


def test_alias_bombs_are_stopped() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    text = "description: bomb\nsteps:\n  - id: s\n    function: f\n    input:\n" + "".join(
        f"      {line}\n" for line in lines
    )
    errors = problems(text)
    assert any("too large" in reason for _, reason in errors)


def test_a_recursive_alias_is_stopped() -> None:
    errors = problems("steps:\n  - id: s\n    function: f\n    input: &loop [*loop]\n")
    assert errors == [(4, "`input` of step `s`: nested deeper than 64 levels")]
