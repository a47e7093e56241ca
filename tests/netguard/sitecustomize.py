"""Network guard for tests: DNS lookups and socket connects to anything but this machine raise and are recorded.

In-process, `tests/conftest.py`'s `no_network` fixture calls `install`. For subprocesses (the `yolo` command,
train.py, `python -m tood_yolo.x`) put this folder on PYTHONPATH and set TOOD_NETGUARD_LOG=<file>: Python imports
`sitecustomize` at start-up and each blocked attempt is appended to that file, since Ultralytics swallows most
network errors (a test asserts that the file stays empty, not only that the command failed).
"""

from __future__ import annotations

import os
import socket

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "", None}


def install(record, set_attr=setattr) -> None:
    """Make `socket.getaddrinfo`, `socket.socket.connect` and `connect_ex` raise for non-local hosts after
    `record(message)`; `set_attr` may be pytest's `monkeypatch.setattr`, which undoes it after the test."""
    getaddrinfo, connect, connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex

    def guarded_getaddrinfo(host, *args, **kwargs):
        if (host.decode() if isinstance(host, bytes) else host) not in LOCAL_HOSTS:
            record(f"getaddrinfo {host}")
            raise socket.gaierror(socket.EAI_NONAME, f"network access blocked by the test guard: {host}")
        return getaddrinfo(host, *args, **kwargs)

    def guard(connect_fn):
        def guarded_connect(self, address):
            host = address[0] if isinstance(address, tuple) else None  # AF_UNIX paths are local
            if host not in LOCAL_HOSTS:
                record(f"connect {address}")
                raise ConnectionRefusedError(f"network access blocked by the test guard: {address}")
            return connect_fn(self, address)

        return guarded_connect

    set_attr(socket, "getaddrinfo", guarded_getaddrinfo)
    set_attr(socket.socket, "connect", guard(connect))
    set_attr(socket.socket, "connect_ex", guard(connect_ex))


if os.environ.get("TOOD_NETGUARD_LOG"):

    def _append(message: str, path: str = os.environ["TOOD_NETGUARD_LOG"]) -> None:
        with open(path, "a") as f:
            f.write(message + "\n")

    install(_append)
