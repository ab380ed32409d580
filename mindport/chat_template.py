"""Chat templates executed the way transformers executes them.

A template is jinja2 source run in jinja2's ``ImmutableSandboxedEnvironment`` with
``trim_blocks``/``lstrip_blocks`` and the loop-controls extension, given ``messages``,
``add_generation_prompt`` and the tokenizer's special tokens (``bos_token``, ``eos_token``, ...)
as variables, and ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text
as globals/filters. A ``{% generation %}...{% endgeneration %}`` block renders its body and
records the body's character span in the rendered text: transformers' assistant-token mask
marks every token overlapping one of those spans.
"""
from __future__ import annotations

import json
import re
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant")  # the roles of a conversation's messages

Span = tuple[int, int]  # [start, end) character offsets in the rendered text

# While a render is recorded: (pieces rendered so far, spans found so far).
_RECORDING: ContextVar[tuple[list[str], list[Span]] | None] = ContextVar("chat_template_recording", default=None)


class ChatTemplateError(ValueError):
    """A template that does not compile, or that raised while rendering (``raise_exception``)."""


class GenerationBlock(Extension):
    """``{% generation %}body{% endgeneration %}``: renders body, records where it landed."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_record", []), [], [], body).set_lineno(lineno)

    def _record(self, caller) -> str:
        text = caller()
        recording = _RECORDING.get()
        if recording is not None:
            pieces, spans = recording
            start = sum(len(p) for p in pieces)
            spans.append((start, start + len(text)))
        return text


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise ChatTemplateError(f"template syntax error at line {err.lineno}: {err.message}") from None


def render(source: str, messages: list[dict], add_generation_prompt: bool = False,
           **variables) -> tuple[str, list[Span]]:
    """(text, generation spans) of ``messages`` under the template ``source``; ``variables`` are
    the special tokens and any extra template arguments."""
    template = compile_template(source)
    pieces: list[str] = []
    spans: list[Span] = []
    token = _RECORDING.set((pieces, spans))
    try:
        for piece in template.generate(messages=messages, add_generation_prompt=add_generation_prompt, **variables):
            pieces.append(piece)
    except jinja2.exceptions.TemplateError as err:
        raise ChatTemplateError(f"template error: {err.message or type(err).__name__}") from None
    finally:
        _RECORDING.reset(token)
    return "".join(pieces), spans


def has_generation_blocks(source: str) -> bool:
    """Whether the template marks assistant text with ``{% generation %}``."""
    return re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None


def token_mask(offsets: list[Span], spans: list[Span]) -> list[int]:
    """1 for each token whose character offsets overlap one of ``spans`` (both in text order), as
    transformers' ``return_assistant_tokens_mask`` marks them."""
    mask, k = [0] * len(offsets), 0
    for i, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            mask[i] = 1
    return mask
