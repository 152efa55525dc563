"""A test function whose behaviour the event chooses."""

import asyncio
import os
import sys
import time

STATE = {"calls": 0}


def main(event, context):
    STATE["calls"] += 1
    action = (event or {}).get("action", "echo")
    if action == "echo":
        return {
            "echo": event,
            "calls": STATE["calls"],
            "pid": os.getpid(),
            "id": context.invocation_id,
            "function": context.function,
            "version": context.version,
        }
    if action == "raise":
        raise ValueError("boom from the function")
    if action == "sleep":
        time.sleep(float(event["seconds"]))
        return {"slept": event["seconds"], "pid": os.getpid()}
    if action == "exit":
        os._exit(3)
    if action == "print":
        print("hello to stdout")
        print("hello to stderr", file=sys.stderr)
        return "printed"
    if action == "not-json":
        return {1, 2, 3}
    if action == "env":
        return {"GREETING": os.environ.get("GREETING"), "HOME_SET": "STOKER_BOOTSTRAP" in os.environ}
    raise KeyError(action)


async def amain(event):
    await asyncio.sleep(0.01)
    return {"async": True, "event": event}
