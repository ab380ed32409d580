"""One tokenizer interface over a sentencepiece ``tokenizer.model`` and an HF ``tokenizer.json``.

A tokenizer directory holds either file, plus an optional ``tokenizer_config.json`` (special
tokens, ``add_bos_token``/``add_eos_token``, ``chat_template``) and ``chat_template.jinja`` (where
transformers 5 saves the template; it wins over the config's). HF ``tokenizer.json`` files are read
with the ``tokenizers`` package when it is installed (it comes with transformers); sentencepiece
is a core dependency.

``encode`` adds special tokens as transformers' ``tokenizer(text).input_ids`` does (transformers 5):
a ``tokenizer.json`` through its own post-processor (e.g. Llama/Mixtral's ``<s> $A``; the config's
add_*_token flags are not consulted), a ``tokenizer.model`` by the config's ``add_bos_token`` /
``add_eos_token`` (default off). :class:`StreamDecoder` turns a growing id sequence into text deltas.

Chat templates are executed as transformers executes them (:mod:`mindport.chat_template`): the
template of ``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template`` (a string,
or named templates of which "default" is used unless one is named), else the default template of
the model family (its published chat model's, ``research/<family>/chat_template.jinja``).
:meth:`Tokenizer.apply_chat_template` returns what transformers' ``apply_chat_template`` returns
for the same directory and messages: the rendered text, or its ids (encoded without added
special tokens; the template writes its own), optionally with the assistant-token mask.
"""
from __future__ import annotations

import io
import json
import os
from typing import Iterable, Sequence

from mindport.chat_template import ChatTemplateError, Span, has_generation_blocks, render, token_mask
from mindport.models.registry import family

SPM_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# tokenizer_config.json keys a template sees as variables (transformers' special_tokens_map)
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

class TokenizerError(ValueError):
    """A tokenizer file, template or input mindport cannot use."""


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise TokenizerError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # HF AddedToken serialisation
        return value.get("content")
    return value


