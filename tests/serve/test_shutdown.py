"""SIGTERM on a real ``mindport serve``: it stops accepting, finishes the running request, exits 0."""
from __future__ import annotations

import json
import signal
import time

import pytest

from testkit.serving import ServeProcess, open_stream, request


def test_sigterm_finishes_the_running_request_and_exits_0(chat_dirs, tmp_path):
    proc = ServeProcess(["--load", chat_dirs[0], "--served-model-name", "m"], str(tmp_path / "serve.log"))
    try:
        body = {"model": "m", "prompt": "Hi", "max_tokens": 120, "temperature": 0, "stream": True}
        connection, response = open_stream(proc.url, "/v1/completions", body)
        assert response.status == 200
        first = response.readline()
        assert first.startswith(b"data: ") and json.loads(first[6:])["choices"][0]["finish_reason"] is None
        proc.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        with pytest.raises(OSError):  # no new connection is accepted
            request(proc.url, "/health", timeout=5)
        events = [json.loads(line[6:]) for line in response.read().split(b"\n")
                  if line.startswith(b"data: {")]
        connection.close()
        assert events[-1]["choices"][0]["finish_reason"] == "length"  # the request ran to its end
        assert proc.proc.wait(60) == 0, proc.output()
    finally:
        proc.stop()
