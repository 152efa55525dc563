"""Spins the CPU for the given seconds: the noisy neighbour."""

import os
import time


def main(event):
    end = time.time() + float((event or {}).get("seconds", 5))
    spins = 0
    while time.time() < end:
        spins += 1
    return {"spins": spins, "pid": os.getpid()}
