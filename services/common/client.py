"""StokerClient: what the CLI, tests and benchmarks use to talk to a platform over Kafka.

It writes function specs to the compacted ``function`` topic, publishes invocations exactly as
any Kafka client may, and matches results from the ``result`` topic by invocation id.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaProducer
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from events import FunctionSpec, InvocationCompleted, InvocationRequested, NodeHeartbeat, NodeStopped, Record, now_ms
from events.cluster import NodeObserved
from events.codec import encode
from events.function import CodeSource
from events.workflow import WorkflowSpec
from services.common import names, telemetry
from services.common.artifacts import LocalArtifactStore, digest_of_archive, package_directory
from services.common.kafkasec import client_options as kafka_client_options
from services.common.kafkasec import explained as explained_connection
from services.common.settings import CommonSettings
from services.common.views import Reader, Tail

tracer = trace.get_tracer("stoker.client")


def package_code(settings: CommonSettings, code_dir: Path) -> CodeSource:
    """Package a directory into the artifact store; returns the spec's code source."""
    blob, digest = package_directory(code_dir)
    return _stored(settings, blob, digest)


def store_archive(settings: CommonSettings, blob: bytes) -> CodeSource:
    """Put an uploaded zip of a function's files into the artifact store; returns the spec's code source.
    :class:`ArtifactError` if it is not a usable archive."""
    return _stored(settings, blob, digest_of_archive(blob))


def _stored(settings: CommonSettings, blob: bytes, digest: str) -> CodeSource:
    uri = LocalArtifactStore(settings.artifacts_dir).put(blob, digest)
    return CodeSource(kind="archive", digest=digest, uri=uri, size=len(blob))


class StokerClient:
    """An async client of one Stoker platform (``async with StokerClient(settings) as c``)."""

    def __init__(self, settings: CommonSettings) -> None:
        self.settings = settings
        self.topics = settings.topics
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap,
            **kafka_client_options(settings.kafka),
            acks="all",
            enable_idempotence=True,
            linger_ms=0,
            request_timeout_ms=15_000,
        )
        # One reader for every view the client opens. Its views come and go one after another
        # (status, create): a short long poll lets each new one catch up sooner; a client is not
        # a platform process idling for hours.
        self._reader = Reader(settings.bootstrap, "client", fetch_max_wait_ms=100)
        self._results: Tail[InvocationCompleted] | None = None
        self._results_lock = asyncio.Lock()
        self._waiting: dict[str, asyncio.Future[InvocationCompleted]] = {}

    @property
    def reader(self) -> Reader:
        """The client's one reader, for more views of the platform's topics (``client.reader.tail(...)``)."""
        return self._reader

    async def __aenter__(self) -> StokerClient:
        try:
            async with explained_connection(self.settings.bootstrap):
                await self._producer.start()
        except BaseException:
            await self._producer.stop()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._reader.stop()
        await self._producer.stop()

    # ----- functions ----------------------------------------------------------------------------

    async def send(self, record: Record, topic: str, key: str) -> None:
        """Publish any Stoker record; returns once the broker confirmed it."""
        await self._producer.send_and_wait(topic, encode(record), key=key.encode())

    async def put_function(self, spec: FunctionSpec) -> None:
        """Create or replace a function; :class:`NameTaken` if the name is a workflow's."""
        await self._claim(spec.name, "function")
        await self._producer.send_and_wait(self.topics.function, encode(spec), key=spec.name.encode())

    async def delete_function(self, name: str) -> None:
        await self.tombstone(self.topics.function, name)
        await names.release(self._producer, self.topics.name, name, "function")

    async def put_workflow(self, spec: WorkflowSpec) -> None:
        """Create or replace a workflow; :class:`NameTaken` if the name is a function's."""
        await self._claim(spec.name, "workflow")
        await self._producer.send_and_wait(self.topics.workflow, encode(spec), key=spec.name.encode())

    async def delete_workflow(self, name: str) -> None:
        await self.tombstone(self.topics.workflow, name)
        await names.release(self._producer, self.topics.name, name, "workflow")

    async def _claim(self, name: str, kind: names.Kind) -> None:
        functions = await self.functions()
        workflows = await self.table(self.topics.workflow, WorkflowSpec)

        def has_spec(of: str, who: str) -> bool:
            return who in (functions if of == "function" else workflows)

        await names.claim(self._producer, self.settings.bootstrap, self.topics.name, name, kind, has_spec)

    async def tombstone(self, topic: str, key: str) -> None:
        """Delete ``key`` from a compacted topic."""
        await self._producer.send_and_wait(topic, None, key=key.encode())

    async def table(self, topic: str, *models: type[Record]) -> dict[str, Record]:
        """The current rows of a compacted topic."""
        view = self._reader.table(topic, models, traced=False)
        await view.start()
        await view.stop()
        return dict(view.rows)

    async def functions(self) -> dict[str, FunctionSpec]:
        view = self._reader.table(self.topics.function, (FunctionSpec,), traced=False)
        await view.start()
        await view.stop()
        return dict(view.rows)

    async def nodes(self) -> dict[str, NodeHeartbeat | NodeStopped]:
        rows: dict[str, Any] = await self.table(self.topics.node, NodeHeartbeat, NodeStopped, NodeObserved)
        return rows

    async def history(self, topic: str, key: str | None = None) -> list[Record]:
        """Every decodable record on ``topic`` (optionally only ``key``'s), oldest first."""
        found: list[Record] = []
        tail = self._reader.tail(topic, (Record,), found.append, key=key, replay=True, traced=False)
        await tail.start()
        await tail.stop()
        return found

    # ----- invocations --------------------------------------------------------------------------

    async def _ensure_results(self) -> None:
        # Concurrent first calls must all wait for the one listener to be in place: a result that
        # arrives before it has fixed its start position would be missed.
        async with self._results_lock:
            if self._results is None:
                # Every result of the platform passes here: no span for each.
                tail = self._reader.tail(self.topics.result, (InvocationCompleted,), self._resolve, traced=False)
                await tail.start()
                self._results = tail

    def _resolve(self, result: InvocationCompleted) -> None:
        future = self._waiting.pop(result.id, None)
        if future is not None and not future.done():
            future.set_result(result)

    async def publish(self, inv: InvocationRequested) -> None:
        """Publish one invocation record; returns once the broker confirmed it."""
        headers: dict[str, str] = {}
        propagate.inject(headers)
        await self._producer.send_and_wait(
            self.topics.invocation,
            encode(inv),
            key=inv.function.encode(),
            headers=[(k, v.encode()) for k, v in headers.items()],
        )

    async def invoke(
        self, function: str, payload: Any = None, *, timeout_s: float = 60.0, deadline_ms: int | None = None
    ) -> InvocationCompleted:
        """Invoke a function over Kafka and wait for its terminal result."""
        await self._ensure_results()
        inv = InvocationRequested(function=function, payload=payload, deadline_ms=deadline_ms)
        future = asyncio.get_running_loop().create_future()
        self._waiting[inv.id] = future
        with tracer.start_as_current_span(
            f"{self.topics.invocation} publish",
            kind=SpanKind.PRODUCER,
            attributes={
                telemetry.INVOCATION_ID: inv.id,
                telemetry.FUNCTION: function,
                "messaging.system": "kafka",
                "messaging.destination.name": self.topics.invocation,
                "messaging.operation.type": "send",
            },
        ):
            try:
                await self.publish(inv)
                return await asyncio.wait_for(future, timeout_s)
            finally:
                self._waiting.pop(inv.id, None)


def deadline_in(seconds: float) -> int:
    return now_ms() + int(seconds * 1000)
