"""The node agent: runtime instances, the code cache, execution, node registration and heartbeat."""
