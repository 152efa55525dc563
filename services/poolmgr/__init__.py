"""The pool manager: sizes each node's generic pool and applies the keep-alive policy."""