class Tokenizer:
    """``encode(text) -> list[int]``, ``decode(ids) -> str``, special ids and chat formatting."""

    def __init__(self, backend, kind: str, config: dict | None = None, source: str = "",
                 chat_template_file: str | None = None, family: str | None = None):
        self._b = backend
        self.kind = kind  # "sentencepiece" | "hf"
        self.config = config or {}
        self.source = source
        self.chat_template_file = chat_template_file  # chat_template.jinja, when the directory has one
        self.chat_template, self.chat_template_source = self._find_chat_template(family)
        self.bos_id = self._special("bos_token", 1)
        self.eos_id = self._special("eos_token", 2)
        self.pad_id = self._special("pad_token", None)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str, family: str | None = None) -> "Tokenizer":
        """From a directory (tokenizer.model or tokenizer.json inside) or one of those files; ``family``
        names the model family whose default chat template applies when the tokenizer has none."""
        directory, file = (path, None) if os.path.isdir(path) else (os.path.dirname(path) or ".", path)
        if file is None:
            for name in (SPM_FILE, HF_FILE):
                if os.path.isfile(os.path.join(directory, name)):
                    file = os.path.join(directory, name)
                    break
            else:
                raise FileNotFoundError(f"{path}: no {SPM_FILE} or {HF_FILE} in this directory")
        elif not os.path.isfile(file):
            raise FileNotFoundError(f"{path}: no such tokenizer file")
        config_path = os.path.join(directory, CONFIG_FILE)
        config = _read_json(config_path) if os.path.isfile(config_path) else {}
        template_path = os.path.join(directory, CHAT_TEMPLATE_FILE)
        template_file = template_path if os.path.isfile(template_path) else None
        if file.endswith(".json"):
            try:
                from tokenizers import Tokenizer as HFTokenizer
            except ImportError:
                raise TokenizerError(f"{file}: reading tokenizer.json needs the 'tokenizers' package "
                                     "(pip install tokenizers, or mindport[test])") from None
            try:
                backend = HFTokenizer.from_file(file)
            except Exception as err:  # the Rust side raises its own exception type
                raise TokenizerError(f"{file}: not a valid tokenizer.json ({str(err).splitlines()[0]})") from None
            return cls(backend, "hf", config, file, template_file, family)
        import sentencepiece as spm

        backend = spm.SentencePieceProcessor()
        try:
            backend.Load(file)
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"{file}: not a valid sentencepiece model ({str(err).splitlines()[0]})") from None
        return cls(backend, "sentencepiece", config, file, template_file, family)

    def _special(self, key: str, default: int | None) -> int | None:
        text = _token_text(self.config.get(key))
        if text is not None:
            found = self.token_to_id(text)
            if found is not None:
                return found
        if self.kind == "sentencepiece":
            getter = {"bos_token": self._b.bos_id, "eos_token": self._b.eos_id, "pad_token": self._b.pad_id}[key]
            value = getter()
            return value if value >= 0 else default
        return default

    # ------------------------------------------------------------------ core
    @property
    def vocab_size(self) -> int:
        return self._b.get_piece_size() if self.kind == "sentencepiece" else self._b.get_vocab_size()

    @property
    def backend(self):
        """The library object: a ``sentencepiece.SentencePieceProcessor`` or a ``tokenizers.Tokenizer``."""
        return self._b

    def id_to_token(self, i: int) -> str | None:
        """The piece string of id ``i`` (None where an HF vocabulary has a gap)."""
        return self._b.id_to_piece(i) if self.kind == "sentencepiece" else self._b.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        if self.kind == "sentencepiece":
            i = self._b.piece_to_id(token)
            return None if i == self._b.unk_id() and token != self._b.id_to_piece(i) else i
        return self._b.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` those transformers adds (BOS for Llama-style)."""
        return self.encode_batch([text], add_special_tokens)[0]

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        if self.kind == "hf":
            return [list(e.ids) for e in self._b.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        ids = [list(x) for x in self._b.encode(list(texts))]
        if not add_special_tokens:
            return ids
        bos = [self.bos_id] if self.config.get("add_bos_token") and self.bos_id is not None else []
        eos = [self.eos_id] if self.config.get("add_eos_token") and self.eos_id is not None else []
        return [bos + x + eos for x in ids]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[Span]]:
        """Ids of ``text`` without added special tokens, and each token's [start, end) character span
        (a byte-fallback token spans the whole character its bytes belong to)."""
        if self.kind == "hf":
            encoding = self._b.encode(text, add_special_tokens=False)
            return list(encoding.ids), [tuple(o) for o in encoding.offsets]
        pieces = self._b.encode([text], out_type="proto")[0].pieces
        char_at = {}  # UTF-8 byte offset -> character offset
        position = 0
        for i, ch in enumerate(text):
            char_at[position] = i
            position += len(ch.encode("utf-8"))
        char_at[position] = len(text)
        ids, offsets, end = [int(p.id) for p in pieces], [], None
        for p in reversed(pieces):  # pieces of one character's bytes before its last have empty spans
            end = char_at[p.end] if p.end > p.begin or end is None else end
            offsets.append((char_at[p.begin], end))
        return ids, offsets[::-1]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            if skip_special:
                ids = [i for i in ids if not (self._b.is_control(i) or self._b.is_unknown(i))]
            return self._b.decode(ids)
        return self._b.decode(ids, skip_special_tokens=skip_special)

    # ------------------------------------------------------------------ chat
    def _find_chat_template(self, family_name: str | None) -> tuple[str | dict[str, str] | None, str]:
        """(template, the file it came from): chat_template.jinja, tokenizer_config.json, the family default."""
        if self.chat_template_file is not None:
            with open(self.chat_template_file, encoding="utf-8") as f:
                return f.read(), self.chat_template_file
        config_file = os.path.join(os.path.dirname(self.source) or ".", CONFIG_FILE)
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}, ...]
            template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if template:
            return template, config_file
        if family_name is not None:
            fam = family(family_name)
            if fam.chat_template_file is not None:
                return fam.chat_template, fam.chat_template_file
        return None, config_file

    def special_tokens(self) -> dict[str, str]:
        """The special tokens a template sees (``bos_token``, ``eos_token``, ...), from tokenizer_config.json."""
        found = {key: _token_text(self.config.get(key)) for key in SPECIAL_TOKEN_KEYS}
        if self.kind == "sentencepiece":  # the model file's own bos/eos/unk/pad where the config names none
            for key, i in (("bos_token", self._b.bos_id()), ("eos_token", self._b.eos_id()),
                           ("unk_token", self._b.unk_id()), ("pad_token", self._b.pad_id())):
                if found[key] is None and i >= 0:
                    found[key] = self._b.id_to_piece(i)
        found = {k: v for k, v in found.items() if v is not None}
        extra = [_token_text(t) for t in self.config.get("additional_special_tokens") or []]
        return {**found, "additional_special_tokens": extra} if extra else found

    def _template(self, name: str | None) -> str:
        template, origin = self.chat_template, self.chat_template_source
        if template is None:
            raise TokenizerError(f"{origin}: no chat template (no {CHAT_TEMPLATE_FILE}, no 'chat_template' in "
                                 f"{CONFIG_FILE}, and no model family given for a default one)")
        if isinstance(template, dict):
            key = name or "default"
            if key not in template:
                raise TokenizerError(f"{origin}: chat template {key!r} not found (named templates: "
                                     f"{', '.join(map(str, template))})")
            return template[key]
        if name is not None:
            raise TokenizerError(f"{origin}: chat template {name!r} not found (the file has one unnamed template)")
        return template

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False, chat_template: str | None = None,
                    **kwargs) -> tuple[str, list[Span]]:
        """(text, ``{% generation %}`` spans) of ``messages``; errors name the template's file."""
        variables = {**self.special_tokens(), **kwargs}
        plain = [{k: v for k, v in m.items() if v is not None} for m in messages]  # as transformers passes them
        try:
            return render(self._template(chat_template), plain, add_generation_prompt, **variables)
        except ChatTemplateError as err:
            raise TokenizerError(f"{self.chat_template_source}: {err}") from None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = True,
                            return_assistant_tokens_mask: bool = False, chat_template: str | None = None, **kwargs):
        """As transformers' ``apply_chat_template`` for one conversation: the text (``tokenize=False``),
        its ids (encoded without added special tokens), or with ``return_assistant_tokens_mask``
        ``{"input_ids": ids, "assistant_masks": mask}`` (1 for tokens overlapping a ``{% generation %}`` span)."""
        text, spans = self.render_chat(messages, add_generation_prompt, chat_template, **kwargs)
        if not tokenize:
            return text
        ids, offsets = self.encode_with_offsets(text)
        if not return_assistant_tokens_mask:
            return ids
        return {"input_ids": ids, "assistant_masks": token_mask(offsets, spans)}

    def has_generation_blocks(self, chat_template: str | None = None) -> bool:
        return has_generation_blocks(self._template(chat_template))

    def end_of_turn_id(self, chat_template: str | None = None) -> int | None:
        """The token that closes an assistant turn in the template: the first token written after an
        assistant message's text (``<_end>``, ``<|im_end|>``, ``</s>``); None when nothing follows it."""
        reply = "\u2063reply\u2063"  # text no template writes itself
        text, _ = self.render_chat([{"role": "user", "content": "question"}, {"role": "assistant", "content": reply}],
                                   chat_template=chat_template)
        tail = text[text.rindex(reply) + len(reply):] if reply in text else ""
        ids = self.encode(tail, add_special_tokens=False) if tail else []
        return ids[0] if ids else None

    def stop_ids(self, chat: bool = False) -> list[int]:
        """Ids that end a reply: EOS, and for a chat reply the template's end-of-turn token."""
        ids = [self.eos_id] if self.eos_id is not None else []
        turn_end = self.end_of_turn_id() if chat else None
        return ids + ([turn_end] if turn_end is not None and turn_end not in ids else [])

    # ------------------------------------------------------------------ saving
    def save(self, directory: str) -> None:
        """Copy the tokenizer file, its tokenizer_config.json and chat template (chat_template.jinja, or the
        family default it uses) into ``directory``."""
        import shutil

        os.makedirs(directory, exist_ok=True)
        name = SPM_FILE if self.kind == "sentencepiece" else HF_FILE
        template_file = self.chat_template_file
        if template_file is None and self.chat_template is not None and not self.config.get("chat_template"):
            template_file = self.chat_template_source  # the family default: the copy carries it
        for src, dst in ((self.source, name), (template_file, CHAT_TEMPLATE_FILE)):
            if src is not None and os.path.abspath(src) != os.path.abspath(os.path.join(directory, dst)):
                shutil.copyfile(src, os.path.join(directory, dst))
        with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(self.config, f, indent=2, ensure_ascii=False)


class StreamDecoder:
    """Text deltas of ids arriving one at a time; for valid UTF-8 the deltas concatenate to
    ``decode(prompt + ids)`` minus ``decode(prompt)``, so a reply keeps the space a
    Metaspace/sentencepiece tokenizer puts in its first token ("Hello world" + "▁On" -> " On").

    Each ``push`` decodes a window of the ids: the tokens already emitted since the previous delta
    (context for spaces and for bytes that join into one character) and the new ones, and emits the
    text the new ones add. A decode ending in U+FFFD (a character whose UTF-8 bytes are split over
    tokens) is held back until the character completes or ``flush`` is called. Text once emitted is
    never taken back: bytes that never form a character come out as U+FFFD, as ``decode`` shows them,
    and the stream goes on.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()):
        self.tok = tokenizer
        self.ids = [int(i) for i in prompt_ids]
        self.prompt_text = tokenizer.decode(self.ids)
        self._start = max(len(self.ids) - 6, 0)  # the window: a few prompt tokens give the first reply token context
        self._read = len(self.ids)  # ids before this are emitted
        self._emitted: list[str] = []

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        return self._advance(final=True)

    def _pending(self) -> str:
        """The text the ids after ``_read`` add to the window."""
        before = self.tok.decode(self.ids[self._start:self._read])
        text = self.tok.decode(self.ids[self._start:])
        return text[len(before):] if len(text) > len(before) else ""

    def _advance(self, final: bool) -> str:
        delta = self._pending()
        if not delta or (delta.endswith("\ufffd") and not final):
            return ""
        self._start, self._read = self._read, len(self.ids)
        self._emitted.append(delta)
        return delta

    @property
    def reply(self) -> str:
        """The reply's text: what was emitted and what is still held back."""
        return "".join(self._emitted) + self._pending()


def paragraphs(texts: Iterable[str]) -> Iterable[str]:
    """Split documents at blank lines: sentencepiece learns from sentence-sized pieces."""
    for text in texts:
        for para in text.split("\n\n"):
            if para.strip():
                yield para


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_dir: str, seed: int = 0) -> Tokenizer:
    """Train a byte-fallback BPE sentencepiece model; writes tokenizer.model + tokenizer_config.json.

    Ids 0-3 are unk, bos ``<s>``, eos ``</s>``, pad ``<pad>`` (TeleChat2's bos 1 / eos 2 / pad 3),
    then TeleChat2's chat tokens; the config carries TeleChat2's chat template. Text round-trips exactly (no normalisation, whitespace kept).
    ``encode`` prepends BOS (``add_bos_token``, the default of TeleChat2's published tokenizer class).
    """
    import sentencepiece as spm

    telechat2 = family("telechat2")
    minimum = 4 + len(telechat2.chat_tokens) + 256 + 1  # specials + byte fallback + one merge
    if vocab_size < minimum:
        raise TokenizerError(f"vocab_size = {vocab_size}: expected at least {minimum} (special tokens + 256 bytes)")
    corpus = list(paragraphs(texts))
    if not corpus:
        raise TokenizerError("tokenizer training input is empty")
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_writer=proto, vocab_size=vocab_size, model_type="bpe",
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=list(telechat2.chat_tokens),
            byte_fallback=True, character_coverage=0.9995, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, max_sentence_length=1 << 16, num_threads=2, minloglevel=2,
            hard_vocab_limit=True)
    except RuntimeError as err:
        raise TokenizerError(f"sentencepiece training failed: {str(err).splitlines()[-1]}") from None
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, SPM_FILE)
    with open(path, "wb") as f:
        f.write(proto.getvalue())
    config = {"tokenizer_class": "SentencePiece", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
              "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "chat_template": telechat2.chat_template}
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return Tokenizer.load(out_dir)


def read_texts(paths: Sequence[str], field: str = "text") -> Iterable[str]:
    """Documents from .txt files (one document per file) and .jsonl files (one per line, ``field``);
    a file holding no text fails, named."""
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such input file")
        if path.endswith(".jsonl"):
            docs = 0
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        doc = json.loads(line)
                    except json.JSONDecodeError:
                        raise TokenizerError(f"{path}:{n}: not a JSON object") from None
                    if not isinstance(doc, dict) or not isinstance(doc.get(field), str):
                        raise TokenizerError(f"{path}:{n}: expected a JSON object with a string '{field}' field")
                    docs += 1
                    yield doc[field]
            if not docs:
                raise TokenizerError(f"{path}: empty (no JSON lines): expected one document per line")
        elif path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if not text.strip():
                raise TokenizerError(f"{path}: empty (no text): expected a document")
            yield text
        else:
            raise TokenizerError(f"{path}: unsupported input (expected .txt or .jsonl)")
