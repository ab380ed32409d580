"""Vocabulary extension, the Chinese-LLaMA / Chinese-Mixtral way: new pieces merged into a tokenizer
behind the old ones, so every old piece keeps its id; and the tokens-per-character statistic of their
efficiency tables.

``extend`` edits the tokenizer file itself:

- sentencepiece ``tokenizer.model``: the ``ModelProto`` gets the new pieces appended (Chinese-LLaMA's
  ``merge_tokenizers.py`` merges protos the same way). Each new piece is scored below every old
  piece, in the order of its source, so the old merges keep their priority.
- HF BPE ``tokenizer.json``: the new pieces join ``model.vocab`` with ids after every existing id
  (added tokens included) and, for pieces a merge produces, the merge joins ``model.merges`` after
  the old ones; a merge is only added when both its parts are already in the vocabulary, so every
  added piece can actually be produced.

New pieces come from another tokenizer of the same kind or are trained on a corpus (sentencepiece
training with the base model's normaliser and settings; for ``tokenizer.json``, the ``tokenizers``
BPE trainer behind the base's own normaliser and pre-tokenizer, so the pieces share its alphabet).
Pieces the base already has are skipped; special tokens and ``tokenizer_config.json`` are carried.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from mindport.checkpoint.model_files import SPECIAL_TOKENS_MAP
from mindport.tokenizer import CHAT_TEMPLATE_FILE, CONFIG_FILE, Tokenizer, TokenizerError, paragraphs


@dataclass
class Extension:
    out_dir: str
    kind: str  # "sentencepiece" | "hf"
    old_size: int
    new_size: int
    skipped: int  # candidate pieces the base already had

    def __str__(self) -> str:
        return (f"tokenizer: {self.out_dir}: {self.old_size} -> {self.new_size} tokens ({self.kind}; "
                f"{self.new_size - self.old_size} new pieces, {self.skipped} already present)")


def pieces(tok: Tokenizer) -> list[str]:
    """The token string of every id, ``[0, vocab_size)`` (None where an HF vocabulary has a gap)."""
    return [tok.id_to_token(i) for i in range(tok.vocab_size)]


def piece_splitter(tok: Tokenizer) -> Callable[[str], list[int]]:
    """``split(piece) -> ids``: the pieces of ``tok`` its model splits a piece string into, in piece space
    (no normaliser, pre-tokenizer or dummy prefix: "▁中国" -> ["▁中", "国"], a byte-level "ä¸Ń" stays
    byte-level). Used to initialise a new token's embedding from the old pieces it is made of."""
    if tok.kind == "hf":
        model = tok.backend.model
        return lambda piece: [t.id for t in model.tokenize(piece)]
    import sentencepiece as spm

    proto = _load_proto(tok.source)
    norm = proto.normalizer_spec
    norm.name, norm.precompiled_charsmap = "identity", b""
    norm.add_dummy_prefix = norm.remove_extra_whitespaces = False
    processor = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    return lambda piece: processor.encode(piece.replace("\u2581", " "))


# ---------------------------------------------------------------------------- sentencepiece

def _load_proto(path: str):
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    proto = spm_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def _spm_candidates(proto) -> list[tuple[str, int]]:
    """(piece, type) of the ordinary and user-defined pieces of a model, in id order."""
    kinds = (proto.SentencePiece.NORMAL, proto.SentencePiece.USER_DEFINED)
    return [(p.piece, p.type) for p in proto.pieces if p.type in kinds]


def _train_spm(base, texts: Iterable[str], count: int):
    """A BPE/unigram model of about ``count`` pieces trained on ``texts`` with the base's normaliser."""
    import sentencepiece as spm

    trainer, norm = base.trainer_spec, base.normalizer_spec
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(paragraphs(texts))), model_writer=out, vocab_size=count,
            model_type={1: "unigram", 2: "bpe", 3: "word", 4: "char"}[trainer.model_type],
            normalization_rule_name=norm.name or "identity", add_dummy_prefix=norm.add_dummy_prefix,
            remove_extra_whitespaces=norm.remove_extra_whitespaces, split_digits=trainer.split_digits,
            byte_fallback=False, character_coverage=0.9995, hard_vocab_limit=False, max_sentence_length=1 << 16,
            num_threads=2, minloglevel=2)
    except RuntimeError as err:
        raise TokenizerError(f"sentencepiece training failed: {str(err).splitlines()[-1]}") from None
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    proto = spm_pb2.ModelProto()
    proto.ParseFromString(out.getvalue())
    return proto


def _extend_spm(base_file: str, source: str | None, texts, count: int) -> tuple[bytes, int, int, int]:
    base = _load_proto(base_file)
    other = _load_proto(source) if source else _train_spm(base, texts, count)
    have = {p.piece for p in base.pieces}
    lowest = min((p.score for p in base.pieces), default=0.0)
    old_size, skipped = len(base.pieces), 0
    for piece, kind in _spm_candidates(other):
        if piece in have:
            skipped += 1
            continue
        have.add(piece)
        lowest -= 1.0
        base.pieces.append(type(base.pieces[0])(piece=piece, score=lowest, type=kind))
    return base.SerializeToString(), old_size, len(base.pieces), skipped


# ---------------------------------------------------------------------------- HF tokenizer.json

def _merge_pair(merge) -> tuple[str, str]:
    return tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ", 1))


def _bpe_model(spec: dict, path: str) -> dict:
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"{path}: model type {model.get('type')!r}: only BPE tokenizer.json files are extended")
    return model


