"""Two functions sharing one reset instance: ``leave`` leaves everything it can, ``find`` looks for it."""

import os
import sys
import tempfile

MODULE_STATE = []


def main(event):
    if event["action"] == "leave":
        MODULE_STATE.append("secret")
        with open("/work/secret.txt", "w") as fh:
            fh.write("secret of the first function")
        os.makedirs("/work/nested/deeper", exist_ok=True)
        with open(os.path.join(tempfile.gettempdir(), "secret.tmp"), "w") as fh:
            fh.write("temp secret")
        with open("/dev/shm/secret.shm", "w") as fh:
            fh.write("shm secret")
        os.environ["LEFT_SECRET"] = "yes"
        sys.path.append("/left/by/the/first")
        sys.modules["left_module"] = type(sys)("left_module")
        os.chdir("/work/nested")
        return {"pid": os.getpid(), "uid": os.getuid()}
    found = {
        "pid": os.getpid(),
        "uid": os.getuid(),
        "work": sorted(os.listdir("/work")),
        "tmp": sorted(os.listdir(tempfile.gettempdir())),
        "shm": sorted(os.listdir("/dev/shm")),
        "env": os.environ.get("LEFT_SECRET"),
        "path": [p for p in sys.path if "left" in p],
        "modules": [m for m in sys.modules if m == "left_module"],
        "cwd": os.getcwd(),
        "module_state": MODULE_STATE,
        "code": sorted(os.listdir("/code")),
    }
    return found
