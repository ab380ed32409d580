"""``mindport convert resize-vocab``: a tiny transformers-made model given an extended tokenizer's
vocabulary; transformers loads the result, old rows and logits are unchanged, new rows are the mean of
their pieces' old rows (computed here with transformers' tokenizers)."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from mindport.cli import main
from testkit import tokenizers
from testkit.hf_models import hf_moe, torch_logits
from testkit.vocab import write_corpus

OLD_VOCAB = 400  # testkit's sentencepiece tokenizer


@pytest.fixture(scope="module")
def tokenizer_pair(tmp_path_factory):
    """(old, extended) sentencepiece tokenizer directories."""
    root = tmp_path_factory.mktemp("tok")
    old = tokenizers.build("sentencepiece", str(root / "old"))
    new = str(root / "new")
    assert main(["tokenizer", "extend", "--tokenizer", old, "--train-on", write_corpus(str(root)),
                 "--new-pieces", "120", "--out", new]) == 0
    return old, new


def _with_tokenizer(model_dir: str, tokenizer_dir: str) -> str:
    for name in os.listdir(tokenizer_dir):
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(model_dir, name))
    return model_dir


def test_resize_vocab_mean_initialises_new_rows_and_keeps_the_old_model(tokenizer_pair, tmp_path):
    import torch
    from transformers import AutoTokenizer, MixtralForCausalLM

    old_tok_dir, new_tok_dir = tokenizer_pair
    model, src = hf_moe("mixtral", tmp_path / "src", vocab_size=OLD_VOCAB)
    _with_tokenizer(src, old_tok_dir)
    dst = str(tmp_path / "dst")
    assert main(["convert", "resize-vocab", "--src", src, "--tokenizer", new_tok_dir, "--dst", dst,
                 "--pad-to-multiple", "64"]) == 0

    old_tok, new_tok = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(dst)
    tokens = len(new_tok)
    assert tokens > OLD_VOCAB + 30 and len(AutoTokenizer.from_pretrained(new_tok_dir)) == tokens
    rows = -(-tokens // 64) * 64
    resized = MixtralForCausalLM.from_pretrained(dst).eval()
    assert resized.config.vocab_size == rows and resized.config.make_vocab_size_divisible_by == 64

    before, after = load_file(os.path.join(src, "model.safetensors")), load_file(os.path.join(dst, "model.safetensors"))
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            grown = after[name]
            assert grown.shape == (rows, tensor.shape[1]) and np.array_equal(grown[:OLD_VOCAB], tensor), name
            for i in range(OLD_VOCAB, tokens):  # the pieces the OLD tokenizer splits the new token's text into
                pieces = old_tok(new_tok.decode([i]), add_special_tokens=False).input_ids
                expected = tensor[pieces].astype(np.float64).mean(axis=0)
                np.testing.assert_allclose(grown[i], expected, rtol=1e-6, atol=1e-7, err_msg=f"{name} row {i}")
            np.testing.assert_allclose(grown[tokens:], np.broadcast_to(tensor.astype(np.float64).mean(axis=0),
                                                                       (rows - tokens, tensor.shape[1])),
                                       rtol=1e-5, atol=1e-7)  # padding rows: the mean of all old rows
        else:
            assert np.array_equal(after[name], tensor), name

    ids = np.array([old_tok("中国的历史 the fox", add_special_tokens=False).input_ids])
    assert ids.max() < OLD_VOCAB
    with torch.no_grad():
        old_logits, new_logits = torch_logits(model, ids), torch_logits(resized, ids)
    np.testing.assert_allclose(new_logits[..., :OLD_VOCAB], old_logits, rtol=1e-5, atol=1e-5)  # fp32 matmul order
    assert new_logits.shape[-1] == rows


def test_resize_vocab_of_a_sharded_bf16_telechat_checkpoint(tokenizer_pair, tiny_telechat_hf, tmp_path):
    import torch
    from safetensors.torch import load_file as load_torch
    from transformers import AutoTokenizer

    from mindport import AutoConfig
    from testkit.checkpoints import rewrite

    old_tok_dir, new_tok_dir = tokenizer_pair
    src = _with_tokenizer(rewrite(tiny_telechat_hf, str(tmp_path / "src"), dtype="bf16", fmt="sharded"), old_tok_dir)
    # the tiny model has 256 rows, its tokenizer 400: the first resize gives the old tokenizer its rows
    mid, dst = str(tmp_path / "mid"), str(tmp_path / "dst")
    for source, tokenizer, target in ((src, old_tok_dir, mid), (mid, new_tok_dir, dst)):
        assert main(["convert", "resize-vocab", "--src", source, "--tokenizer", tokenizer, "--dst", target,
                     "--max-shard-size", "60KB"]) == 0

    def tensors(directory):
        return {k: v for f in sorted(os.listdir(directory)) if f.endswith(".safetensors")
                for k, v in load_torch(os.path.join(directory, f)).items()}

    before, after = tensors(mid), tensors(dst)
    name = "transformer.word_embeddings.weight"
    assert after[name].dtype == torch.bfloat16 and torch.equal(after[name][:OLD_VOCAB], before[name])
    old_tok, new_tok = AutoTokenizer.from_pretrained(mid), AutoTokenizer.from_pretrained(dst)
    for i in range(OLD_VOCAB, len(new_tok)):
        pieces = old_tok(new_tok.decode([i]), add_special_tokens=False).input_ids
        expected = before[name][pieces].double().mean(dim=0).to(torch.bfloat16)
        torch.testing.assert_close(after[name][i], expected, rtol=8e-3, atol=1e-6)  # one bf16 ulp
    assert AutoConfig.from_pretrained(dst).vocab_size == after["lm_head.weight"].shape[0] == len(new_tok)
    assert os.path.isfile(os.path.join(dst, "model.safetensors.index.json"))


def test_resize_vocab_refuses_a_tokenizer_that_moves_old_ids(tokenizer_pair, tmp_path, capsys):
    old_tok_dir, _ = tokenizer_pair
    _, src = hf_moe("mixtral", tmp_path / "src", vocab_size=OLD_VOCAB)
    _with_tokenizer(src, old_tok_dir)
    other = tokenizers.build("metaspace_bos", str(tmp_path / "other"))  # 413 tokens, other pieces
    assert main(["convert", "resize-vocab", "--src", src, "--tokenizer", other, "--dst", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mindport: error: ") and "expected an extension that keeps every old id" in err
    assert not os.path.exists(tmp_path / "d")
