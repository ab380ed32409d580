"""OpenAI request bodies and error JSON (the fields of OpenAI's API reference that mindport serves).

Every bad request becomes an :class:`APIError`, answered as
``{"error": {"message", "type", "param", "code"}}`` with its HTTP status, as OpenAI answers.
Fields of OpenAI's API that mindport does not implement are ignored, as OpenAI ignores unknown ones.
"""
from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 4  # OpenAI's limit


class APIError(Exception):
    """An error answered as OpenAI's error JSON with HTTP ``status``."""

    TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 408: "timeout_error",
             429: "rate_limit_error", 500: "server_error", 503: "service_unavailable_error"}

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

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n = 1 is supported")
        return n

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


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


def unicode_text(text: str) -> str:
    """``text`` if it can be encoded (JSON's \\ud800 escapes decode to lone surrogates, which cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"character {err.start}: a lone surrogate, not valid Unicode text") from None
    return text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[ContentPart] | None = None

    @field_validator("content")
    @classmethod
    def _unicode(cls, content):
        for text in [content] if isinstance(content, str) else [p.text for p in content or ()]:
            unicode_text(text)
        return content

    def as_template_message(self) -> dict:
        """``{"role", "content"}`` with the text parts joined, as a chat template reads a message."""
        text = self.content if not isinstance(self.content, list) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text or ""}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
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


def parse(body: bytes, model: type[BaseModel]) -> BaseModel:
    """The request of ``body``, or an :class:`APIError` (400) naming the first bad field."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"request body: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body: a JSON {type(data).__name__}: expected an object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        value = f" = {json.dumps(first['input'])[:80]}" if first["type"] != "missing" else ""
        message = first["msg"].removeprefix("Value error, ")
        raise APIError(400, f"'{param}'{value}: {message}", param=param) from None
