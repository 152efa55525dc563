"""The program inside an instance: a Python runtime that loads one function and runs it."""
