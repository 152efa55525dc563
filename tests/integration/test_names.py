"""One registry of invocable names, on the real broker: a function or a workflow, never both."""

from __future__ import annotations

import asyncio

import pytest

from events import CodeSource, FunctionSpec
from events.workflow import WorkflowSpec
from services.common.client import StokerClient
from services.common.names import NameTaken
from services.common.settings import CommonSettings
from services.workflow.dsl import load

DIGEST = "sha256:" + "ab" * 32
YAML = "steps:\n  - id: one\n    function: base\n"


def _function(name: str) -> FunctionSpec:
    return FunctionSpec(name=name, entrypoint="handler:main", source=CodeSource(digest=DIGEST))


def _workflow(name: str) -> WorkflowSpec:
    return load(name, YAML, lambda fn: fn == "base")


def test_the_second_kind_is_refused_whichever_comes_first(stoker_settings: CommonSettings) -> None:
    async def go() -> None:
        async with StokerClient(stoker_settings) as client:
            await client.put_function(_function("base"))
            await client.put_function(_function("x"))
            await client.put_function(_function("x"))  # updating a function keeps its name
            with pytest.raises(NameTaken, match="'x' is already a function"):
                await client.put_workflow(_workflow("x"))
            await client.put_workflow(_workflow("w"))
            with pytest.raises(NameTaken, match="'w' is already a workflow"):
                await client.put_function(_function("w"))
            # Deleting frees the name for the other kind.
            await client.delete_workflow("w")
            await client.put_function(_function("w"))
            assert "w" in await client.functions()

    asyncio.run(go())


def test_concurrent_creates_of_two_kinds_end_with_one(stoker_settings: CommonSettings) -> None:
    async def go() -> None:
        async with StokerClient(stoker_settings) as setup:
            await setup.put_function(_function("base"))
        for round_ in range(5):
            name = f"race-{round_}"
            async with StokerClient(stoker_settings) as a, StokerClient(stoker_settings) as b:
                outcomes = await asyncio.gather(
                    a.put_function(_function(name)), b.put_workflow(_workflow(name)), return_exceptions=True
                )
                refused = [o for o in outcomes if isinstance(o, NameTaken)]
                assert len(refused) == 1, outcomes
                functions = await a.functions()
                workflows = await a.table(stoker_settings.topics.workflow, WorkflowSpec)
                assert (name in functions) != (name in workflows), (name, outcomes)
                winner = "function" if name in functions else "workflow"
                assert f"is already a {winner}" in str(refused[0])

    asyncio.run(go())
