"""A tiny chat model directory with a LoRA adapter, and a real ``mindport serve`` process on it."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np

from testkit.launch import free_port


def chat_model(root: str) -> tuple[str, str]:
    """(model directory, adapter directory): a seeded tiny TeleChat2 beside a Qwen-style byte-level tokenizer
    whose ChatML template writes its own special tokens (<|im_start|>, <|im_end|> = EOS), and a LoRA adapter
    with non-zero B (it changes the replies)."""
    import mindspore as ms
    from mindspore import Tensor

    from mindport import AutoConfig, AutoModelForCausalLM
    from mindport.config import LoraConfig
    from mindport.models.lora import apply_lora, save_adapter
    from mindport.tokenizer import Tokenizer
    from mindport.train.checkpoint import write_safetensors
    from testkit.tokenizers import DIRS, build, with_chat_template
    from mindport.models.registry import family

    kind, specials, config = DIRS["qwen_moe"]
    model_dir = with_chat_template(build(kind, os.path.join(root, "tiny-chat")), family("qwen_moe").chat_template,
                                   specials, **config)
    ms.set_seed(0)
    context = 160
    model = AutoModelForCausalLM.from_config(AutoConfig.from_preset(
        "telechat2-tiny-gqa", vocab_size=Tokenizer.load(model_dir).vocab_size, max_position_embeddings=context,
        training_seqlen=context, base_seqlen=context))
    model.config.save(os.path.join(model_dir, "config.json"))
    write_safetensors(os.path.join(model_dir, "model.safetensors"),
                      {n: p.asnumpy() for n, p in model.parameters_and_names()})
    adapted = AutoModelForCausalLM.from_pretrained(model_dir)
    apply_lora(adapted, LoraConfig(lora_rank=4, lora_alpha=8.0, target_modules=["query", "dense"]))
    rng = np.random.default_rng(0)
    for _, p in adapted.parameters_and_names():
        if p.requires_grad:  # B starts at zero: make the adapter matter
            p.set_data(Tensor(p.asnumpy() + 0.5 * rng.standard_normal(p.shape).astype(np.float32)))
    adapter_dir = os.path.join(root, "adapter")
    save_adapter(adapted, adapter_dir)
    return model_dir, adapter_dir


class ServeProcess:
    """``mindport serve ARGS`` on a free port; ``url`` once ``/health`` answers."""

    def __init__(self, args: list[str], log_path: str, startup: float = 240.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        mindport = os.path.join(os.path.dirname(sys.executable), "mindport")
        self.proc = subprocess.Popen([mindport, "serve", *args, "--port", str(self.port)], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=dict(os.environ, GLOG_v="3"))
        deadline = time.monotonic() + startup
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"mindport serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2).read()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"mindport serve did not answer in {startup:.0f} s:\n{self.output()}")
                time.sleep(0.3)

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return f.read()[-4000:]

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()


def request(url: str, path: str, body: bytes | dict | None = None, timeout: float = 120.0) -> tuple[int, dict | str]:
    """(status, JSON or text) of a GET (no body) or a POST of raw bytes or a JSON object."""
    import json

    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def metrics(url: str) -> dict:
    """``GET /metrics`` as {(sample name, sorted label items): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = request(url, "/metrics")
    assert status == 200, text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def answers(url: str, endpoint: str, status: int) -> float:
    """How many answers of ``status`` to ``endpoint`` ``/metrics`` counts."""
    return metrics(url).get(("mindport_requests_total", (("endpoint", endpoint), ("status", str(status)))), 0)


def open_stream(url: str, path: str, body: dict):
    """A POST left open after its response headers: ``(connection, response)``; close the connection to leave."""
    import http.client
    import json
    from urllib.parse import urlparse

    address = urlparse(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return connection, connection.getresponse()
