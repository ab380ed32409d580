"""OpenAI request bodies and error JSON (the fields of OpenAI's API reference that mindport serves).

Every bad request becomes an :class:`APIError`, answered as
``{"error": {"message", "type", "param", "code"}}`` with its HTTP status, as OpenAI answers.
A field of OpenAI's API that mindport does not implement (``UNSUPPORTED``: log probabilities,
penalties, tools, ...) is refused unless its value asks for nothing, so that no request silently gets
other semantics than it asked for; fields OpenAI does not define are ignored and named in a warning
in the server's log, as vLLM does.
"""
from __future__ import annotations

import json
import logging
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mindport.chat_template import ROLES

MAX_STOP_STRINGS = 4  # OpenAI's limit
TEXT_PARTS = 'a string or a list of text parts [{"type": "text", "text": ...}]'
logger = logging.getLogger("mindport.serve")


class APIError(Exception):
    """An error answered as OpenAI's error JSON with HTTP ``status``."""

    TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
             408: "timeout_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """The fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")
    # OpenAI's fields that mindport does not implement: name -> (values that ask for nothing, what is supported)
    UNSUPPORTED: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        "n": ((None, 1), "1 (one choice per request)"),
        "presence_penalty": ((None, 0), "0 (no penalties)"),
        "frequency_penalty": ((None, 0), "0 (no penalties)"),
        "logit_bias": ((None, {}), "{} (no logit bias)"),
    }

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"expected at most {MAX_STOP_STRINGS} non-empty strings")
        return stops

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def unicode_text(text: str) -> str:
    """``text`` if it can be encoded (JSON's \\ud800 escapes decode to lone surrogates, which cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"character {err.start}: a lone surrogate, not valid Unicode text") from None
    return text


class ChatMessage(BaseModel):
    """A message as a chat template reads it: OpenAI's text content parts are joined into ``content``."""

    model_config = ConfigDict(extra="ignore")

    role: Literal[ROLES]
    content: str

    @field_validator("role", mode="before")
    @classmethod
    def _known_role(cls, role):
        if role == "developer":  # OpenAI's newer name for the system message
            return "system"
        if role not in ROLES:
            raise ValueError("expected system, user or assistant (developer is read as system; tool messages "
                             "answer tool calls, which mindport serve does not make)")
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, content):
        if isinstance(content, list):
            for i, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"part {i} is {f'of type {json.dumps(kind)}' if kind else 'not a content part'}: "
                                     f"expected {TEXT_PARTS} (this model reads text only)")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"part {i}: 'text' missing or not a string: expected {TEXT_PARTS}")
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise ValueError(f"expected {TEXT_PARTS}")
        return unicode_text(content)

    def as_template_message(self) -> dict:
        return {"role": self.role, "content": self.content}


class ChatCompletionRequest(_Sampling):
    UNSUPPORTED = {**_Sampling.UNSUPPORTED,
                   "logprobs": ((None, False), "false (no log probabilities)"),
                   "top_logprobs": ((None, 0), "0 (no log probabilities)"),
                   "response_format": ((None, {"type": "text"}), '{"type": "text"} (no JSON mode)'),
                   **{name: ((None, []), "[] (no tool calls)") for name in ("tools", "functions")},
                   **{name: ((None, "none"), '"none" (no tool calls)') for name in ("tool_choice", "function_call")}}

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    UNSUPPORTED = {**_Sampling.UNSUPPORTED,
                   "logprobs": ((None,), "null (no log probabilities)"),
                   "echo": ((None, False), "false (the prompt is not repeated)"),
                   "best_of": ((None, 1), "1 (one sample per request)"),
                   "suffix": ((None, ""), '"" (no insertion)')}

    prompt: str | list[int] | list[str] = Field(min_length=1)
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError(f"{len(prompt)} prompts: one prompt per request is supported")
            prompt = prompt[0]
        if isinstance(prompt, list):
            negative = [i for i in prompt if i < 0]
            if negative:
                raise ValueError(f"token id {negative[0]}: expected ids >= 0")
            return prompt
        return unicode_text(prompt)

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


def parse(body: bytes, model: type[_Sampling]) -> _Sampling:
    """The request of ``body``, or an :class:`APIError` (400) naming the first bad field."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"request body: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body: a JSON {type(data).__name__}: expected an object")
    for name, (accepted, supported) in model.UNSUPPORTED.items():
        if name in data and data[name] not in accepted:
            raise APIError(400, f"'{name}' = {json.dumps(data[name])[:80]}: not supported by mindport serve: "
                                f"expected {supported} or no '{name}'", param=name, code="unsupported_value")
    ignored = sorted(set(data) - set(model.model_fields) - set(model.UNSUPPORTED))
    if ignored:
        logger.warning("request fields that mindport serve does not know, ignored: %s", ", ".join(ignored))
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        value = f" = {json.dumps(first['input'])[:80]}" if first["type"] != "missing" else ""
        message = first["msg"].removeprefix("Value error, ")
        raise APIError(400, f"'{param}'{value}: {message}", param=param) from None
