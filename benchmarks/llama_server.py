"""llama.cpp's OpenAI server (llama-cpp-python, `pip install -e ".[bench]"`) as a benchmark baseline:
started on a free loopback port, waited for, stopped on exit."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_cpp_server(gguf: str, *, n_ctx: int = 4096, start_timeout: float = 120.0) -> Iterator[str | None]:
    """The server's base URL (``http://127.0.0.1:PORT/v1``), or None (with the reason printed) when
    it did not start."""
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
           "--n_ctx", str(n_ctx), "--n_threads", str(os.cpu_count() or 1)]
    # Its log goes to a file: an undrained pipe fills up and blocks the server (llama.cpp logs a lot).
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        url = f"http://127.0.0.1:{port}/v1"
        try:
            deadline = time.monotonic() + start_timeout
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(url + "/models", timeout=2):
                        break
                except OSError:
                    time.sleep(0.5)
            else:
                log.seek(0)
                why = (log.read().decode(errors="replace")[-500:] if proc.poll() is not None
                       else f"did not start in {start_timeout:.0f} s")
                print(f"llama.cpp: server failed ({why})", file=sys.stderr)
                url = None
            yield url
        finally:
            proc.terminate()
            proc.wait(30)
