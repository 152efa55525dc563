"""Unit tests of services.gateway.core.Gateway with fake views and a recording fake publish (no broker)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Generic, TypeVar

import pytest

from events import (
    CodeCommitted,
    CodeSource,
    FunctionSpec,
    InvocationCompleted,
    InvocationRequested,
    TokenIssued,
    TokenRevoked,
    WorkflowSpec,
)
from events.base import Record
from services.common import auth
from services.common.settings import CommonSettings
from services.gateway.core import PRINCIPAL_HEADER, Gateway, HttpError
from services.gateway.settings import GatewaySettings

R = TypeVar("R")
DIGEST = "sha256:" + "cd" * 32


class View(Generic[R]):
    def __init__(self, rows: dict[str, R] | None = None) -> None:
        self.rows: dict[str, R] = rows or {}
        self.later: dict[str, R] = {}
        """Rows that appear once the view is caught up (written a moment ago)."""

    def get(self, key: str) -> R | None:
        return self.rows.get(key)

    async def wait_caught_up(self, timeout_s: float) -> bool:
        self.rows.update(self.later)
        return True


def _spec(name: str, public: bool = False, timeout_s: float = 30.0) -> FunctionSpec:
    return FunctionSpec(
        name=name, entrypoint="handler:main", source=CodeSource(digest=DIGEST), public=public, timeout_s=timeout_s
    )


def _principal(*scopes: str, ident: str = "t1") -> auth.Principal:
    return auth.Principal(ident, "", tuple(scopes), None)


class Harness:
    def __init__(self, tmp_path: Path, fail: bool = False) -> None:
        self.sent: list[tuple[Record, str, bytes | None, dict[str, str] | None]] = []
        self.fail = fail
        self.functions: View[FunctionSpec] = View({"hello": _spec("hello"), "open": _spec("open", public=True)})
        self.workflows: View[WorkflowSpec] = View()
        self.tokens: View[TokenIssued | TokenRevoked] = View()
        settings = GatewaySettings(CommonSettings(home=tmp_path, topic_prefix="ut."), publish_timeout_s=0.5)
        self.gw = Gateway(settings, self.publish, self.functions, self.workflows, self.tokens)

    async def publish(self, record: Record, topic: str, key: bytes | None, headers: dict[str, str] | None) -> None:
        if self.fail:
            raise ConnectionError("no broker")
        self.sent.append((record, topic, key, headers))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_an_invocation_of_an_unknown_function_is_404_and_nothing_is_published(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    with pytest.raises(HttpError) as err:
        run(h.gw.new_invocation(_principal("invoke:*"), "missing", None, sync=True))
    assert (err.value.status, err.value.message) == (404, "no function named 'missing'")
    assert h.sent == []


def test_a_function_made_a_moment_ago_is_found_once_the_view_caught_up(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.functions.later["fresh"] = _spec("fresh", timeout_s=5.0)
    inv = run(h.gw.new_invocation(_principal("invoke:*"), "fresh", {"x": 1}, sync=False))
    assert inv.function == "fresh" and inv.deadline_ms is None and inv.payload == {"x": 1}


def test_a_principal_without_the_invoke_scope_is_refused_unless_the_function_is_public(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    reader = _principal("invoke:other-*")
    with pytest.raises(HttpError) as err:
        h.gw.may_invoke(reader, "hello")
    assert (err.value.status, err.value.message) == (403, "token t1 may not invoke 'hello'")
    h.gw.may_invoke(reader, "open")
    h.gw.may_invoke(None, "hello")  # the anonymous caller was let in by authenticate: a public function
    h.gw.may_invoke(_principal("invoke:hel*"), "hello")


def test_a_sync_invocation_gets_a_deadline_and_a_submitted_one_names_its_token(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    inv = run(h.gw.new_invocation(_principal("invoke:*"), "hello", None, sync=True))
    assert inv.deadline_ms is not None and inv.reply_to == h.gw.reply_topic and inv.principal == "t1"
    run(h.gw.submit(inv))
    record, topic, key, headers = h.sent[0]
    assert record is inv and topic == h.gw.topics.invocation and key == b"hello"
    assert headers == {PRINCIPAL_HEADER: "t1"}


def test_an_unconfirmed_invocation_is_503(tmp_path: Path) -> None:
    h = Harness(tmp_path, fail=True)
    inv = InvocationRequested(function="hello", payload=None)
    with pytest.raises(HttpError) as err:
        run(h.gw.submit(inv))
    assert err.value.status == 503


def test_a_workflows_budget_is_its_steps_timeouts_with_retries(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    flow = WorkflowSpec.model_validate(
        {
            "name": "flow",
            "steps": [
                {"id": "a", "function": "hello", "timeout_s": 10, "retries": 1},
                {"id": "b", "function": "hello", "timeout_s": 5},
            ],
        }
    )
    h.workflows.later["flow"] = flow
    assert run(h.gw.time_budget("flow")) == 25.0
    assert run(h.gw.time_budget("hello")) == 30.0


def _result(inv_id: str, function: str = "hello") -> InvocationCompleted:
    return InvocationCompleted(id=inv_id, function=function, status="ok")


def test_who_may_read_an_invocation(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    caller = _principal("invoke:hello", ident="caller")
    inv = run(h.gw.new_invocation(caller, "hello", None, sync=False))
    h.gw.book.accepted(inv.id)
    stranger = _principal("invoke:other", ident="stranger")
    assert h.gw.read_invocation(caller, inv.id) == (202, {"id": inv.id, "status": "pending"})
    assert h.gw.read_invocation(_principal("read"), inv.id)[0] == 202
    with pytest.raises(HttpError) as err:
        h.gw.read_invocation(stranger, inv.id)
    assert (err.value.status, err.value.message) == (403, f"token stranger did not make invocation {inv.id!r}")
    h.gw.book.resolve(_result(inv.id))
    assert h.gw.read_invocation(caller, inv.id)[0] == 200
    assert h.gw.read_invocation(_principal("invoke:hel*", ident="peer"), inv.id)[0] == 200
    with pytest.raises(HttpError) as err:
        h.gw.read_invocation(stranger, inv.id)
    assert (err.value.status, err.value.message) == (403, "token stranger may not read results of 'hello'")
    with pytest.raises(HttpError) as err:
        h.gw.read_invocation(caller, "nope")
    assert err.value.status == 404


def test_tokens_in_the_url_are_refused_and_public_functions_need_none(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    with pytest.raises(auth.AuthError) as err:
        run(h.gw.authenticate(None, "/functions", "GET", "1.2.3.4", {"token"}))
    assert err.value.status == 401
    assert run(h.gw.authenticate(None, "/fn/open", "POST", "1.2.3.4", set())) is None
    with pytest.raises(auth.AuthError) as err:
        run(h.gw.authenticate(None, "/fn/hello", "POST", "1.2.3.4", set()))
    assert err.value.status == 401


def test_a_token_made_a_moment_ago_is_known_once_the_table_caught_up(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    token, ident, digest = auth.new_token()
    h.tokens.later[ident] = TokenIssued(id=ident, scopes=["read"], digest=digest)
    principal = run(h.gw.authenticate(f"Bearer {token}", "/functions", "GET", "1.2.3.4", set()))
    assert principal is not None and principal.id == ident and principal.can_read()


def test_reading_needs_the_read_scope_except_ones_own_invocations(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    invoker = _principal("invoke:*")
    with pytest.raises(auth.AuthError) as err:
        h.gw.admit(invoker, "/functions", "GET")
    assert (err.value.status, err.value.message) == (403, "reading needs the read scope")
    h.gw.admit(invoker, "/invocations/abc", "GET")
    h.gw.admit(invoker, "/fn/hello", "POST")


def _push(delivery: str) -> CodeCommitted:
    return CodeCommitted(repo="file:///r", ref="refs/heads/main", after="ab" * 20, delivery_id=delivery)


def test_a_redelivered_push_is_published_once(tmp_path: Path) -> None:
    h = Harness(tmp_path)

    async def deliver_three_times() -> list[bool]:
        return list(await asyncio.gather(*(h.gw.accept_push(_push("d1")) for _ in range(3))))

    assert sorted(run(deliver_three_times())) == [False, False, True]
    h.gw.deliveries.add("d2")  # published before a restart: read back from the topic
    assert run(h.gw.accept_push(_push("d2"))) is False
    assert [(topic, key) for _r, topic, key, _h in h.sent] == [(h.gw.topics.code_commit, b"file:///r")]


def test_an_unconfirmed_push_is_503_and_may_be_sent_again(tmp_path: Path) -> None:
    h = Harness(tmp_path, fail=True)
    with pytest.raises(HttpError) as err:
        run(h.gw.accept_push(_push("d1")))
    assert err.value.status == 503
    h.fail = False
    assert run(h.gw.accept_push(_push("d1"))) is True
