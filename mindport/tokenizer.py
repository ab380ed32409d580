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

Chat templates are recognised, not executed: TeleChat2's (``<_user>``/``<_bot>``/``<_end>``)
and ChatML (``<|im_start|>role ... <|im_end|>``, Qwen). Any other template is refused with
one line rather than rendered wrongly.
"""
from __future__ import annotations

import io
import json
import os
from typing import Iterable, Sequence

from mindport.models.registry import ChatFormat, chat_formats, family

SPM_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

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
                 chat_template_file: str | None = None):
        self._b = backend
        self.kind = kind  # "sentencepiece" | "hf"
        self.config = config or {}
        self.source = source
        self.chat_template_file = chat_template_file
        if chat_template_file is not None:
            with open(chat_template_file, encoding="utf-8") as f:
                self.chat_template = f.read()
        else:
            self.chat_template = self.config.get("chat_template")
        self.bos_id = self._special("bos_token", 1)
        self.eos_id = self._special("eos_token", 2)
        self.pad_id = self._special("pad_token", None)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        """From a directory (tokenizer.model or tokenizer.json inside) or one of those files."""
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
            return cls(backend, "hf", config, file, template_file)
        import sentencepiece as spm

        backend = spm.SentencePieceProcessor()
        try:
            backend.Load(file)
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"{file}: not a valid sentencepiece model ({str(err).splitlines()[0]})") from None
        return cls(backend, "sentencepiece", config, file, template_file)

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

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            if skip_special:
                ids = [i for i in ids if not (self._b.is_control(i) or self._b.is_unknown(i))]
            return self._b.decode(ids)
        return self._b.decode(ids, skip_special_tokens=skip_special)

    # ------------------------------------------------------------------ chat
    def chat_format(self) -> str:
        """"telechat2" or "chatml": see :meth:`chat`."""
        return self.chat().name

    def chat(self) -> ChatFormat:
        """The family chat format (TeleChat2's or ChatML) of the chat template (chat_template.jinja
        or tokenizer_config.json's chat_template), or else of the vocabulary."""
        template = self.chat_template
        if isinstance(template, list):  # HF allows named templates; use the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        formats = chat_formats()
        known = " and ".join(f"{fmt.title}'s {'/'.join(fmt.markers)}" for fmt in formats)
        if template:
            for fmt in formats:
                if all(marker in template for marker in fmt.markers):
                    return fmt
            first = " ".join(str(template).split())[:60]
            raise TokenizerError(f"{self.source}: unknown chat template '{first}...' (mindport knows {known})")
        for fmt in formats:
            if all(self.token_to_id(marker) is not None for marker in fmt.markers):
                return fmt
        raise TokenizerError(f"{self.source}: no chat template (no chat_template.jinja, no chat_template in "
                             f"tokenizer_config.json, and the vocabulary has none of {known})")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` ([{"role": "user", "content": "..."}, ...])."""
        fmt = self.chat()
        parts = []
        for m in messages:
            role, content = m.get("role"), m.get("content", "")
            if role not in ("system", "user", "assistant", "bot"):
                raise TokenizerError(f"chat message role {role!r}: expected system, user or assistant")
            prefix, suffix = fmt.roles["assistant" if role == "bot" else role]
            parts.append(prefix + content + suffix)
        if add_generation_prompt:
            parts.append(fmt.generation_prompt)
        return "".join(parts)

    def stop_ids(self) -> list[int]:
        """Ids that end a reply: eos, plus <_end> / <|im_end|> when the vocabulary has them."""
        ids = [self.eos_id] if self.eos_id is not None else []
        for token in ("<_end>", "<|im_end|>"):
            i = self.token_to_id(token)
            if i is not None and i not in ids:
                ids.append(i)
        return ids

    # ------------------------------------------------------------------ saving
    def save(self, directory: str) -> None:
        """Copy the tokenizer file, its tokenizer_config.json and chat_template.jinja into ``directory``."""
        import shutil

        os.makedirs(directory, exist_ok=True)
        name = SPM_FILE if self.kind == "sentencepiece" else HF_FILE
        for src, dst in ((self.source, name), (self.chat_template_file, CHAT_TEMPLATE_FILE)):
            if src is not None and os.path.abspath(src) != os.path.abspath(os.path.join(directory, dst)):
                shutil.copyfile(src, os.path.join(directory, dst))
        with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(self.config, f, indent=2, ensure_ascii=False)


class StreamDecoder:
    """Text deltas of ids arriving one at a time; the deltas concatenate to ``decode(prompt + ids)``
    minus ``decode(prompt)``, so a reply keeps the space a Metaspace/sentencepiece tokenizer puts in
    its first token ("Hello world" + "▁On" -> " On").

    Each ``push`` decodes the whole sequence and emits what follows the text already emitted; a
    decode ending in U+FFFD (a character whose UTF-8 bytes are split over tokens) is held back until
    the character completes or ``flush`` is called.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()):
        self.tok = tokenizer
        self.ids = [int(i) for i in prompt_ids]
        self.prompt_text = tokenizer.decode(self.ids)
        self._emitted = self.prompt_text  # the prompt's text counts as emitted

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        return self._advance(self.tok.decode(self.ids))

    def _advance(self, text: str) -> str:
        if not text.startswith(self._emitted):  # an earlier piece changed; wait until it settles
            return ""
        delta, self._emitted = text[len(self._emitted):], text
        return delta

    @property
    def reply(self) -> str:
        """The text after the prompt: ``decode(prompt + ids)`` without ``decode(prompt)``."""
        text = self.tok.decode(self.ids)
        return text[len(self.prompt_text):] if text.startswith(self.prompt_text) else text


def paragraphs(texts: Iterable[str]) -> Iterable[str]:
    """Split documents at blank lines: sentencepiece learns from sentence-sized pieces."""
    for text in texts:
        for para in text.split("\n\n"):
            if para.strip():
                yield para


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_dir: str, seed: int = 0) -> Tokenizer:
    """Train a byte-fallback BPE sentencepiece model; writes tokenizer.model + tokenizer_config.json.

    Ids 0-3 are unk, bos ``<s>``, eos ``</s>``, pad ``<pad>`` (TeleChat2's bos 1 / eos 2 / pad 3),
    then TeleChat2's chat tokens. Text round-trips exactly (no normalisation, whitespace kept).
    ``encode`` prepends BOS (``add_bos_token``, the default of TeleChat2's published tokenizer class).
    """
    import sentencepiece as spm

    chat = family("telechat2").chat
    minimum = 4 + len(chat.specials) + 256 + 1  # specials + byte fallback + one merge
    if vocab_size < minimum:
        raise TokenizerError(f"vocab_size = {vocab_size}: expected at least {minimum} (special tokens + 256 bytes)")
    corpus = list(paragraphs(texts))
    if not corpus:
        raise TokenizerError("tokenizer training input is empty")
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_writer=proto, vocab_size=vocab_size, model_type="bpe",
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=list(chat.specials),
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
              "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "chat_template": chat.template}
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