def _train_hf(base_path: str, texts: Iterable[str], count: int) -> dict:
    """A BPE model of ``count`` tokens trained behind the base's normaliser and pre-tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    tok = HFTokenizer.from_file(base_path)
    spec = json.loads(tok.to_str())
    tok.model = models.BPE(byte_fallback=bool(_bpe_model(spec, base_path).get("byte_fallback")))
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))  # every byte is a base piece
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else []
    tok.train_from_iterator(list(paragraphs(texts)), trainers.BpeTrainer(vocab_size=count, show_progress=False,
                                                                         initial_alphabet=alphabet))
    return json.loads(tok.to_str())


def _extend_hf(base_file: str, source: str | None, texts, count: int) -> tuple[bytes, int, int, int]:
    with open(base_file, encoding="utf-8") as f:
        spec = json.load(f)
    model = _bpe_model(spec, base_file)
    if source:
        with open(source, encoding="utf-8") as f:
            other = json.load(f)
        _bpe_model(other, source)
    else:
        other = _train_hf(base_file, texts, count)
    vocab, merges = model["vocab"], model["merges"]
    as_lists = bool(merges) and isinstance(merges[0], list)
    taken = {**vocab, **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
    old_size = max(taken.values(), default=-1) + 1
    next_id, skipped = old_size, 0
    other_vocab = other["model"]["vocab"]
    produced = {a + b: (a, b) for a, b in map(_merge_pair, other["model"]["merges"])}
    for piece in sorted(other_vocab, key=other_vocab.get):  # the source's order: alphabet, then merges
        if piece in taken:
            skipped += 1
            continue
        pair = produced.get(piece)
        if pair is not None and not (pair[0] in vocab and pair[1] in vocab):
            continue  # its parts are not in the vocabulary: the piece could never be produced
        vocab[piece] = taken[piece] = next_id
        next_id += 1
        if pair is not None:
            merges.append(list(pair) if as_lists else " ".join(pair))
    return json.dumps(spec, ensure_ascii=False, indent=2).encode("utf-8"), old_size, next_id, skipped


# ---------------------------------------------------------------------------- entry points

def extend(base: str, out_dir: str, source: str | None = None, train_texts: Iterable[str] | None = None,
           new_pieces: int = 0) -> Extension:
    """Write ``base`` with new pieces (from tokenizer ``source``, or ``new_pieces`` trained on
    ``train_texts``) to ``out_dir``: the merged tokenizer file plus the base's tokenizer_config.json,
    special_tokens_map.json and chat_template.jinja. Old pieces keep their ids."""
    base_tok = Tokenizer.load(base)
    base_file = base_tok.source
    if (source is None) == (train_texts is None):
        raise TokenizerError("tokenizer extend: give new pieces from a tokenizer (--from) or a corpus (--train-on)")
    if source is not None:
        source_tok = Tokenizer.load(source)
        if source_tok.kind != base_tok.kind:
            raise TokenizerError(f"{source_tok.source}: a {source_tok.kind} tokenizer cannot extend the "
                                 f"{base_tok.kind} tokenizer {base_file}: expected a {os.path.basename(base_file)}")
        source = source_tok.source
    elif new_pieces <= 0:
        raise TokenizerError(f"new_pieces = {new_pieces}: expected a positive number of pieces to train")
    merge = _extend_spm if base_tok.kind == "sentencepiece" else _extend_hf
    data, old_size, new_size, skipped = merge(base_file, source, train_texts, new_pieces)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, os.path.basename(base_file)), "wb") as f:
        f.write(data)
    base_dir = os.path.dirname(base_file)
    for name in (CONFIG_FILE, SPECIAL_TOKENS_MAP, CHAT_TEMPLATE_FILE):
        if os.path.isfile(os.path.join(base_dir, name)):
            shutil.copyfile(os.path.join(base_dir, name), os.path.join(out_dir, name))
    return Extension(out_dir, base_tok.kind, old_size, new_size, skipped)


def check_extends(old: Tokenizer, new: Tokenizer) -> None:
    """Fail unless ``new`` keeps every piece of ``old`` at its id."""
    old_pieces, new_pieces = pieces(old), pieces(new)
    if len(new_pieces) < len(old_pieces):
        raise TokenizerError(f"{new.source}: {len(new_pieces)} tokens, fewer than the {len(old_pieces)} of "
                             f"{old.source}: expected an extension of it")
    for i, piece in enumerate(old_pieces):
        if new_pieces[i] != piece:
            raise TokenizerError(f"{new.source}: id {i} is {new_pieces[i]!r}, {old.source} has {piece!r}: expected "
                                 f"an extension that keeps every old id (mindport tokenizer extend)")


def stats(tokenizers: Sequence[Tokenizer], texts: Sequence[str]) -> list[dict]:
    """Per tokenizer: tokens, characters, tokens per character and characters per token over ``texts``
    (without special tokens)."""
    chars = sum(len(t) for t in texts)
    rows = []
    for tok in tokenizers:
        tokens = sum(len(ids) for ids in tok.encode_batch(list(texts), add_special_tokens=False))
        rows.append({"tokenizer": tok.source, "vocab_size": tok.vocab_size, "tokens": tokens, "chars": chars,
                     "tokens_per_char": tokens / chars if chars else 0.0,
                     "chars_per_token": chars / tokens if tokens else 0.0})
    return rows
