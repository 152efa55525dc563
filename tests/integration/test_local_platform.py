"""The packaged throwaway platform, used the way a user's own integration test would use it."""

from __future__ import annotations

from pathlib import Path

from services.testing import LocalPlatform, processes_under
from tests.helpers import assert_eventually

HELLO = Path(__file__).resolve().parents[2] / "examples" / "hello"


def test_a_throwaway_platform_runs_a_function_and_leaves_nothing_running() -> None:
    with LocalPlatform.start("--nodes", "1", "--isolated", "0", "--no-example") as stoker:
        home = stoker.home
        assert stoker.bootstrap and stoker.gateway_url.startswith("http://127.0.0.1:")
        stoker.stoker("fn", "create", "greeter", "--code", str(HELLO), "--entrypoint", "handler:main")
        with stoker.client() as http:
            answer = assert_eventually(
                lambda: (r := http.post("/fn/greeter", json={"name": "tester"})).status_code == 200 and r,
                timeout_s=60,
                message="greeter answers",
            )
        assert answer.json()["greeting"] == "Hello, tester!"
    assert not processes_under(home)
    assert not home.exists()  # the temporary folder went with the platform
