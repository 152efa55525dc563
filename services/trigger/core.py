"""The trigger service's state and actions: which topic triggers run here, and their status.

Dependencies come in (the writer of records, the result book, the result scan, the topic check,
the cron scheduler), so tests can pass real or fake ones. ``on_spec`` is called for every change
of the ``trigger`` table: a topic trigger that is new, changed or resumed (re)starts its
consumer; one paused or deleted stops it, committing what it recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from events.triggers import TriggerSpec, TriggerStatus
from services.trigger.cron import CronScheduler
from services.trigger.results import ResultBook
from services.trigger.settings import TriggerSettings
from services.trigger.topic import ScanResults, Send, TopicExists, TopicTrigger

log = logging.getLogger("stoker.trigger")

PublishStatus = Callable[[str, TriggerStatus | None], Awaitable[object]]
"""Publish (or, with None, remove) this copy's status of a trigger."""

RESTART_PAUSE_S = 2.0


class Triggers:
    def __init__(
        self,
        settings: TriggerSettings,
        *,
        send: Send,
        book: ResultBook,
        scan_results: ScanResults,
        topic_exists: TopicExists,
        publish_status: PublishStatus,
        scheduler: CronScheduler | None = None,
    ) -> None:
        self.settings = settings
        self._send = send
        self.book = book
        self._scan = scan_results
        self._topic_exists = topic_exists
        self._publish_status = publish_status
        self.scheduler = scheduler
        self.specs: dict[str, TriggerSpec] = {}
        self.running: dict[str, tuple[TopicTrigger, asyncio.Task[None]]] = {}
        self._changes: asyncio.Queue[tuple[str, TriggerSpec | None]] = asyncio.Queue()
        self._stopping = False

    # ----- definitions ---------------------------------------------------------------------------

    def on_spec(self, name: str, spec: TriggerSpec | None) -> None:
        """A change of the ``trigger`` table (applied in order by :meth:`apply_changes`)."""
        if spec is None:
            self.specs.pop(name, None)
        else:
            self.specs[name] = spec
        self._changes.put_nowait((name, spec))

    def cron_specs(self) -> list[TriggerSpec]:
        return [s for s in self.specs.values() if s.kind == "cron"]

    async def apply_changes(self) -> None:
        while True:
            name, spec = await self._changes.get()
            await self.reconcile(name, spec)

    async def reconcile(self, name: str, spec: TriggerSpec | None) -> None:
        current = self.running.get(name)
        wanted = spec is not None and spec.kind == "topic" and not spec.paused
        if current is not None and (not wanted or current[0].spec != spec):
            await self._stop(name)
        if wanted and name not in self.running:
            assert spec is not None
            self._launch(spec)
        if spec is None:
            await self._publish_status(name, None)

    def _launch(self, spec: TriggerSpec) -> None:
        runner = TopicTrigger(
            spec,
            self.settings,
            send=self._send,
            book=self.book,
            scan_results=self._scan,
            topic_exists=self._topic_exists,
        )
        task = asyncio.create_task(runner.run(), name=f"trigger:{spec.name}")
        name = spec.name
        task.add_done_callback(lambda t: self._ended(name, runner, t))
        self.running[spec.name] = (runner, task)
        log.info("trigger %s: consuming %s for %s", spec.name, spec.topic, spec.function)

    def _ended(self, name: str, runner: TopicTrigger, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._stopping:
            return
        log.error("trigger %s stopped: %r; starting it again in %.0f s", name, task.exception(), RESTART_PAUSE_S)

        async def again() -> None:
            await runner.stop()
            await asyncio.sleep(RESTART_PAUSE_S)
            if self.running.get(name, (None,))[0] is runner:
                del self.running[name]
                spec = self.specs.get(name)
                if spec is not None and spec.kind == "topic" and not spec.paused:
                    self._launch(spec)

        asyncio.get_running_loop().create_task(again())

    async def _stop(self, name: str) -> None:
        runner, task = self.running.pop(name)
        await runner.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        log.info("trigger %s: stopped here", name)

    async def stop(self) -> None:
        self._stopping = True
        for name in list(self.running):
            await self._stop(name)

    # ----- status --------------------------------------------------------------------------------

    def statuses(self) -> list[TriggerStatus]:
        out: list[TriggerStatus] = []
        for name, spec in sorted(self.specs.items()):
            if spec.kind == "topic":
                entry = self.running.get(name)
                if entry is not None:
                    out.append(entry[0].status())
                elif spec.paused:
                    out.append(TriggerStatus(trigger=name, instance=self.settings.instance_name, state="paused"))
            elif self.scheduler is not None:
                out.append(self.scheduler.status(spec))
        return out

    async def status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.status_interval_s)
            for status in self.statuses():
                await self._publish_status(status.trigger, status)
