"""A throwaway Stoker for integration tests and benchmarks: free loopback ports, a temporary state folder.

``LocalPlatform.start()`` runs ``stoker up --detach`` (the embedded broker and the supervised services and
agents, as a user starts them) and ``stop()`` runs ``stoker down``; ``start_broker()`` starts an embedded
Kafka broker alone. The tests and ``loadtest/`` use these, and so can a user's own tests::

    with LocalPlatform.start() as stoker:
        stoker.stoker("fn", "create", "greeter", "--code", "examples/hello", "--entrypoint", "handler:main")
        print(stoker.client().post("/fn/greeter", json={"name": "me"}).json())
"""

from services.testing._platform import (
    STOKER,
    LocalPlatform,
    RunningBroker,
    free_ports,
    processes_under,
    shared_libs_dir,
    start_broker,
)

__all__ = [
    "STOKER",
    "LocalPlatform",
    "RunningBroker",
    "free_ports",
    "processes_under",
    "shared_libs_dir",
    "start_broker",
]
