"""``mindport serve`` through the real ``openai`` client: chat, streaming, completions, adapters, stop
strings, concurrency, bad requests and unimplemented fields, a full queue, disconnects and metrics.

Greedy replies are checked against the model's own ``generate`` on transformers' prompt ids, decoded
by transformers' tokenizer.
"""
from __future__ import annotations

import concurrent.futures
import json
import time

import openai
import pytest

from testkit.serving import answers, metrics, open_stream, request

USER = [{"role": "user", "content": "Hello world"}]
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"},
                {"role": "assistant", "content": "the quick fox"}, {"role": "user", "content": "你好 again"}]


@pytest.fixture(scope="module")
def reference(chat_dirs):
    """``reply(messages, max_tokens, adapter=None) -> (text, finish_reason)``: greedy ``generate`` of the
    model on transformers' chat-template ids, stopping at EOS (<|im_end|>), decoded by transformers."""
    from transformers import AutoTokenizer

    from mindport import AutoModelForCausalLM

    model_dir, adapter_dir = chat_dirs
    theirs = AutoTokenizer.from_pretrained(model_dir)
    models = {None: AutoModelForCausalLM.from_pretrained(model_dir),
              "tuned": AutoModelForCausalLM.from_pretrained(model_dir, adapter=adapter_dir)}

    def reply(messages, max_tokens, adapter=None):
        ids = theirs.apply_chat_template(messages, add_generation_prompt=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        out = [int(t) for t in models[adapter].generate([ids], max_tokens, eos_token_id=theirs.eos_token_id)[0]]
        new = out[len(ids):]
        stopped = theirs.eos_token_id in new
        new = new[:new.index(theirs.eos_token_id)] if stopped else new
        return theirs.decode(new, skip_special_tokens=True), "stop" if stopped else "length", len(ids)

    return reply


def _chat(client, messages, max_tokens, model="tiny-chat", **kw):
    return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0, **kw)


def _streamed(client, messages, max_tokens, model="tiny-chat", **kw):
    """(text, finish_reason, usage) of a streamed chat reply."""
    chunks = list(_chat(client, messages, max_tokens, model, stream=True, stream_options={"include_usage": True},
                        **kw))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    return text, chunks[-2].choices[0].finish_reason, chunks[-1].usage


def test_models_lists_the_base_and_its_adapter(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-chat", "tuned"]


@pytest.mark.parametrize("messages", [USER, CONVERSATION], ids=["one_turn", "with_history"])
def test_chat_reply_is_the_models_greedy_reply_streamed_or_not(client, reference, messages):
    text, finish, prompt_tokens = reference(messages, 12)
    whole = _chat(client, messages, 12)
    assert whole.choices[0].message.content == text and whole.choices[0].finish_reason == finish
    assert whole.usage.prompt_tokens == prompt_tokens and whole.object == "chat.completion"
    streamed, streamed_finish, usage = _streamed(client, messages, 12)
    assert (streamed, streamed_finish) == (text, finish)
    assert usage.model_dump() == whole.usage.model_dump()


def test_adapter_by_name(client, reference):
    text, finish, _ = reference(USER, 12, adapter="tuned")
    tuned = _chat(client, USER, 12, model="tuned")
    assert (tuned.choices[0].message.content, tuned.choices[0].finish_reason) == (text, finish)
    assert tuned.model == "tuned" and text != reference(USER, 12)[0]  # the adapter changes the reply


def test_completions_streamed_or_not(client, chat_dirs):
    from transformers import AutoTokenizer

    prompt = "The quick brown fox"
    whole = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=10, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == len(AutoTokenizer.from_pretrained(chat_dirs[0])(prompt).input_ids)
    chunks = list(client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    seeded = [client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=10, temperature=1.0,
                                        top_p=0.9, seed=7).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]  # same seed, same sample


def test_stop_string_cuts_the_reply_streamed_or_not(client):
    full = _chat(client, USER, 16).choices[0].message.content
    stop = next(full[i:i + 2] for i in range(3, len(full) - 1) if full[i:i + 2].strip())
    expected = full[:full.index(stop)]
    cut = _chat(client, USER, 16, stop=[stop, "never appears"])
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == (expected, "stop")
    assert cut.usage.completion_tokens < 16
    assert _streamed(client, USER, 16, stop=stop)[:2] == (expected, "stop")


def test_concurrent_greedy_requests_equal_one_at_a_time(client):
    requests = [([{"role": "user", "content": f"Request {i}: " + "the fox " * (i % 4)}], 4 + 3 * (i % 5))
                for i in range(8)]
    alone = [_chat(client, m, n).choices[0].message.content for m, n in requests]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: _chat(client, *r).choices[0].message.content, requests))
    assert together == alone


