"""Supervised fine-tuning data: conversation records -> samples with per-token labels and segments.

Record formats (one JSON object per line of a ``.jsonl`` file, or a ``.json`` file holding a list):

- ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``, or
  ShareGPT's ``{"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}``.
- ``alpaca``: ``{"instruction", "input"?, "output", "system"?, "history"?: [[question, answer], ...]}``;
  the user turn is the instruction, then a newline and the input when there is one.

Each record is one conversation, rendered by the tokenizer's chat template and tokenized as
transformers' ``apply_chat_template(messages, tokenize=True)`` tokenizes it. Its labels are
``IGNORE_INDEX`` except on the assistant turns: each turn's text and the end-of-turn text the
template writes after it (``<_end>\\n``, ``<|im_end|>\\n``, ``</s>``), every turn of a multi-turn
record. Where the template marks assistant text with ``{% generation %}`` the mask is transformers'
``return_assistant_tokens_mask``; otherwise turn k spans the characters between
``render(messages[:k], add_generation_prompt=True)`` and ``render(messages[:k+1])``, both of which
must be prefixes of the whole render. Either way characters become tokens by the offsets of the
whole render's tokens (a token overlapping a span is an assistant token), so the ids are exactly
the whole render's.

A conversation longer than ``seq_length`` is cut after its last assistant turn that fits
(``overflow="truncate"``; when even the first does not fit the record is dropped) or dropped
(``overflow="drop"``). Conversations are padded one per sample, or with ``pack`` several per sample
(greedy, in order, none split); the files are those of :mod:`mindport.train.data`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from mindport.chat_template import ROLES, token_mask
from mindport.constants import IGNORE_INDEX
from mindport.tokenizer import TokenizerError
from mindport.train.data import (FORMAT, LABELS_FILE, SEGMENTS_FILE, TOKENS_FILE, DataError, token_dtype,
                                 write_index)

RECORD_FORMATS = ("chat", "alpaca")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
OVERFLOW = ("truncate", "drop")

Messages = list[dict[str, str]]


# ---------------------------------------------------------------------------------------------- reading
def read_records(paths: Sequence[str], record_format: str) -> Iterator[tuple[str, Messages]]:
    """(where, messages) for every record of ``paths``; ``where`` is ``FILE:LINE`` (``FILE:#N`` for
    the N-th record of a .json list). A bad record fails naming where it is and the field."""
    if record_format not in RECORD_FORMATS:
        raise DataError(f"--format {record_format!r}: expected one of text, {', '.join(RECORD_FORMATS)}")
    to_messages = chat_messages if record_format == "chat" else alpaca_messages
    for path in paths:
        count = 0
        for where, record in _json_records(path):
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            count += 1
            yield where, check_messages(to_messages(record, where), where)
        if count == 0:
            raise DataError(f"{path}: empty (no records): expected one {record_format} record per line")


def _json_records(path: str) -> Iterator[tuple[str, object]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such input file")
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{path}:{n}", json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}:{n}: not valid JSON ({err.msg})") from None
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        for n, record in enumerate(records, 1):
            yield f"{path}:#{n}", record
    else:
        raise DataError(f"{path}: unsupported input (expected .jsonl or .json)")


def chat_messages(record: dict, where: str) -> Messages:
    """``messages`` as given, or ShareGPT ``conversations`` mapped to roles."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: key 'messages': expected a non-empty list of {{\"role\", \"content\"}}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise DataError(f"{where}: messages[{i}]: expected an object with 'role' and 'content'")
        return [{"role": m.get("role"), "content": m.get("content"), "field": f"messages[{i}]"}
                for i, m in enumerate(messages)]
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: key 'conversations': expected a non-empty list of {{\"from\", \"value\"}}")
        out = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict):
                raise DataError(f"{where}: conversations[{i}]: expected an object with 'from' and 'value'")
            speaker = t.get("from")
            if speaker not in SHAREGPT_ROLES:
                raise DataError(f"{where}: conversations[{i}].from = {speaker!r}: expected one of "
                                f"{', '.join(SHAREGPT_ROLES)}")
            out.append({"role": SHAREGPT_ROLES[speaker], "content": t.get("value"), "field": f"conversations[{i}]"})
        return out
    raise DataError(f"{where}: key 'messages' missing: expected {{\"messages\": [{{\"role\", \"content\"}}, ...]}} "
                    "or ShareGPT {\"conversations\": [{\"from\", \"value\"}, ...]}")


