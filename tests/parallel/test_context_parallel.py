"""Context parallelism on real msrun processes (CPU): CP2 and CP4 with the ring and the all-gather
algorithms, and CP2 x TP2, on a tiny GQA TeleChat2 (training_seqlen 32, so sequences of 64-256
tokens also exercise the dynamic NTK RoPE built from the total length). Every layer's attention
output, the loss and every gradient equal the single-process model (<= 1e-5 relative, fp32);
so do the attention core's output and dq/dk/dv on random inputs, with the C++ and the reference
block operator, and compiled with ms.jit. Plus the zigzag layout helpers (fast, no msrun).
CP4 and CP2 x TP2 share one msrun launch."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from testkit.hf_models import llama_tiny, save_hf_dir, telechat_from_llama
from testkit.launch import assert_close, assert_replicas_identical, msrun, rank_dumps, shared_launches
from mindport import ConfigError
from mindport.parallel.context import (check_sequence_length, context_parallel_batch, zigzag_merge,
                                       zigzag_positions, zigzag_split)
from mindport.parallel.sharding import shard_slices

WORKER = os.path.join(os.path.dirname(__file__), "cp_worker.py")
LAYOUTS = {  # name: (parallel_config, total sequence lengths)
    "cp2": (dict(context_parallel=2), [128]),
    "cp4": (dict(context_parallel=4), [256]),
    "cp2_tp2": (dict(context_parallel=2, model_parallel=2), [64]),
}
ALGOS = ("ring", "all_gather")


# ------------------------------------------------------------------------------ layout (fast)
def test_zigzag_positions_balance_causal_work():
    cp, s = 4, 32
    held = [zigzag_positions(s, cp, r) for r in range(cp)]
    assert held[0].tolist() == [0, 1, 2, 3, 28, 29, 30, 31]
    assert sorted(np.concatenate(held).tolist()) == list(range(s))
    work = [int((pos[:, None] >= np.arange(s)[None]).sum()) for pos in held]  # visible (query, key) pairs
    assert len(set(work)) == 1


def test_zigzag_split_and_merge_round_trip():
    x = np.arange(3 * 24 * 2).reshape(3, 24, 2)
    for cp in (1, 2, 3):
        parts = [zigzag_split(x, cp, r, axis=1) for r in range(cp)]
        np.testing.assert_array_equal(zigzag_merge(parts, axis=1), x)


def test_batch_targets_are_shifted_before_the_split():
    ids = np.arange(2 * 16).reshape(2, 16)
    labels = ids.copy()
    labels[1, 5] = -100
    full_targets = np.concatenate([labels[:, 1:], np.full((2, 1), -100)], 1)
    for rank in range(2):
        share = context_parallel_batch(ids, 2, rank, labels)
        pos = zigzag_positions(16, 2, rank)
        np.testing.assert_array_equal(share.ids, ids[:, pos])
        np.testing.assert_array_equal(share.targets, full_targets[:, pos])
        np.testing.assert_array_equal(share.positions, np.broadcast_to(pos, (2, 8)))
        assert share.total_len == 16


def test_bad_sequence_length_is_a_config_error():
    with pytest.raises(ConfigError, match="sequence length 100 is not a multiple of 2 x context_parallel = 8"):
        context_parallel_batch(np.zeros((1, 100), np.int64), 4, 0)
    assert check_sequence_length(96, 4) == 12


# ------------------------------------------------------------------------------ msrun
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """HF dir of a tiny GQA TeleChat2 and the single-process dump for every sequence length."""
    hf_config, tensors = telechat_from_llama(llama_tiny(num_kv_heads=2, seed=5), training_seqlen=32)
    hf_dir = save_hf_dir(str(tmp_path_factory.mktemp("cp_hf")), hf_config, tensors)
    out = str(tmp_path_factory.mktemp("cp_single"))
    seqs = sorted({s for _, lens in LAYOUTS.values() for s in lens})
    subprocess.run([sys.executable, WORKER, hf_dir, out, ",".join(map(str, seqs))], check=True, capture_output=True)
    return hf_dir, dict(np.load(os.path.join(out, "rank0.npz")))


@pytest.fixture(scope="module")
def layout_runs(reference, tmp_path_factory):
    """name -> its output directory, once it has run (the runs of one world size share a launch)."""
    root = str(tmp_path_factory.mktemp("cp_layouts"))
    jobs = {}
    for name, (layout, seqs) in LAYOUTS.items():
        world = layout.get("context_parallel", 1) * layout.get("model_parallel", 1)
        jobs[name] = (f"world{world}", world, [WORKER, reference[0], os.path.join(root, name),
                                               ",".join(map(str, seqs)), json.dumps(layout)])
    return shared_launches(jobs, root)


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYOUTS)
def test_context_parallel_equals_single_process(reference, layout_runs, name):
    hf_dir, ref = reference
    layout, seqs = LAYOUTS[name]
    cp, tp = layout.get("context_parallel", 1), layout.get("model_parallel", 1)
    out = layout_runs(name)
    grad_names = [k.split(":", 3)[3] for k in ref if k.startswith(f"{seqs[0]}:single:grad:")]
    for rank in range(cp * tp):
        dump = dict(np.load(os.path.join(out, f"rank{rank}.npz")))
        cp_rank, tp_rank = int(dump["coord:cp"]), int(dump["coord:tp"])
        for seq in seqs:
            pos = zigzag_positions(seq, cp, cp_rank)
            single = f"{seq}:single:"
            for algo in ALGOS:
                key, where = f"{seq}:{algo}:", f"rank {rank} S={seq} {algo}"
                assert_close(dump[key + "loss"], ref[single + "loss"], f"{where} loss")
                for i in range(2):  # the layers' attention cores: this rank's heads and positions
                    full = ref[single + f"attn{i}"]
                    heads = full.shape[1] // tp
                    want = full[:, tp_rank * heads:(tp_rank + 1) * heads][:, :, pos]
                    assert_close(dump[key + f"attn{i}"], want, f"{where} layer {i} attention")
                assert {k[len(key) + 5:] for k in dump if k.startswith(key + "grad:")} == set(grad_names)
                for pname in grad_names:
                    full = ref[single + "grad:" + pname]
                    want = full[shard_slices(pname, full.shape, tp_rank, tp)]
                    assert_close(dump[key + "grad:" + pname], want, f"{where} grad {pname}")
                for backend in ("cpu", "reference", "jit"):
                    for part in ("out", "dq", "dk", "dv"):
                        want = ref[single + f"direct:reference:{part}"][:, :, pos]
                        assert_close(dump[key + f"direct:{backend}:{part}"], want,
                                     f"{where} attention core ({backend}) {part}")
    assert_replicas_identical(rank_dumps(out, cp * tp), kinds=("grad:",))  # synchronised: the next step agrees


@pytest.mark.slow
def test_bad_sequence_length_under_msrun_fails_before_any_work(reference, tmp_path):
    hf_dir, _ = reference
    with pytest.raises(AssertionError, match="sequence length 66 is not a multiple of 2 x context_parallel = 4"):
        msrun(WORKER, [hf_dir, str(tmp_path / "o"), "66", json.dumps(dict(context_parallel=2))], 2,
              str(tmp_path / "log"), timeout=180)
    assert not os.path.exists(tmp_path / "o")
