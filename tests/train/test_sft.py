"""Supervised fine-tuning data in `mindport eval` and `mindport train`, against transformers: a tiny
Llama (as a TeleChat2 checkpoint with the same weights) and chat data whose tokens and assistant
mask come from transformers' ``apply_chat_template(..., return_assistant_tokens_mask=True)``."""
import json
import re

import numpy as np
import pytest
import yaml

from testkit import sft_data

SEQ = 64  # = training_seqlen: no NTK scaling, as in Llama
# a Mixtral-Instruct-like template whose assistant turns (content and </s>) are {% generation %} blocks
TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '<s>[INST] ' + message['content'] + "
            "' [/INST]' }}{% else %}{% generation %}{{ ' ' + message['content'] + '</s>' }}{% endgeneration %}"
            "{% endif %}{% endfor %}")
CHATS = [
    [("user", "Hello world"), ("assistant", "the quick brown fox")],
    [("user", "On the other hand"), ("assistant", "jumps over the lazy dog"), ("user", "The for statement"),
     ("assistant", "iterates")],
    [("user", "你好世界"), ("assistant", "快速的棕色狐狸")],
    [("user", "the lazy dog"), ("assistant", "Hello")],
    [("user", "quick brown"), ("assistant", "fox jumps over the other hand"), ("user", "world"),
     ("assistant", "dog")],
]


@pytest.fixture(scope="module")
def sft_case(tmp_path_factory):
    """(HF model dir, packed data dir, unpacked data dir, conversations as (ids, labels), Llama)."""
    from transformers import AutoTokenizer

    from testkit.hf_models import llama_tiny, save_hf_dir, telechat_from_llama
    from testkit.tokenizers import metaspace_bos

    root = tmp_path_factory.mktemp("sft")
    tok_dir = metaspace_bos(str(root / "tok"))
    config_path = root / "tok" / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "chat_template": TEMPLATE}))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    sequences = []
    for chat in CHATS:
        out = tok.apply_chat_template([{"role": r, "content": c} for r, c in chat], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), np.asarray(out["assistant_masks"], bool)
        assert 0 < mask.sum() < len(ids) <= SEQ
        sequences.append((ids, np.where(mask, ids, -100).tolist()))
    llama = llama_tiny(num_kv_heads=2, vocab=512, max_pos=SEQ)
    hf_config, tensors = telechat_from_llama(llama, training_seqlen=SEQ)
    model_dir = save_hf_dir(str(root / "model"), hf_config, tensors)
    dirs = {}
    for name, packed in (("packed", True), ("unpacked", False)):
        tokens, labels, segments, places = sft_data.pack(sequences, SEQ, packed=packed)
        dirs[name] = (sft_data.write(str(root / name), tokens, len(tok), labels, segments, tok_dir), places)
    assert len(dirs["packed"][1]) == len(CHATS) and max(row for row, _ in dirs["packed"][1]) < len(CHATS) - 1
    return model_dir, dirs, sequences, llama


def hf_loss_sum(llama, sequence) -> tuple[float, int]:
    """transformers' summed loss of one conversation and its number of supervised targets."""
    import torch

    ids, labels = (torch.tensor([x]) for x in sequence)
    count = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        return float(llama(input_ids=ids, labels=labels).loss) * count, count


@pytest.mark.parametrize("layout", ["packed", "unpacked"])
def test_eval_loss_is_transformers_loss_over_the_assistant_tokens(sft_case, layout, capsys):
    from mindport.cli import main

    model_dir, dirs, sequences, llama = sft_case
    sums = [hf_loss_sum(llama, s) for s in sequences]
    expected = sum(s for s, _ in sums) / sum(n for _, n in sums)
    assert main(["eval", "--load", model_dir, "--data", dirs[layout][0], "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert int(re.search(r"^tokens: (\d+)$", out, re.M).group(1)) == sum(n for _, n in sums)
    assert float(re.search(r"^loss: (\S+)$", out, re.M).group(1)) == pytest.approx(expected, abs=1e-4)


def test_train_from_an_hf_directory_on_packed_chat_data(sft_case, tmp_path):
    """The first step's loss is transformers' loss over the assistant tokens of the first batch's
    conversations (before any update); the run then trains on."""
    from mindport.cli import main
    from mindport.train.data import Loader, PackedDataset

    model_dir, dirs, sequences, llama = sft_case
    data_dir, places = dirs["packed"]
    doc = {"seed": 0, "output_dir": str(tmp_path / "out"), "load_checkpoint": model_dir,
           "runner_config": {"batch_size": 2, "seq_length": SEQ, "train_steps": 3},
           "lr_schedule": {"learning_rate": 1e-3, "warmup_steps": 1}, "train_dataset": {"data_dir": data_dir}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(doc))
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--no-progress"]) == 0
    with open(tmp_path / "out" / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]
    rows = set(Loader(PackedDataset(data_dir), 2, seed=0).sample_ids(2).tolist())
    sums = [hf_loss_sum(llama, s) for s, (row, _) in zip(sequences, places) if row in rows]
    assert losses[0] == pytest.approx(sum(s for s, _ in sums) / sum(n for _, n in sums), abs=1e-4)
    assert len(losses) == 3 and all(np.isfinite(losses))
