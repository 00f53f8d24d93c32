"""A loopback S3 server (moto's, in its own process) for the remote-store benchmark and the S3 tests.

It lives with the benchmarks rather than under tests/ because `python -m pipeline.bench.remote_bench`
starts it by itself and pipeline never imports tests; the tests import it from here.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time


def start_moto_server(port: int | None = None):
    """moto's S3 server in its own process on 127.0.0.1; (process, endpoint URL) once it answers."""
    if port is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            if server.poll() is not None:
                raise RuntimeError("moto_server exited; install it with pip install 'moto[server]'")
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("moto_server did not start within 60 s")
