"""Changes every part of the process a reuse type must keep or undo, and reports what it found."""

import os
import sys
import tempfile

CALLS = 0
MARKER = "/stoker-test-marker"


def main(event):
    global CALLS
    CALLS += 1
    found = {
        "pid": os.getpid(),
        "calls": CALLS,
        "env": os.environ.get("STATEFUL"),
        "path_marker": MARKER in sys.path,
        "cwd_is_base": not os.getcwd().endswith("moved"),
        "tmp_files": sorted(os.listdir(tempfile.gettempdir())),
    }
    os.environ["STATEFUL"] = "dirty"
    sys.path.append(MARKER)
    os.makedirs("moved", exist_ok=True)
    os.chdir("moved")
    with tempfile.NamedTemporaryFile(delete=False, prefix="left-behind-") as fh:
        fh.write(b"x")
    return found
