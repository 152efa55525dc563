"""Functions that attack their instance; each must end in a terminal result, the node unharmed."""

import os
import signal
import sys
import time


def main(event):
    action = event["action"]
    if action == "fork-bomb":
        while True:
            os.fork()
    if action == "balloon":
        hog = []
        while True:
            hog.append(bytearray(16 * 1024 * 1024))
    if action == "spin":
        while True:
            pass
    if action == "flood":
        chunk = "x" * (1024 * 1024)
        for _ in range(1024):  # 1 GB
            sys.stdout.write(chunk)
        return "flooded"
    if action == "suicide":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)
    if action == "ok":
        return {"pid": os.getpid()}
    if action == "sleep-ok":
        time.sleep(0.5)
        return {"pid": os.getpid()}
    raise ValueError(action)