def alpaca_messages(record: dict, where: str) -> Messages:
    """system?, history pairs, then instruction (+ newline + input) -> output."""
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str):
            raise DataError(f"{where}: key '{key}' missing or not a string: expected an alpaca record "
                            "{\"instruction\", \"input\", \"output\"}")
    for key in ("input", "system"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise DataError(f"{where}: key '{key}' = {record[key]!r}: expected a string")
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError(f"{where}: key 'history': expected a list of [question, answer] pairs")
    messages = [{"role": "system", "content": record["system"], "field": "system"}] if record.get("system") else []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"{where}: history[{i}]: expected a [question, answer] pair of strings")
        messages += [{"role": "user", "content": pair[0], "field": f"history[{i}][0]"},
                     {"role": "assistant", "content": pair[1], "field": f"history[{i}][1]"}]
    prompt = record["instruction"] + (f"\n{record['input']}" if record.get("input") else "")
    return messages + [{"role": "user", "content": prompt, "field": "instruction"},
                       {"role": "assistant", "content": record["output"], "field": "output"}]


def check_messages(messages: list[dict], where: str) -> Messages:
    """Roles known, contents strings, system only first, at least one non-empty assistant turn;
    returns plain {role, content} messages."""
    for i, m in enumerate(messages):
        field = m["field"]
        if not isinstance(m["role"], str):
            raise DataError(f"{where}: {field}.role = {m['role']!r}: expected a string")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {field}.role = {m['role']!r}: expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: {field} content = {m['content']!r}: expected a string")
        if m["role"] == "system" and i > 0:
            raise DataError(f"{where}: {field} is a system message: expected it first")
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: {field}: empty assistant content")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message: expected at least one reply to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# ---------------------------------------------------------------------------------------------- encoding
@dataclass
class Conversation:
    """One rendered record: ids and labels (n,), and the token count up to the end of each assistant turn."""
    ids: list[int]
    labels: list[int]
    turn_ends: list[int]

    def cut(self, length: int) -> "Conversation | None":
        """The conversation through its last assistant turn within ``length`` tokens; None if none fits."""
        ends = [e for e in self.turn_ends if e <= length]
        if not ends:
            return None
        return Conversation(self.ids[:ends[-1]], self.labels[:ends[-1]], ends)


def assistant_spans(tokenizer, messages: Messages, where: str) -> tuple[str, list[tuple[int, int]]]:
    """(whole render, character spans of the assistant turns), see the module docstring."""
    text, spans = tokenizer.render_chat(messages)
    if tokenizer.has_generation_blocks():
        return text, spans
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, _ = tokenizer.render_chat(messages[:k], add_generation_prompt=True)
        after, _ = tokenizer.render_chat(messages[:k + 1])
        if not (text.startswith(after) and after.startswith(before)):
            raise DataError(f"{where}: the chat template ({tokenizer.chat_template_source}) does not render message {k} "
                            "as a continuation of the messages before it: mark the assistant text with "
                            "{% generation %} ... {% endgeneration %}")
        spans.append((len(before), len(after)))
    return text, spans


def encode_conversation(tokenizer, messages: Messages, train_on_prompt: bool = False,
                        where: str = "record") -> Conversation:
    try:
        text, spans = assistant_spans(tokenizer, messages, where)
    except TokenizerError as err:  # the template refused the record (raise_exception): say which record
        raise DataError(f"{where}: {err}") from None
    ids, offsets = tokenizer.encode_with_offsets(text)
    mask = token_mask(offsets, spans)
    labels = list(ids) if train_on_prompt else [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]
    turn_ends = [sum(1 for start, _ in offsets if start < end) for _, end in spans]
    return Conversation(ids, labels, [e for e in turn_ends if e > 0])


