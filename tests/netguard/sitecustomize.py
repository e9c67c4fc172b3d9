"""Loaded via PYTHONPATH in test subprocesses: any connection to a non-loopback address fails the run."""
import ipaddress
import os
import socket

_connect = socket.socket.connect


def _guarded(self, address):
    host = address[0] if isinstance(address, tuple) else None
    if host is not None and self.family in (socket.AF_INET, socket.AF_INET6):
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host in ("localhost",)
        if not loopback:
            with open(os.environ["ADAPT_NET_LOG"], "a") as f:
                f.write(f"{address}\n")
            raise ConnectionRefusedError(f"network access to {address} blocked by the test guard")
    return _connect(self, address)


if os.environ.get("ADAPT_NET_LOG"):
    socket.socket.connect = _guarded