BAD_CHAT = {  # name -> (body, status, words in the message)
    "no messages": ({"model": "tiny-chat"}, 400, "'messages'"),
    "empty messages": ({"model": "tiny-chat", "messages": []}, 400, "'messages'"),
    "messages not a list": ({"model": "tiny-chat", "messages": "hi"}, 400, "'messages'"),
    "message without role": ({"model": "tiny-chat", "messages": [{"content": "hi"}]}, 400, "'messages.0.role'"),
    "unknown model": ({"model": "gpt-4", "messages": USER}, 404, "model 'gpt-4'"),
    "n = 2": ({"model": "tiny-chat", "messages": USER, "n": 2}, 400, "'n' = 2: not supported by mindport serve"),
    "unknown role": ({"model": "tiny-chat", "messages": [{"role": "robot", "content": "hi"}]}, 400,
                     "'messages.0.role' = \"robot\": expected system, user or assistant"),
    "tool message": ({"model": "tiny-chat", "messages": [*USER, {"role": "tool", "content": "42"}]}, 400,
                     "'messages.1.role' = \"tool\""),
    "null content": ({"model": "tiny-chat", "messages": [{"role": "user", "content": None}]}, 400,
                     "'messages.0.content' = null: expected a string or a list of text parts"),
    "image part": ({"model": "tiny-chat", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 400,
        'part 1 is of type "image_url": expected a string or a list of text parts'),
    "negative temperature": ({"model": "tiny-chat", "messages": USER, "temperature": -1}, 400, "'temperature'"),
    "absurd temperature": ({"model": "tiny-chat", "messages": USER, "temperature": 1e9}, 400, "'temperature'"),
    "top_p 0": ({"model": "tiny-chat", "messages": USER, "top_p": 0}, 400, "'top_p'"),
    "negative max_tokens": ({"model": "tiny-chat", "messages": USER, "max_tokens": -5}, 400, "'max_tokens'"),
    "max_tokens beyond the context": ({"model": "tiny-chat", "messages": USER, "max_tokens": 10**9}, 400,
                                      "the context is 160 tokens"),
    "prompt beyond the context": ({"model": "tiny-chat", "messages": [{"role": "user", "content": "fox " * 400}]},
                                  400, "the context is 160 tokens"),
    "negative seed": ({"model": "tiny-chat", "messages": USER, "seed": -1}, 400, "'seed'"),
    "five stop strings": ({"model": "tiny-chat", "messages": USER, "stop": list("abcde")}, 400, "'stop'"),
    "string max_tokens": ({"model": "tiny-chat", "messages": USER, "max_tokens": "many"}, 400, "'max_tokens'"),
}


UNSUPPORTED = [  # (path, field, a value asking for something mindport does not do)
    ("/v1/chat/completions", "logprobs", True), ("/v1/chat/completions", "top_logprobs", 2),
    ("/v1/chat/completions", "presence_penalty", 0.5), ("/v1/chat/completions", "frequency_penalty", -1),
    ("/v1/chat/completions", "logit_bias", {"5": 100}),
    ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("/v1/chat/completions", "tool_choice", "required"), ("/v1/chat/completions", "functions", [{"name": "f"}]),
    ("/v1/chat/completions", "function_call", "auto"),
    ("/v1/chat/completions", "response_format", {"type": "json_object"}),
    ("/v1/completions", "logprobs", 0), ("/v1/completions", "echo", True), ("/v1/completions", "best_of", 3),
    ("/v1/completions", "suffix", "end"), ("/v1/completions", "n", 2),
]


def test_unimplemented_openai_fields_are_refused_naming_the_field(server):
    for path, field, value in UNSUPPORTED:
        body = {"model": "tiny-chat", "messages": USER, "prompt": "Hi", field: value}
        status, answer = request(server.url, path, body)
        error = answer["error"]
        assert (status, error["param"], error["code"]) == (400, field, "unsupported_value"), (path, answer)
        assert error["message"].startswith(f"'{field}' = {json.dumps(value)}: not supported by mindport serve: "
                                           f"expected "), error


def test_default_values_of_unimplemented_fields_developer_role_and_text_parts_pass(server, client):
    """What asks for nothing passes: the reply equals the plain request's; unknown fields are ignored and
    named in the server's log."""
    plain = _chat(client, [{"role": "system", "content": "Be brief."}, *USER], 8).choices[0].message.content
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": " world"}]
    defaults = _chat(client, [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}], 8,
                     n=1, logprobs=False, presence_penalty=0, frequency_penalty=0, logit_bias={}, tools=[],
                     tool_choice="none", response_format={"type": "text"}, user="someone",
                     extra_body={"not_an_openai_field": 1})
    assert defaults.choices[0].message.content == plain
    assert "fields that mindport serve does not know, ignored: not_an_openai_field, user" in server.output()


def test_unknown_routes_and_methods_answer_openai_errors(server):
    status, answer = request(server.url, "/v1/nope", {"model": "tiny-chat"})
    assert status == 404 and answer["error"]["message"] == "POST /v1/nope: Not Found", answer
    status, answer = request(server.url, "/v1/chat/completions")  # a GET
    assert status == 405 and answer["error"]["message"] == "GET /v1/chat/completions: Method Not Allowed " \
        "(allowed: POST)", answer
    assert answer["error"]["type"] == "invalid_request_error"


