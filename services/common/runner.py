"""Running one service process: start the broker, background loops, readiness, clean shutdown.

Readiness is a file, ``<home>/run/<component>.ready``, written once the broker is connected and
every subscriber started; ``stoker up`` waits on these files and ``stoker status`` reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from services.common.settings import CommonSettings

if TYPE_CHECKING:  # the CLI imports ready_file; it need not load faststream for that
    from faststream.kafka import KafkaBroker

Hook = Callable[[], Coroutine[Any, Any, None]]


def configure_logging(settings: CommonSettings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aiokafka is chatty at INFO about every group join; our own logs say what matters.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


def ready_file(common: CommonSettings, name: str) -> Path:
    """Where the component called ``name`` says it is ready: the one rule the services, ``stoker up`` and the
    tests share."""
    return common.run_dir / f"{name}.ready"


def ready_path(settings: CommonSettings, component: str) -> Path:
    """This process's own ready file."""
    # Several copies of one service (`stoker up --dispatchers 2`) each get their own name.
    return ready_file(settings, os.environ.get("STOKER_INSTANCE_NAME") or component)


def mark_ready(settings: CommonSettings, component: str, **facts: object) -> None:
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    facts = {"node": os.environ.get("STOKER_NODE_NAME", ""), **facts}
    ready_path(settings, component).write_bytes(orjson.dumps({"pid": os.getpid(), **facts}))


def clear_ready(settings: CommonSettings, component: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        ready_path(settings, component).unlink()


async def serve(
    component: str,
    settings: CommonSettings,
    broker: KafkaBroker | None,
    *,
    on_start: Sequence[Hook] = (),
    background: Sequence[Hook] = (),
    on_stop: Sequence[Hook] = (),
    ready_facts: dict[str, object] | None = None,
    stop_event: asyncio.Event | None = None,
) -> None:
    """Run a service until SIGTERM/SIGINT (or ``stop_event``), then stop it cleanly.

    ``broker`` is the service's faststream broker, or None for a service that reads and writes
    Kafka with its own clients (the dispatcher's intake).
    """
    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log = logging.getLogger(f"stoker.{component}")
    for hook in on_start:
        await hook()
    if broker is not None:
        await broker.start()
    tasks = [asyncio.create_task(loop_fn(), name=f"{component}:{i}") for i, loop_fn in enumerate(background)]
    mark_ready(settings, component, **(ready_facts or {}))
    log.info("%s ready", component)
    stopper = asyncio.create_task(stop.wait())
    # A background loop that dies is a broken service: stop rather than limp on.
    done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if task is not stopper and task.exception():
            log.error("background task %s failed: %r", task.get_name(), task.exception())
    log.info("%s stopping", component)
    clear_ready(settings, component)
    try:
        for hook in on_stop:
            await hook()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        stopper.cancel()
        if broker is not None:
            await broker.stop()
    log.info("%s stopped", component)


def serve_http(app: Any, host: str, port: int, graceful_s: int) -> None:
    """Run an HTTP service (the gateway, the console) in the foreground; its own logs say what matters."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=graceful_s)
