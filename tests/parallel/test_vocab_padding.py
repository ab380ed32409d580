"""An XVERSE vocabulary that does not divide by model_parallel (XVERSE-65B's 100534; here 251)
is padded for the split, and the padding never shows: under TP2 the logits, loss, gradients,
an AdamW step and greedy generation equal one process, and per-rank exports hold only real
rows and merge back to the original shape. The TP2 step and generation share one msrun launch."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mindport import AutoConfig, AutoModelForCausalLM, ParallelConfig
from mindport.parallel.sharding import shard_slices, vocab_block
from testkit.launch import assert_layout_equals_single_process, rank_dumps, shared_launches

HERE = os.path.dirname(__file__)
STEP_WORKER, GENERATE_WORKER = os.path.join(HERE, "step_worker.py"), os.path.join(HERE, "generate_worker.py")
VOCAB = 251  # odd: no model_parallel > 1 divides it


def weights_of(directory: str) -> dict:
    from mindport.train.checkpoint import read_safetensors

    out = {}
    for root, _, files in sorted(os.walk(directory)):
        for name in sorted(files):
            if name.endswith(".safetensors"):
                out[os.path.relpath(os.path.join(root, name), directory)] = read_safetensors(os.path.join(root, name))
    return out


@pytest.fixture(scope="module")
def xverse_dirs(tmp_path_factory):
    """HF directories of a tiny dense XVERSE and a tiny XVERSE-MoE with a 251-token vocabulary."""
    dirs = []
    for preset in ("xverse-tiny", "xverse-moe-tiny"):
        directory = str(tmp_path_factory.mktemp(preset) / "hf")
        AutoModelForCausalLM.from_preset(preset, vocab_size=VOCAB, initializer_range=0.15).save_pretrained(directory)
        dirs.append(directory)
    return dirs


def test_odd_vocabulary_is_padded_not_refused():
    config = AutoConfig.from_preset("xverse-65b")
    for tp in (2, 8):
        ParallelConfig(model_parallel=tp).check_model(config)  # was: 'vocab_size' = 100534: expected a multiple
    assert vocab_block(100534, 8) == 12567 and vocab_block(100534, 8, 128) == 12672  # 100536 and 101376 padded
    assert [shard_slices("lm_head.weight", (VOCAB, 4), r, 2)[0] for r in range(2)] == [slice(0, 126), slice(126, 251)]


def test_per_rank_export_holds_real_rows_and_merges_back(xverse_dirs, tmp_path):
    from mindport.ckpt_tools.convert import hf_to_mindport, merge

    hf_dir = xverse_dirs[0]
    hf_to_mindport(hf_dir, str(tmp_path / "one"), progress=False)
    hf_to_mindport(hf_dir, str(tmp_path / "tp2"), tp=2, progress=False)
    ranks = weights_of(str(tmp_path / "tp2"))
    assert [ranks[f"rank_000{r}/model.safetensors"]["embed.weight"].shape[0] for r in range(2)] == [126, 125]
    merge(str(tmp_path / "tp2"), str(tmp_path / "merged"), progress=False)
    merged, one = weights_of(str(tmp_path / "merged")), weights_of(str(tmp_path / "one"))
    assert merged.keys() == one.keys()
    for file, tensors in one.items():
        assert merged[file].keys() == tensors.keys()
        for name, value in tensors.items():
            assert merged[file][name].tobytes() == value.tobytes(), name
    assert merged["model.safetensors"]["lm_head.weight"].shape[0] == VOCAB


@pytest.fixture(scope="module")
def tp2_runs(xverse_dirs, tmp_path_factory):
    """Under TP2, in one launch: "step" (dense from HF and from a per-rank export, XVERSE-MoE) and
    "tokens.npz" (dense generation); name -> its output once the launch has run."""
    from mindport.ckpt_tools.convert import hf_to_mindport

    dense, moe = xverse_dirs
    root = str(tmp_path_factory.mktemp("tp2_runs"))
    export = os.path.join(root, "tp2_export")
    hf_to_mindport(dense, export, tp=2, progress=False)
    layout = json.dumps(dict(model_parallel=2))
    return shared_launches({
        "step": ("tp2", 2, [STEP_WORKER, f"{dense},{export},{moe}", os.path.join(root, "step"), layout]),
        "tokens.npz": ("tp2", 2, [GENERATE_WORKER, dense, os.path.join(root, "tokens.npz"), layout]),
    }, root)


@pytest.mark.slow
def test_tp2_step_equals_single_process(xverse_dirs, tp2_runs, tmp_path):
    """Logits, loss, gradient norm, gradients and one AdamW step; dense from the HF directory and from
    a per-rank export, XVERSE-MoE from the HF directory."""
    dense, moe = xverse_dirs
    single = str(tmp_path / "single")
    subprocess.run([sys.executable, STEP_WORKER, f"{dense},{moe}", single], check=True, capture_output=True)
    refs = [dict(np.load(os.path.join(single, str(k), "rank0.npz"))) for k in range(2)]
    out = tp2_runs("step")
    for k, ref in enumerate((refs[0], refs[0], refs[1])):
        dumps = rank_dumps(os.path.join(out, str(k)), 2)
        assert dumps[0]["logits"].shape[-1] == VOCAB  # the padding columns never leave the model
        assert_layout_equals_single_process(dumps, ref, dict(model_parallel=2))


@pytest.mark.slow
def test_tp2_generation_equals_single_process(xverse_dirs, tp2_runs, tmp_path):
    single = str(tmp_path / "single.npz")
    subprocess.run([sys.executable, GENERATE_WORKER, xverse_dirs[0], single], check=True, capture_output=True)
    ours, ref = np.load(tp2_runs("tokens.npz")), np.load(single)  # greedy tokens, and those of the int8-quantized model
    assert np.array_equal(ours["tokens"], ref["tokens"]) and np.array_equal(ours["int8_tokens"], ref["int8_tokens"])