def test_a_volley_of_bad_requests_gets_openai_errors_and_the_server_lives_on(server, client):
    for body, expected in ((b"{not json", "not valid JSON"), (b"[1, 2]", "expected an object"),
                           (b"\xff\xfe", "not valid JSON")):
        status, answer = request(server.url, "/v1/chat/completions", body)
        assert status == 400 and expected in answer["error"]["message"], answer
    for name, (body, expected_status, words) in BAD_CHAT.items():
        status, answer = request(server.url, "/v1/chat/completions", body)
        error = answer["error"]
        assert (status, error["type"]) == (expected_status, "invalid_request_error"), (name, answer)
        assert words in error["message"], (name, error)
    status, answer = request(server.url, "/v1/completions", {"model": "tiny-chat", "prompt": ["a", "b"]})
    assert status == 400 and "one prompt per request" in answer["error"]["message"]
    status, answer = request(server.url, "/v1/completions", {"model": "tiny-chat", "prompt": [10**6]})
    assert status == 400, answer  # a token id outside the vocabulary
    status, answer = request(server.url, "/v1/completions", {"model": "tiny-chat", "prompt": [-1]})
    assert status == 400 and "token id -1" in answer["error"]["message"], answer
    lone_surrogate = b'"\\ud800"'  # JSON's escape of half a UTF-16 pair: no Unicode text
    for path, field, end in (("/v1/completions", b'"prompt": ', b"}"),
                             ("/v1/chat/completions", b'"messages": [{"role": "user", "content": ', b"}]}")):
        body = b'{"model": "tiny-chat", ' + field + lone_surrogate + end
        status, answer = request(server.url, path, body)
        assert status == 400 and "lone surrogate" in answer["error"]["message"], (path, answer)
    with pytest.raises(openai.NotFoundError) as err:
        _chat(client, USER, 4, model="nope")
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        _chat(client, USER, 10**6)
    assert _chat(client, USER, 4).choices[0].finish_reason in ("stop", "length")  # still serving


def test_full_queue_answers_429_and_disconnected_streams_free_their_slots(server):
    body = {"model": "tiny-chat", "prompt": "Hi", "max_tokens": 150, "temperature": 0, "stream": True}
    generated_before = request(server.url, "/health")[1]["generated_tokens"]
    streams, refused = [], None
    for _ in range(40):  # open streams until the batch and the queue are full
        connection, response = open_stream(server.url, "/v1/completions", body)
        if response.status != 200:
            refused = (response.status, json.loads(response.read()))
            connection.close()
            break
        streams.append(connection)
    assert refused is not None and refused[0] == 429, "the queue never filled"
    assert refused[1]["error"]["type"] == "rate_limit_error"
    assert answers(server.url, "/v1/completions", 429) >= 1
    assert len(streams) >= 8  # --max-queue 8: at least that many were accepted
    for connection in streams:  # every client goes away mid-stream
        connection.close()
    deadline = time.monotonic() + 30
    while (stats := request(server.url, "/health")[1])["running"] + stats["waiting"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stats["running"] == stats["waiting"] == 0, stats
    generated = stats["generated_tokens"] - generated_before
    assert generated < 150 * len(streams) / 2, generated  # the requests were cancelled, not run to their end


def test_a_client_leaving_a_request_that_is_not_streamed_cancels_it(server):
    import http.client

    generated_before = request(server.url, "/health")[1]["generated_tokens"]
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/completions", json.dumps({"model": "tiny-chat", "prompt": "Hi", "max_tokens": 150,
                                                               "temperature": 0}), {"Content-Type": "application/json"})
    deadline = time.monotonic() + 30
    while request(server.url, "/health")[1]["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    connection.close()  # the client goes away without reading its answer
    while (stats := request(server.url, "/health")[1])["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats["generated_tokens"] - generated_before < 150, stats  # cancelled, not run to its end
    assert metrics(server.url)[("mindport_requests_finished_total", (("finish_reason", "disconnected"),))] >= 1
    assert answers(server.url, "/v1/completions", 499) >= 1


def test_metrics_are_prometheus_text_and_count_every_answer(server, client):
    _chat(client, USER, 6)
    request(server.url, "/v1/chat/completions", {"model": "tiny-chat"})
    request(server.url, "/v1/chat/completions")
    request(server.url, "/nowhere")
    for endpoint, status in (("/v1/chat/completions", 200), ("/v1/chat/completions", 400),
                             ("/v1/chat/completions", 405), ("other", 404), ("/health", 200)):
        assert answers(server.url, endpoint, status) >= 1, (endpoint, status)
    samples = metrics(server.url)
    assert samples[("mindport_time_to_first_token_seconds_count", ())] >= 1
    assert samples[("mindport_time_per_output_token_seconds_count", ())] >= 5
    assert samples[("mindport_generation_tokens_total", ())] >= 6
    for gauge in ("mindport_num_requests_running", "mindport_num_requests_waiting",
                  "mindport_generation_tokens_per_second"):
        assert (gauge, ()) in samples
