"""``wavesweep ui`` answers within seconds (one server worker, no job executor)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import subprocess_env

pytestmark = pytest.mark.slow


def test_ui_answers_quickly(workdir, shared_cache):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = subprocess_env(workdir, shared_cache)
    subprocess.run([sys.executable, "-m", "wavesweep", "models"], cwd=workdir, env=env, check=True, capture_output=True)  # store exists
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "wavesweep", "ui", "--port", str(port)], cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200:
                    break
            except OSError:
                assert proc.poll() is None, "wavesweep ui exited"
                assert time.monotonic() - t0 < 60, "no answer within 60 s"
                time.sleep(0.2)
        elapsed = time.monotonic() - t0
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read()
        assert b"<html" in page.lower()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    print(f"wavesweep ui answered in {elapsed:.1f} s")
    assert elapsed < 30, f"wavesweep ui took {elapsed:.1f} s to answer"
