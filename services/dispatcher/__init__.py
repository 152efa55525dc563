"""The dispatcher: consumes invocations and routes each to a node."""
