"""One ``mindport serve`` process for the whole folder (the shutdown test starts its own)."""
from __future__ import annotations

import pytest

from testkit.serving import ServeProcess, chat_model

MAX_BATCH, MAX_QUEUE = 4, 8


@pytest.fixture(scope="package")
def chat_dirs(tmp_path_factory) -> tuple[str, str]:
    """(model directory, LoRA adapter directory) of a tiny chat model."""
    return chat_model(str(tmp_path_factory.mktemp("serve")))


@pytest.fixture(scope="package")
def server(chat_dirs, tmp_path_factory):
    model_dir, adapter_dir = chat_dirs
    proc = ServeProcess(["--load", model_dir, "--adapter", f"tuned={adapter_dir}", "--max-batch", str(MAX_BATCH),
                         "--max-queue", str(MAX_QUEUE)], str(tmp_path_factory.mktemp("serve_log") / "serve.log"))
    yield proc
    assert proc.stop() == 0, proc.output()


@pytest.fixture(scope="package")
def client(server):
    """The real ``openai`` client; no retries, so a 429 is seen as one."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
