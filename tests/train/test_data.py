"""Packed data: prepare (EOS, packing, memmap) and the loader's seeded order and position."""
import json
import os

import numpy as np
import pytest

from mindport.tokenizer import Tokenizer
from mindport.train.data import DataError, Loader, PackedDataset, prepare
from testkit.train import SEQ


def test_prepare_packs_documents_with_bos_and_eos(tmp_path, tok_dir):
    tok = Tokenizer.load(tok_dir)
    docs = ["first document " * 20, "second one " * 15, "third"]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[:2]) + "\n")
    (tmp_path / "b.txt").write_text(docs[2])
    from mindport.tokenizer import read_texts

    out = str(tmp_path / "packed")
    index = prepare(read_texts([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")]), tok, out, 16)
    stream = sum((tok.encode(d) + [tok.eos_id] for d in docs), [])
    assert stream[0] == tok.bos_id  # <s> doc </s> <s> doc </s> ...
    ds = PackedDataset(out)
    assert index["num_documents"] == 3 and index["num_tokens"] == len(stream)
    assert len(ds) == len(stream) // 16 and ds.tokens.dtype == np.uint16
    np.testing.assert_array_equal(np.concatenate([ds[i] for i in range(len(ds))]), stream[:len(ds) * 16])
    assert Tokenizer.load(ds.tokenizer_dir).vocab_size == tok.vocab_size
    with pytest.raises(ValueError, match="destination exists"):
        prepare(docs, tok, out, 16, overwrite=False)


def test_prepare_encodes_documents_as_transformers(tmp_path):
    """A tokenizer.json whose post-processor adds <s>: each document is transformers' input_ids + EOS."""
    from transformers import AutoTokenizer

    from testkit.tokenizers import metaspace_bos

    directory = metaspace_bos(str(tmp_path / "tok"))
    docs = ["the quick brown fox " * 3, "你好世界 On the other hand", "lazy dog"]
    index = prepare(docs, Tokenizer.load(directory), str(tmp_path / "packed"), 4)
    theirs = AutoTokenizer.from_pretrained(directory)
    stream = sum((theirs(d).input_ids + [theirs.eos_token_id] for d in docs), [])
    assert stream[0] == theirs.bos_token_id and index["num_tokens"] == len(stream)
    ds = PackedDataset(str(tmp_path / "packed"))
    np.testing.assert_array_equal(np.concatenate([ds[i] for i in range(len(ds))]), stream[:len(ds) * 4])


def test_prepare_adds_no_second_eos(tmp_path, tok_dir):
    """A tokenizer that already ends each document with EOS (add_eos_token) gets no second one."""
    import shutil

    shutil.copytree(tok_dir, tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(dict(config, add_eos_token=True)))
    tok = Tokenizer.load(str(tmp_path / "tok"))
    docs = ["first document " * 20, "second one " * 15]
    prepare(docs, tok, str(tmp_path / "packed"), 8)
    stream = sum((tok.encode(d) for d in docs), [])
    assert stream.count(tok.eos_id) == 2 and stream[-1] == tok.eos_id
    ds = PackedDataset(str(tmp_path / "packed"))
    np.testing.assert_array_equal(np.concatenate([ds[i] for i in range(len(ds))]), stream[:len(ds) * 8])


def test_empty_inputs_and_data_are_named(tmp_path, tok_dir, data_dir):
    with pytest.raises(DataError, match=r"^docs.txt: 1 documents, \d+ tokens, fewer than one sample of seq_length"):
        prepare(["hi"], Tokenizer.load(tok_dir), str(tmp_path / "p"), 16, source="docs.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    index = json.loads(open(os.path.join(data_dir, "index.json")).read())
    (empty / "index.json").write_text(json.dumps(dict(index, num_samples=0)))
    (empty / "tokens.bin").write_bytes(b"")
    with pytest.raises(DataError, match=f"{empty / 'tokens.bin'}: empty"):
        PackedDataset(str(empty))


def test_dataset_checks(data_dir):
    ds = PackedDataset(data_dir)
    with pytest.raises(DataError, match=f"samples of {SEQ} tokens"):
        ds.check(SEQ * 2, 10_000)
    with pytest.raises(DataError, match="exceeds the model's vocab_size"):
        ds.check(SEQ, 100)


def test_loader_is_seeded_and_visits_every_sample_once_per_epoch(data_dir):
    ds = PackedDataset(data_dir)
    n = len(ds)
    a, b, c = Loader(ds, 3, seed=7), Loader(ds, 3, seed=7), Loader(ds, 3, seed=8)
    first = a.sample_ids(n)
    assert sorted(first.tolist()) == list(range(n))
    np.testing.assert_array_equal(first, b.sample_ids(n))
    assert not np.array_equal(first, c.sample_ids(n))
    second = a.sample_ids(n)
    assert sorted(second.tolist()) == list(range(n)) and not np.array_equal(first, second)


def test_loader_resumes_with_the_next_unseen_sample(data_dir):
    ds = PackedDataset(data_dir)
    total = len(ds) // 4 + 3  # crosses an epoch boundary
    straight = Loader(ds, 4, seed=1)
    batches = [straight.next_batch() for _ in range(total)]
    assert straight.consumed == 4 * total and straight.epoch > 1
    first = Loader(ds, 4, seed=1)
    for _ in range(total - 6):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = Loader(ds, 4, seed=1)
    resumed.load_state_dict(state)
    for k in range(total - 6, total):
        np.testing.assert_array_equal(resumed.next_batch().input_ids, batches[k].input_ids)
    with pytest.raises(DataError, match="seed"):
        Loader(ds, 4, seed=2).load_state_dict(state)


def test_pretraining_batches_are_their_own_labels_in_one_sequence_per_row(data_dir):
    batch = Loader(PackedDataset(data_dir), 3, seed=0).next_batch()
    assert batch.input_ids.shape == (3, SEQ) and batch.input_ids.dtype == np.int32
    np.testing.assert_array_equal(batch.labels, batch.input_ids)
    assert batch.segment_ids is None


def test_sft_data_gives_labels_and_segments_and_checks_their_sizes(tmp_path):
    from testkit import sft_data

    tokens, labels, segments, _ = sft_data.pack(sft_data.synthetic_sequences(6, 100, 3, 9), 16)
    out = sft_data.write(str(tmp_path / "sft"), tokens, 100, labels, segments)
    ds = PackedDataset(out)
    loader = Loader(ds, 2, seed=3)
    order = loader.sample_ids(2)
    loader.consumed = 0
    batch = loader.next_batch()
    for got, want in ((batch.input_ids, tokens), (batch.labels, labels), (batch.segment_ids, segments)):
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want[order])
    np.testing.assert_array_equal(batch.rows(slice(1, 2)).segment_ids, segments[order[1:]])

    with open(os.path.join(out, "segments.bin"), "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(DataError, match=r"segments.bin: \d+ bytes, index.json implies \d+ \(\d+ x 16 uint16\)$"):
        PackedDataset(out)
    os.remove(os.path.join(out, "labels.bin"))
    with pytest.raises(DataError, match=r"labels.bin: missing, index.json implies"):
        PackedDataset(out)
