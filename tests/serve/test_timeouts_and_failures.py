"""``--timeout`` and failures inside the engine or a route, through the real ``openai`` client against a
real uvicorn server running the app in this process (so that a test can slow the engine's steps down
or make them fail).
"""
from __future__ import annotations

import threading
import time

import openai
import pytest

from testkit.launch import free_port
from testkit.serving import answers

USER = [{"role": "user", "content": "Hello world"}]

TIMEOUT = 1.0  # seconds: less than compiling the first request's graphs takes


@pytest.fixture(scope="module")
def live(chat_dirs):
    """(url, the app's Server) of a one-model server with ``--timeout 1``."""
    import uvicorn

    from mindport import AutoModelForCausalLM
    from mindport.infer.engine import Engine
    from mindport.serve.app import Server, build_app
    from mindport.tokenizer import Tokenizer

    model = AutoModelForCausalLM.from_pretrained(chat_dirs[0])
    server = Server(Engine({"m": model}, max_batch=2, max_queue=2), Tokenizer.load(chat_dirs[0],
                    family=model.config.family), ["m"], model.config.max_position_embeddings, timeout=TIMEOUT)
    port = free_port()
    http = uvicorn.Server(uvicorn.Config(build_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    while not http.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", server
    http.should_exit = True
    thread.join(60)


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_compiling_the_first_requests_graphs_does_not_count_against_its_timeout(client):
    reply = client.completions.create(model="m", prompt="Hi", max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason == "length"


def test_a_request_over_its_time_ends_with_408_and_frees_its_slot(live, client, monkeypatch):
    url, server = live
    engine, step = server.engine, server.engine._execute
    generated = engine.stats()["generated_tokens"]
    monkeypatch.setattr(engine, "_execute", lambda plan: (time.sleep(0.02), step(plan))[1])  # >= 3 s for 150 tokens
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model="m", prompt="Hi", max_tokens=150, temperature=0)
    assert err.value.status_code == 408 and err.value.body["type"] == "timeout_error"
    assert err.value.body["message"] == "the request timed out", err.value.body
    assert time.monotonic() - started >= TIMEOUT
    stats = engine.stats()  # 20 ms a step: about 50 tokens in the second
    assert (stats["running"], stats["waiting"]) == (0, 0) and stats["generated_tokens"] - generated < 100, stats
    stream = client.completions.create(model="m", prompt="Hi", max_tokens=150, temperature=0, stream=True)
    with pytest.raises(openai.APIError, match="the request timed out"):  # an error event ends the stream
        list(stream)
    monkeypatch.undo()
    assert client.completions.create(model="m", prompt="Hi", max_tokens=3).choices[0].finish_reason == "length"
    assert answers(url, "/v1/completions", 408) == 1


def test_failures_inside_the_engine_or_a_route_are_500s_counted_and_the_server_lives_on(live, client,
                                                                                        monkeypatch):
    url, server = live

    def failing(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(server.engine, "_execute", failing)
    with pytest.raises(openai.InternalServerError, match="generation failed: RuntimeError: injected failure"):
        client.chat.completions.create(model="m", messages=USER, max_tokens=4)
    monkeypatch.undo()
    monkeypatch.setattr(server.tokenizer, "apply_chat_template", failing)  # a bug in a route
    with pytest.raises(openai.InternalServerError, match="internal error: RuntimeError: injected failure"):
        client.chat.completions.create(model="m", messages=USER, max_tokens=4)
    monkeypatch.undo()
    assert client.completions.create(model="m", prompt="Hi", max_tokens=2).choices[0].finish_reason == "length"
    assert answers(url, "/v1/chat/completions", 500) == 2
