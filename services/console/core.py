"""The console's core: reads the platform's topics while someone looks, and pushes what changed to the pages.

It starts reading on the first request and stops after ``idle_after_s`` with no page open, so an
unwatched console holds no consumer. Pages subscribe to :meth:`Console.subscribe` (server-sent
events): each result as it arrives (batched every 200 ms), the cluster when it changed (at most once a
second), the function figures every two seconds, workflow runs as their steps move, and the broker's
reachability when it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from events import (
    FunctionSpec,
    InvocationCompleted,
    NodeHeartbeat,
    NodeMetrics,
    NodeStopped,
    PlacementOverride,
    ThrottleDecided,
    TokenIssued,
    TokenRevoked,
    now_ms,
)
from events.base import Record
from events.cluster import NodeObserved
from events.code import BuildFinished, BuildStarted
from events.workflow import RunFinished, RunStarted, StepFinished, StepStarted, WorkflowSpec
from services.cli.tracefile import SpanFiles, trace_ids_for
from services.common import auth
from services.common.client import StokerClient
from services.common.resultscan import results_since
from services.common.views import Table
from services.console import state
from services.console.settings import ConsoleSettings

log = logging.getLogger("stoker.console")

PUSH_RESULTS_S = 0.2
TICK_S = 1.0
BROKER_CHECK_S = 2.0


class Console:
    """What the console knows of one platform, and the pages that watch it."""

    def __init__(
        self,
        settings: ConsoleSettings,
        broker_reachable: Callable[[], bool],
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.settings = settings
        self.topics = settings.common.topics
        self._broker_reachable = broker_reachable
        self._clock = clock
        self.client: StokerClient | None = None
        self.results = state.InvocationLog()
        self.runs = state.RunBook()
        self.builds: dict[str, list[BuildStarted | BuildFinished]] = {}
        self.decisions: deque[ThrottleDecided] = deque(maxlen=200)
        self.metrics: dict[str, NodeMetrics] = {}
        self.broker_up: bool | None = None
        self._tables: dict[str, Table[Any]] = {}
        self._subscribers: set[asyncio.Queue[tuple[str, Any]]] = set()
        self._pending_results: list[dict[str, Any]] = []
        self._changed_runs: set[str] = set()
        self._cluster_changed = True
        self._start_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_used = time.monotonic()
        self._span_files = SpanFiles(settings.common.traces_dir)

    # ----- reading ------------------------------------------------------------------------------

    @property
    def watching(self) -> bool:
        return self.client is not None

    @property
    def pages_open(self) -> int:
        return len(self._subscribers)

    async def ensure_watching(self) -> None:
        """Start reading the topics if not yet (the first page request does this)."""
        self._last_used = time.monotonic()
        if self.client is not None:
            return
        async with self._start_lock:
            self._last_used = time.monotonic()
            if self.client is not None:
                return
            client = StokerClient(self.settings.common)
            await client.__aenter__()
            try:
                await self._open_views(client)
            except BaseException:
                await client.__aexit__(None, None, None)
                raise
            self.client = client
            self._tasks = [asyncio.create_task(self._ticker()), asyncio.create_task(self._watch_broker())]
            log.info("console: reading the platform's topics")

    async def _open_views(self, client: StokerClient) -> None:
        reader, topics = client.reader, self.topics

        def changed(*_: object) -> None:
            self._cluster_changed = True

        self._tables = {
            "functions": reader.table(topics.function, (FunctionSpec,), on_change=changed, traced=False),
            "nodes": reader.table(
                topics.node, (NodeHeartbeat, NodeStopped, NodeObserved), on_change=changed, traced=False
            ),
            "placement": reader.table(topics.placement, (PlacementOverride,), on_change=changed, traced=False),
            "workflows": reader.table(topics.workflow, (WorkflowSpec,), traced=False),
            "tokens": reader.table(topics.token, (TokenIssued, TokenRevoked), traced=False),
        }
        reader.tail(topics.node_metric, (NodeMetrics,), self._on_metrics, traced=False)
        reader.tail(topics.throttle, (ThrottleDecided,), self._on_decision, replay=True, traced=False)
        reader.tail(topics.build, (BuildStarted, BuildFinished), self._on_build, replay=True, traced=False)
        reader.tail(
            topics.workflow_run,
            (RunStarted, StepStarted, StepFinished, RunFinished),
            self._on_run,
            replay=True,
            traced=False,
        )
        reader.tail(topics.result, (InvocationCompleted,), self._on_result, traced=False)
        since = self._clock() - int(self.settings.history_s * 1000)
        await reader.start()
        # The tail above fixed its start; what ended before it is read once (an id seen twice is kept once).
        _, earlier = await results_since(self.settings.common.bootstrap, topics.result, since, lambda _: True)
        for result in sorted(earlier, key=lambda r: r.completed_ms):
            self.results.add(result)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        client, self.client = self.client, None
        if client is not None:
            await client.__aexit__(None, None, None)

    def _on_result(self, result: InvocationCompleted) -> None:
        if self.results.get(result.id) is not None:
            return
        self.results.add(result)
        self._pending_results.append(state.summary_of(result))

    def _on_metrics(self, metrics: NodeMetrics) -> None:
        self.metrics[metrics.node] = metrics
        self._cluster_changed = True

    def _on_decision(self, decision: ThrottleDecided) -> None:
        self.decisions.append(decision)
        self._cluster_changed = True

    def _on_build(self, record: Record) -> None:
        if isinstance(record, BuildStarted | BuildFinished):
            self.builds.setdefault(record.function, []).append(record)

    def _on_run(self, event: Record) -> None:
        if isinstance(event, RunStarted | StepStarted | StepFinished | RunFinished):
            self.runs.add(event)
            self._changed_runs.add(event.run)

    # ----- views --------------------------------------------------------------------------------

    async def principal(self, token: str) -> auth.Principal:
        """Who ``token`` is, from the platform's token table; :class:`auth.AuthError` if nobody (yet)."""
        await self.ensure_watching()
        view = self._tables["tokens"]
        try:
            return auth.verify(token, view.get, self._clock())
        except auth.AuthError as exc:
            if exc.message != "unknown token":
                raise
            await view.wait_caught_up(timeout_s=1.0)  # made a moment ago
            return auth.verify(token, view.get, self._clock())

    def rows(self, table: str) -> dict[str, Any]:
        view = self._tables.get(table)
        return dict(view.rows) if view is not None else {}

    def cluster(self) -> dict[str, Any]:
        return state.cluster_view(
            self.rows("nodes"), self.metrics, self.rows("placement"), self.decisions, self._clock()
        )

    def functions(self) -> list[dict[str, Any]]:
        now = self._clock()
        self.results.forget_before(now)
        nodes = self.rows("nodes")
        shown = []
        for name, spec in sorted(self.rows("functions").items()):
            figures = self.results.figures(name, now)
            holding = [
                {"node": node, "instance": i.instance, "state": i.state, "version": i.function_version}
                for node, rec in sorted(nodes.items())
                if isinstance(rec, NodeHeartbeat) and rec.fresh(now)
                for i in rec.instances
                if i.function == name
            ]
            builds = state.builds_view(self.builds.get(name, []))
            shown.append(
                {
                    "name": name,
                    "version": spec.code_version,
                    "active": bool(spec.source.digest),
                    "source": spec.source.model_dump(mode="json", exclude_none=True),
                    "reuse": spec.reuse,
                    "entrypoint": spec.entrypoint,
                    "revision": spec.revision,
                    "instances": holding,
                    "builds": builds[:5],
                    **figures,
                }
            )
        return shown

    def invocation(self, ident: str) -> dict[str, Any] | None:
        """One invocation's result and its trace as waterfall rows (``None`` if not seen by this console)."""
        result = self.results.get(ident)
        spans = self._span_files.spans()
        trace_ids = trace_ids_for(spans, ident)
        if result is None and not trace_ids:
            return None
        traces = [state.waterfall(spans, t) for t in trace_ids]
        return {
            "id": ident,
            "result": result.model_dump(mode="json") if result else None,
            "traces": traces,
            "linked": [state.waterfall(spans, t) for tr in traces for t in tr["linked"]],
            "traced": bool(trace_ids),
            "run": ident if self.runs.view(ident) is not None else None,
        }

    def workflows(self) -> list[dict[str, Any]]:
        return [
            {**state.workflow_view(spec), "runs": self.runs.of(name, limit=10)}
            for name, spec in sorted(self.rows("workflows").items())
        ]

    # ----- pushing ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[tuple[str, Any]]]:
        """A queue of (event, data) for one page; the first events are the current state."""
        await self.ensure_watching()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=1000)
        queue.put_nowait(("broker", {"up": self.broker_up is not False}))
        queue.put_nowait(("cluster", self.cluster()))
        queue.put_nowait(("functions", self.functions()))
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)
            self._last_used = time.monotonic()

    def _push(self, event: str, data: Any) -> None:
        for queue in list(self._subscribers):
            try:
                queue.put_nowait((event, data))
            except asyncio.QueueFull:
                pass  # a page that does not read loses updates, never the console's memory

    async def _ticker(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(PUSH_RESULTS_S)
            ticks += 1
            if self._pending_results:
                batch, self._pending_results = self._pending_results, []
                self._push("invocations", batch)
            if self._changed_runs:
                changed, self._changed_runs = self._changed_runs, set()
                self._push("runs", [v for r in changed if (v := self.runs.view(r)) is not None])
            if ticks % int(TICK_S / PUSH_RESULTS_S) == 0 and self._cluster_changed:
                self._cluster_changed = False
                self._push("cluster", self.cluster())
            if ticks % int(2 * TICK_S / PUSH_RESULTS_S) == 0 and self._subscribers:
                self._push("functions", self.functions())
            if not self._subscribers and time.monotonic() - self._last_used > self.settings.idle_after_s:
                async with self._start_lock:  # a page opening meanwhile keeps the console reading
                    if self._subscribers or time.monotonic() - self._last_used <= self.settings.idle_after_s:
                        continue
                    log.info("console: no page open for %.0f s, stops reading", self.settings.idle_after_s)
                    for task in self._tasks:
                        if task is not asyncio.current_task():
                            task.cancel()
                    self._tasks = []
                    client, self.client = self.client, None
                    self.broker_up = None
                    if client is not None:
                        await client.__aexit__(None, None, None)
                return

    async def _watch_broker(self) -> None:
        while True:
            up = await asyncio.to_thread(self._broker_reachable)
            if up != self.broker_up:
                if self.broker_up is not None:
                    log.warning("console: the broker is %s", "reachable again" if up else "unreachable")
                self.broker_up = up
                self._push("broker", {"up": up})
            await asyncio.sleep(BROKER_CHECK_S)
