"""The example function `stoker up` deploys: greets whoever the event names."""

import platform

CALLS = 0  # module state survives between invocations of a `keep` instance


def main(event, context):
    global CALLS
    CALLS += 1
    name = (event or {}).get("name", "world") if isinstance(event, dict) else "world"
    return {
        "greeting": f"Hello, {name}!",
        "calls_in_this_instance": CALLS,
        "function": context.function,
        "invocation": context.invocation_id,
        "python": platform.python_version(),
    }
