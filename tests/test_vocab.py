"""``mindport tokenizer extend`` and ``stats``: new pieces merged behind the old ones (sentencepiece
protos and BPE tokenizer.json), checked through transformers' AutoTokenizer."""
from __future__ import annotations

import json
import os

import pytest

from mindport.cli import main
from mindport.tokenizer import Tokenizer
from testkit import tokenizers
from testkit.vocab import SENTENCE, write_corpus


@pytest.fixture(scope="module", params=tokenizers.KINDS)
def extended(request, tmp_path_factory):
    """(kind, base dir, extended dir): the base extended by pieces trained on a Chinese corpus."""
    root = tmp_path_factory.mktemp(f"ext_{request.param}")
    base = tokenizers.build(request.param, str(root / "base"))
    out = str(root / "ext")
    assert main(["tokenizer", "extend", "--tokenizer", base, "--train-on", write_corpus(str(root)),
                 "--new-pieces", "300", "--out", out]) == 0
    return request.param, base, out


def test_extend_keeps_old_ids_adds_pieces_without_duplicates(extended):
    from transformers import AutoTokenizer

    kind, base, out = extended
    old, new = AutoTokenizer.from_pretrained(base), AutoTokenizer.from_pretrained(out)
    old_pieces = old.convert_ids_to_tokens(list(range(len(old))))
    new_pieces = new.convert_ids_to_tokens(list(range(len(new))))
    assert len(new) > len(old) + 30, kind
    assert new_pieces[:len(old)] == old_pieces  # every old piece keeps its id
    assert len(set(new_pieces)) == len(new_pieces) == len(new.get_vocab())  # no duplicates, no gaps
    assert (new.bos_token_id, new.eos_token_id, new.pad_token_id) == (old.bos_token_id, old.eos_token_id,
                                                                      old.pad_token_id)
    with open(os.path.join(base, "tokenizer_config.json")) as f, open(os.path.join(out, "tokenizer_config.json")) as g:
        assert json.load(f) == json.load(g)
    ours = Tokenizer.load(out)
    assert ours.vocab_size == len(new)
    assert ours.encode(SENTENCE) == new(SENTENCE).input_ids  # transformers reads the merged file as we do
    assert len(new(SENTENCE).input_ids) < len(old(SENTENCE).input_ids) * 0.7
    assert new.decode(new(SENTENCE, add_special_tokens=False).input_ids) == SENTENCE


def test_extend_from_another_tokenizer_file(tmp_path):
    from sentencepiece import sentencepiece_model_pb2

    base = tokenizers.build("sentencepiece", str(tmp_path / "base"))
    donor = str(tmp_path / "donor")
    assert main(["tokenizer", "extend", "--tokenizer", base, "--train-on", write_corpus(str(tmp_path)),
                 "--new-pieces", "200", "--out", donor]) == 0
    assert main(["tokenizer", "extend", "--tokenizer", base, "--from", donor, "--out", str(tmp_path / "out")]) == 0
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(open(tmp_path / "out" / "tokenizer.model", "rb").read())
    donor_proto = sentencepiece_model_pb2.ModelProto()
    donor_proto.ParseFromString(open(tmp_path / "donor" / "tokenizer.model", "rb").read())
    assert [p.piece for p in proto.pieces] == [p.piece for p in donor_proto.pieces]  # merging twice adds nothing


def test_extend_refuses_a_tokenizer_of_another_kind(tmp_path, capsys):
    base = tokenizers.build("sentencepiece", str(tmp_path / "base"))
    other = tokenizers.build("byte_level", str(tmp_path / "other"))
    assert main(["tokenizer", "extend", "--tokenizer", base, "--from", other, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a hf tokenizer cannot extend the sentencepiece tokenizer" in err
    assert not os.path.exists(tmp_path / "o")


def test_stats_prints_tokens_per_character(extended, tmp_path, capsys):
    from transformers import AutoTokenizer

    kind, base, out = extended
    corpus = tmp_path / "s.txt"
    corpus.write_text(SENTENCE, encoding="utf-8")
    assert main(["tokenizer", "stats", "--tokenizer", base, "--tokenizer", out, "--input", str(corpus)]) == 0
    lines = capsys.readouterr().out.splitlines()
    for line, directory in zip(lines[1:3], (base, out)):
        tokens = len(AutoTokenizer.from_pretrained(directory)(SENTENCE, add_special_tokens=False).input_ids)
        assert line.split()[2:5] == [str(tokens), f"{tokens / len(SENTENCE):.4f}", f"{len(SENTENCE) / tokens:.4f}"]
