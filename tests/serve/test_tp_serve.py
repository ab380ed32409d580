"""``mindport serve --model-parallel 2`` under msrun (scripts/msrun_launcher.sh): rank 0 serves HTTP, rank 1
follows its steps; greedy replies equal the single-process server's, and on SIGTERM both ranks exit 0."""
from __future__ import annotations

import os
import shlex
import subprocess
import time

import pytest

from testkit.launch import free_port
from testkit.serving import request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_tensor_parallel_serving_gives_the_single_process_replies(chat_dirs, client, tmp_path):
    model_dir, _ = chat_dirs
    port = free_port()
    command = f"mindport serve --load {shlex.quote(model_dir)} --served-model-name tiny-chat --model-parallel 2 " \
              f"--port {port}"
    env = dict(os.environ, PATH=os.path.dirname(os.sys.executable) + os.pathsep + os.environ["PATH"], GLOG_v="3")
    job = subprocess.Popen([os.path.join(ROOT, "scripts", "msrun_launcher.sh"), command, "2", str(free_port()),
                            str(tmp_path / "log"), "True", "600"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert job.poll() is None, job.stdout.read()
            try:
                request(f"http://127.0.0.1:{port}", "/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the tensor-parallel server did not start"
                time.sleep(0.5)
        for i in range(3):
            body = {"model": "tiny-chat", "messages": [{"role": "user", "content": f"Question {i}"}],
                    "max_tokens": 8 + 4 * i, "temperature": 0}
            status, answer = request(f"http://127.0.0.1:{port}", "/v1/chat/completions", body)
            assert status == 200, answer
            single = client.chat.completions.create(**body).choices[0].message.content
            assert answer["choices"][0]["message"]["content"] == single
        job.terminate()  # the launcher passes SIGTERM to both ranks and answers 143 itself (README)
        code, out = job.wait(120), job.stdout.read()
        assert code == 143 and out.count("[msrun_launcher] exit code 0") == 2, out  # each rank exited 0
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
