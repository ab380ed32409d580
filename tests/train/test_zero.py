"""Optimizer-state sharding (ZeRO-1, ``parallel_config.optimizer_shard``).

Single process: ZeroAdamW over one rank is MindSpore's nn.AdamWeightDecay (and, with
``bias_correction``, the trainer's AdamW, also under ``ms.jit``); the bucket packing round-trips with
padding. msrun (CPU): DP2, and DP2xTP2 with sequence parallelism, with sharded state give the
single-process loss, gradients, parameters and moments after each of two steps. DP2 feeds the
optimizer unsynchronised gradients (it reduce-scatters them) and, separately, gradients summed by
GradientSync; DP2xTP2-SP runs the reduce-scatter form compiled with ``ms.jit``.
"""
import json
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, Tensor, nn

from testkit.launch import assert_close, assert_replicas_identical, msrun, rank_dumps, single_process_dump
from mindport import ParallelConfig
from mindport.parallel.sharding import shard_slices
from mindport.parallel.state import single_process
from mindport.train.zero import ZeroAdamW, pack_rows, plan_buckets, shard_length, unpack_rows

WORKER = os.path.join(os.path.dirname(__file__), "zero_worker.py")
STEPS = 2
SHAPES = {"a.weight": (5, 3), "norm.gamma": (7,), "b.bias": (4,), "c.weight": (2, 3, 4)}


def make_params(seed: int = 1) -> list:
    rng = np.random.default_rng(seed)
    return [Parameter(Tensor(rng.standard_normal(s).astype(np.float32)), name=n) for n, s in SHAPES.items()]


def random_grads(rng) -> tuple:
    return tuple(Tensor(rng.standard_normal(s).astype(np.float32)) for s in SHAPES.values())


def assert_same(ours: list, ref: list) -> None:
    assert len(ours) == len(ref)
    for name, a, b in zip(SHAPES, ours, ref):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("grouped", [False, True])
def test_one_rank_equals_adam_weight_decay_over_three_steps(grouped):
    ours, ref = make_params(), make_params()
    if grouped:  # decay only the matrices, parameters listed in a different order than the groups
        def groups(ps):
            return [{"params": [ps[0], ps[3]], "weight_decay": 0.1}, {"params": [ps[1], ps[2]], "weight_decay": 0.0},
                    {"order_params": ps}]
        ours_arg, ref_arg = groups(ours), groups(ref)
    else:  # ungrouped: MindSpore decays every parameter without 'beta'/'gamma' in its name
        ours_arg, ref_arg = ours, ref
    hyper = dict(learning_rate=1e-2, weight_decay=0.1, eps=1e-4)
    reference = nn.AdamWeightDecay(ref_arg, **hyper)
    zero = ZeroAdamW(ours_arg, single_process(), **hyper)
    rng = np.random.default_rng(0)
    for _ in range(3):
        grads = random_grads(rng)
        reference(grads)
        zero(grads)
    assert_same(ours, ref)
    assert_same(zero.gather("m"), list(reference.moments1))
    assert_same(zero.gather("v"), list(reference.moments2))


def test_bias_corrected_under_jit_equals_trainer_adamw():
    from mindport.train.optim import AdamW

    ours, ref = make_params(), make_params()
    decay = [True, False, False, True]
    reference = AdamW(ref, decay, 0.9, 0.95, 1e-8, 0.1)
    zero = ZeroAdamW(ours, single_process(), beta2=0.95, eps=1e-8, weight_decay=0.1, decay=decay,
                     bias_correction=True)

    @ms.jit
    def step(grads, lr):
        return zero(grads, lr)

    rng = np.random.default_rng(0)
    for k in range(3):
        grads, lr = random_grads(rng), Tensor(1e-3 * (k + 1), ms.float32)
        reference(grads, lr)
        step(ms.mutable(grads), lr)
    assert_same(ours, ref)
    assert float(zero.step.asnumpy()) == 3.0


def test_fp16_parameters_update_from_fp32_master_slices():
    """O2: the optimizer keeps the fp32 masters (seeded from ``masters``) and writes fp16 copies back."""
    ref = make_params()
    low = [Parameter(p.astype(ms.float16), name=p.name) for p in make_params()]
    hyper = dict(learning_rate=1e-2, weight_decay=0.1, eps=1e-4)
    reference = nn.AdamWeightDecay(ref, **hyper)
    zero = ZeroAdamW(low, single_process(), **hyper, masters=make_params())
    rng = np.random.default_rng(0)
    for _ in range(3):
        grads = random_grads(rng)
        reference(grads)
        zero(grads)  # the trainer hands over fp32 gradients under O2 too
    assert_same(zero.gather("master"), ref)
    for p, r in zip(low, ref):
        assert p.dtype == ms.float16
        np.testing.assert_array_equal(p.asnumpy(), r.asnumpy().astype(np.float16))