# ---------------------------------------------------------------------------------------------- writing
def prepare_sft(records: Iterable[tuple[str, Messages]], tokenizer, out_dir: str, seq_length: int,
                pack: bool = False, overflow: str = "truncate", train_on_prompt: bool = False,
                overwrite: bool = True, source: str = "input", record_format: str = "chat") -> dict:
    """Encode ``records`` ((where, messages) pairs), fit them to ``seq_length``, pad or pack them into
    samples, write tokens.bin / labels.bin / segments.bin / index.json / tokenizer/; returns the index."""
    from mindport.checkpoint.shards import StagingDir

    if seq_length < 2:
        raise DataError(f"seq_length = {seq_length}: expected at least 2")
    if overflow not in OVERFLOW:
        raise DataError(f"--overflow {overflow!r}: expected one of {', '.join(OVERFLOW)}")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    if pad_id is None:
        raise DataError(f"{tokenizer.source}: tokenizer has no pad or EOS token to pad samples with")
    dtype = token_dtype(tokenizer.vocab_size)
    counts = dict(num_records=0, num_conversations=0, truncated_records=0, dropped_records=0, num_tokens=0,
                  num_supervised_tokens=0, num_samples=0)
    with StagingDir(out_dir, overwrite) as tmp:
        files = {name: open(os.path.join(tmp, name), "wb") for name in (TOKENS_FILE, LABELS_FILE, SEGMENTS_FILE)}
        sample: list[Conversation] = []

        def flush() -> None:
            if not sample:
                return
            ids = np.full(seq_length, pad_id, dtype)
            labels = np.full(seq_length, IGNORE_INDEX, np.int32)
            segments = np.zeros(seq_length, np.uint16)
            start = 0
            for k, conv in enumerate(sample, 1):
                end = start + len(conv.ids)
                ids[start:end], labels[start:end], segments[start:end] = conv.ids, conv.labels, k
                start = end
            for name, arr in ((TOKENS_FILE, ids), (LABELS_FILE, labels), (SEGMENTS_FILE, segments)):
                files[name].write(arr.tobytes())
            counts["num_samples"] += 1
            sample.clear()

        try:
            for where, messages in records:
                counts["num_records"] += 1
                conv = encode_conversation(tokenizer, messages, train_on_prompt, where)
                if len(conv.ids) > seq_length:
                    conv = conv.cut(seq_length) if overflow == "truncate" else None
                    counts["truncated_records" if conv is not None else "dropped_records"] += 1
                    if conv is None:
                        continue
                if not pack or sum(len(c.ids) for c in sample) + len(conv.ids) > seq_length:
                    flush()
                sample.append(conv)
                counts["num_conversations"] += 1
                counts["num_tokens"] += len(conv.ids)
                counts["num_supervised_tokens"] += sum(1 for x in conv.labels if x != IGNORE_INDEX)
            flush()
        finally:
            for f in files.values():
                f.flush()
                os.fsync(f.fileno())
                f.close()
        if counts["num_samples"] == 0:
            raise DataError(f"{source}: {counts['num_records']} records, none fits seq_length = {seq_length} "
                            f"({counts['dropped_records']} dropped)")
        index = {"format": FORMAT, "seq_length": seq_length, "num_samples": counts.pop("num_samples"),
                 "dtype": np.dtype(dtype).name, "labels": True, "segments": True, "input_format": record_format,
                 "packed": pack, "overflow": overflow, "train_on_prompt": train_on_prompt, **counts,
                 "pad_token_id": pad_id, "vocab_size": tokenizer.vocab_size, "eos_token_id": tokenizer.eos_id,
                 "chat_template": tokenizer.chat_template_source, "tokenizer": os.path.abspath(tokenizer.source)}
        write_index(tmp, index, tokenizer)
    return index
