"""Workflows: a YAML DAG of function calls, its expression language and the pure run state machine.

``expr`` is the expression language, ``dsl`` turns YAML into a validated ``WorkflowSpec``, ``plan``
decides what a run does next from its events. None of them touches Kafka.
"""
