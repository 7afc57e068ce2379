"""A guest that misbehaves on purpose, for the sandbox tests: apps/hostile
in Python. What it does depends on the input's file name (its last path
component): `loop`, `alloc`, `raise` fail the task; `passwd`, `socket`,
`env`, `clock` report what the sandbox let them see as output pairs;
anything else is counted like wc."""

import os
import socket
import time

import mr_sdk

REPORTS = ("passwd", "socket", "env", "clock")


class Hostile(mr_sdk.App):
    def map(self, input, contents, out):
        name = input.rsplit("/", 1)[-1]
        if name == "loop":
            x = 0
            while True:
                x += 1
        elif name == "alloc":
            hoard = []
            while True:
                hoard.append(bytearray(1 << 20))
        elif name == "raise":
            raise RuntimeError("hostile guest raises on purpose")
        elif name == "passwd":
            try:
                with open("/etc/passwd") as f:
                    seen = f"READ {len(f.read())} bytes"
            except Exception as e:
                seen = f"denied: {type(e).__name__}: {e}"
            out.emit("passwd", seen)
        elif name == "socket":
            host, port = contents.strip().rsplit(":", 1)
            try:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.settimeout(2)
                s.connect((host, int(port)))
                seen = "CONNECTED"
            except Exception as e:
                seen = f"denied: {type(e).__name__}: {e}"
            out.emit("socket", seen)
        elif name == "env":
            out.emit("env", "LEAKED " + ",".join(os.environ) if os.environ else "empty")
        elif name == "clock":
            out.emit("clock", f"wall-clock-secs {int(time.time())}")
        else:
            for word in mr_sdk.words(contents):
                out.emit(word, "1")

    def reduce(self, key, values):
        if key in REPORTS:
            return " ".join(sorted(values))
        return str(sum(int(v) for v in values))


WitWorld = mr_sdk.export(Hostile)