def test_packing_round_trips_with_padding():
    rng = np.random.default_rng(0)
    tensors = [rng.standard_normal(s).astype(np.float32) for s in SHAPES.values()]
    parts = 3  # no size above divides by 3 except 15 and 24: padding on both sides of a bucket
    buckets = plan_buckets([t.size for t in tensors], parts, bucket_bytes=200)
    assert len(buckets) > 1 and [s.index for b in buckets for s in b] == list(range(len(tensors)))
    for bucket in buckets:
        rows = pack_rows([Tensor(tensors[s.index]) for s in bucket], bucket, parts)
        assert rows.shape == (parts, sum(shard_length(tensors[s.index].size, parts) for s in bucket))
        back = unpack_rows(rows, bucket, [tensors[s.index].shape for s in bucket])
        for slot, t in zip(bucket, back):
            np.testing.assert_array_equal(t.asnumpy(), tensors[slot.index])
        # row r holds elements [r L, (r + 1) L) of each flattened tensor
        slot = bucket[-1]
        flat = np.concatenate([tensors[slot.index].reshape(-1), np.zeros(parts * slot.length - slot.numel)])
        np.testing.assert_array_equal(rows.asnumpy()[1, slot.offset:slot.offset + slot.length],
                                      flat[slot.length:2 * slot.length])


def test_bad_arguments_fail_with_a_message():
    ps = make_params()
    with pytest.raises(ValueError, match="unsupported parameter-group key"):
        ZeroAdamW([{"params": ps, "lr": 0.1}], single_process())
    with pytest.raises(ValueError, match="2 decay flags for 4 parameters"):
        ZeroAdamW(ps, single_process(), decay=[True, False])


# ---------------------------------------------------------------------------- msrun
LAYOUTS = {  # name -> (layout, ways of feeding the gradients; see zero_worker.py)
    "dp2": (dict(data_parallel=2, optimizer_shard=True), ("scatter", "synced")),
    # sequence parallel: the norms' partial gradients are summed over tp before the dp reduce-scatter
    "dp2_tp2_sp": (dict(data_parallel=2, model_parallel=2, use_seq_parallel=True, optimizer_shard=True), ("jit",)),
}


@pytest.fixture(scope="module")
def reference(tiny_telechat_hf, tmp_path_factory):
    """HF dir of a tiny GQA TeleChat2 and the single-process run (plain nn.AdamWeightDecay)."""
    return tiny_telechat_hf, single_process_dump(WORKER, tiny_telechat_hf, str(tmp_path_factory.mktemp("single")))


def assemble(pieces: list[np.ndarray], shape: tuple) -> np.ndarray:
    """A local tensor from its dp slices (rank order), padding dropped."""
    return np.concatenate(pieces)[:int(np.prod(shape))].reshape(shape)


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYOUTS)
def test_sharded_optimizer_equals_single_process(reference, tmp_path, name):
    hf_dir, ref = reference
    layout, modes = LAYOUTS[name]
    world = ParallelConfig.from_dict(layout).world_size
    dp, tp = layout.get("data_parallel", 1), layout.get("model_parallel", 1)
    out = str(tmp_path / "out")
    msrun(WORKER, [hf_dir, out, json.dumps(layout), ",".join(modes)], world, str(tmp_path / "log"))
    dumps = rank_dumps(out, world)
    names = [k.split(":", 1)[1] for k in ref if k.startswith("s0/grad:")]
    by_tp = {}  # tp rank -> dumps in dp order
    for d in dumps:
        by_tp.setdefault(int(d["coord:tp"]), []).append(d)
    for tp_rank, ranks in by_tp.items():
        ranks.sort(key=lambda d: int(d["coord:dp"]))
        for mode in modes:
            for pname in names:
                index = shard_slices(pname, ref[f"s0/grad:{pname}"].shape, tp_rank, tp)
                local = ref[f"s0/grad:{pname}"][index].shape
                length = shard_length(int(np.prod(local)), dp)
                for k in range(STEPS):
                    what = f"{name} {mode} tp{tp_rank} step {k} {pname}"
                    if mode != "synced":
                        pieces = [d[f"{mode}/s{k}/gshard:{pname}"] for d in ranks]
                        assert all(p.shape == (length,) for p in pieces), what
                        assert_close(assemble(pieces, local), ref[f"s{k}/grad:{pname}"][index], what + " grad")
                    for d in ranks:
                        if mode == "synced":
                            assert_close(d[f"{mode}/s{k}/grad:{pname}"], ref[f"s{k}/grad:{pname}"][index],
                                         what + " grad")
                        assert_close(d[f"{mode}/s{k}/param:{pname}"], ref[f"s{k}/param:{pname}"][index],
                                     what + " param")
                for state in ("m", "v"):
                    pieces = [d[f"{mode}/{state}shard:{pname}"] for d in ranks]
                    assert all(p.shape == (length,) for p in pieces)  # the state really is sharded
                    assert_close(assemble(pieces, local), ref[f"{state}:{pname}"][index], f"{mode} {state} {pname}")
                    for d in ranks:
                        assert_close(d[f"{mode}/{state}:{pname}"], ref[f"{state}:{pname}"][index],
                                     f"{mode} gathered {state} {pname}")
    for d in dumps:
        for mode in modes:
            for k in range(STEPS):
                assert_close(d[f"{mode}/s{k}/loss"], ref[f"s{k}/loss"], f"{mode} step {k} loss")
    seen = {k.split(":", 1)[1] for d in dumps for k in d if k.startswith(f"{modes[0]}/s0/param:")}
    assert seen == set(names)
    assert_replicas_identical(dumps, kinds=("param:", "/m:", "/v:"))
