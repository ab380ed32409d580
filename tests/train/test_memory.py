"""The per-rank memory report: exact against built models, and shrinking as the PP, TP or ZeRO
degree doubles."""
import pytest

from mindport import AutoConfig, AutoModelForCausalLM, ParallelConfig
from mindport.config import parameter_shapes
from mindport.train.memory import format_memory_report, human_bytes, memory_report
from mindport.parallel.sharding import local_shape, rule_for, stages_of_param
from mindport.parallel.state import groups_for, coordinates, single_process

MB, SEQ = 2, 32


def nbytes(params) -> int:
    return sum(int(p.nbytes) for p in params)


def _numel(shape) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def _norm_elements(config) -> int:
    return sum(s[0] for name, s in parameter_shapes(config).items() if name.endswith("norm.weight"))


@pytest.fixture(scope="module")
def tiny():
    return AutoConfig.from_preset("telechat2-tiny-gqa")


@pytest.fixture(scope="module")
def wide(tiny):
    """Every split size divisible by 4, 8 equal layers: the halvings below are exact."""
    return tiny.replace(num_layers=8, hidden_size=128, num_heads=8, num_kv_heads=4, ffn_hidden_size=256,
                        vocab_size=512)


def test_parameter_bytes_equal_the_built_model(tiny):
    from mindspore import nn

    from mindport.train.zero import ZeroAdamW
    from mindport.train.amp import build_o2

    model = AutoModelForCausalLM.from_preset("telechat2-tiny-gqa")
    params = model.trainable_params()
    report = memory_report(tiny, ParallelConfig(), MB, SEQ)
    b = report["bytes"]
    assert report["parameter_count"] == sum(int(p.size) for p in params) == tiny.num_parameters()
    assert b["parameters"] == nbytes(params) and b["gradients"] == nbytes(params)  # fp32 model and grads
    adam = nn.AdamWeightDecay(params)
    assert b["optimizer.adam_m"] + b["optimizer.adam_v"] == nbytes(adam.moments1) + nbytes(adam.moments2)
    assert b["optimizer.master"] == 0

    zero = memory_report(tiny, ParallelConfig(optimizer_shard=True), MB, SEQ)["bytes"]
    assert zero["optimizer"] == ZeroAdamW(params, single_process()).state_bytes()  # one rank: m, v, master

    low, masters = build_o2(model)
    o2 = memory_report(tiny, ParallelConfig(), MB, SEQ, amp_level="O2")["bytes"]
    assert o2["parameters"] == nbytes(low.trainable_params())
    assert o2["optimizer.master"] == nbytes(masters.values())


@pytest.mark.parametrize("layout", [dict(pipeline_stage=2, micro_batch_num=2), dict(model_parallel=2),
                                    dict(model_parallel=2, pipeline_stage=2, micro_batch_num=2)])
def test_each_rank_of_a_layout_holds_what_its_built_stage_holds(tiny, layout):
    from mindport.models.causal_lm import CausalLM

    parallel = ParallelConfig(**layout)
    for rank in range(parallel.world_size):
        groups = groups_for(parallel, rank)  # no communication needed to build
        built = CausalLM(tiny, groups).trainable_params()
        report = memory_report(tiny, parallel, MB, SEQ, rank=rank)
        assert report["bytes"]["parameters"] == nbytes(built), (layout, rank)
        # and what the slicing tables say
        stage = coordinates(parallel, rank)["pp"]
        expected = 0
        for name, shape in parameter_shapes(tiny).items():
            if stage in stages_of_param(name, tiny.num_layers, parallel.pipeline_stage):
                expected += _numel(local_shape(name, shape, parallel.model_parallel))
        assert report["parameter_count"] == expected


def _ends(config, tp: int, stage: int, stages: int) -> int:
    """Elements of the embedding / final norm / head on this stage (they follow the stage split)."""
    total = 0
    for name, shape in parameter_shapes(config).items():
        if not name.startswith("layers.") and stage in stages_of_param(name, config.num_layers, stages):
            total += _numel(local_shape(name, shape, tp))
    return total


def _replicated_layer_elements(config, layers) -> int:
    total = 0
    for name, shape in parameter_shapes(config).items():
        if name.startswith("layers.") and int(name.split(".")[1]) in layers and rule_for(name).kind == "replicated":
            total += shape[0]
    return total


def test_pipeline_doubling_halves_the_layer_state_per_rank(wide):
    two = ParallelConfig(pipeline_stage=2, micro_batch_num=4)
    four = two.replace(pipeline_stage=4)
    for stage in range(4):
        r4 = memory_report(wide, four, MB, SEQ, rank=stage)
        r2 = memory_report(wide, two, MB, SEQ, rank=stage // 2)
        n4 = r4["parameter_count"] - _ends(wide, 1, stage, 4)
        n2 = r2["parameter_count"] - _ends(wide, 1, stage // 2, 2)
        assert 2 * n4 == n2 > 0
        for key, per_element in (("parameters", 4), ("gradients", 4), ("optimizer", 8)):
            assert r4["bytes"][key] - per_element * _ends(wide, 1, stage, 4) == \
                (r2["bytes"][key] - per_element * _ends(wide, 1, stage // 2, 2)) // 2, key
        assert r4["bytes"]["activations"] < r2["bytes"]["activations"]  # half the layers in flight


def test_tensor_parallel_doubling_halves_all_but_the_replicated_parameters(wide):
    for pp in (1, 2):
        two = ParallelConfig(model_parallel=2, pipeline_stage=pp, micro_batch_num=2, use_seq_parallel=True)
        four = two.replace(model_parallel=4)
        r2, r4 = memory_report(wide, two, MB, SEQ), memory_report(wide, four, MB, SEQ)
        replicated = _replicated_layer_elements(wide, r2["layers"]) + wide.hidden_size * (pp == 1)  # + final norm
        assert r4["parameter_count"] - replicated == (r2["parameter_count"] - replicated) // 2
        for key, per_element in (("parameters", 4), ("gradients", 4), ("optimizer", 8)):
            assert r4["bytes"][key] - per_element * replicated == (r2["bytes"][key] - per_element * replicated) // 2
        a2, a4 = r2["bytes"], r4["bytes"]
        for term in ("norm_inputs", "qkv", "attention", "attention_out", "mlp"):  # sequence parallel
            assert 2 * a4[f"activations.{term}"] == a2[f"activations.{term}"], term
        assert a4["activations.projection_inputs"] == a2["activations.projection_inputs"]  # gathered sequence
        assert a4["activations"] < a2["activations"]


def test_zero_doubling_halves_the_optimizer_state(wide):
    for amp in ("O0", "O2"):
        plain = memory_report(wide, ParallelConfig(data_parallel=2), MB, SEQ, amp_level=amp)["bytes"]
        two = memory_report(wide, ParallelConfig(data_parallel=2, optimizer_shard=True), MB, SEQ, amp_level=amp)
        four = memory_report(wide, ParallelConfig(data_parallel=4, optimizer_shard=True), MB, SEQ, amp_level=amp)
        b2, b4 = two["bytes"], four["bytes"]
        for key in ("optimizer.adam_m", "optimizer.adam_v", "optimizer.master", "optimizer"):
            assert b4[key] * 2 == b2[key], (amp, key)
        for key in ("parameters", "gradients", "activations"):  # ZeRO-1 shards the optimizer only
            assert b4[key] == b2[key] == plain[key]
        n = two["parameter_count"]
        assert b2["optimizer"] == 3 * 4 * n // 2  # m, v and the fp32 master, each over 2 ranks
        assert plain["optimizer"] == 8 * n + (4 * (n - _norm_elements(wide)) if amp == "O2" else 0)


def test_zero_pads_each_parameter_to_the_shard_count(tiny):
    three = memory_report(tiny, ParallelConfig(data_parallel=3, optimizer_shard=True), MB, SEQ)
    padded = sum(-(-_numel(s) // 3) for s in parameter_shapes(tiny).values())
    assert three["bytes"]["optimizer.adam_m"] == 4 * padded


def test_recompute_and_micro_batch_change_activations_only(wide):
    parallel = ParallelConfig()
    base = memory_report(wide, parallel, MB, SEQ)["bytes"]
    full = memory_report(wide, parallel, MB, SEQ, recompute=True)["bytes"]
    double = memory_report(wide, parallel, 2 * MB, SEQ)["bytes"]
    assert full["activations"] < base["activations"] and full["parameters"] == base["parameters"]
    assert double["activations"] == 2 * base["activations"]


def test_report_prints_name_value_lines(tiny):
    text = format_memory_report(memory_report(tiny, ParallelConfig(optimizer_shard=True), MB, SEQ, amp_level="O2"))
    lines = text.splitlines()
    assert lines[0].startswith("memory rank 0 ") and "sharded over 1 ranks" in lines[0]
    for key in ("parameters", "gradients", "  optimizer.adam_m", "  optimizer.master", "optimizer",
                "activations", "total"):
        assert any(line.startswith(key + ":") for line in lines), key
    assert human_bytes(1536) == "1.50 KiB" and human_bytes(12) == "12 B"


def test_flash_attention_keeps_softmax_statistics_and_a_mask_copy_not_the_probabilities(wide, monkeypatch):
    """mindport's Ascend attention is FlashAttentionScore (kernels.attention_ascend): it keeps (B, N, S, 8)
    fp32 softmax max and sum and the uint8 mask it is given, where the composite core keeps the S x S
    probabilities; an Ascend target picks it by default. The fp32 host mask is counted once."""
    from mindport import dispatch
    from mindport.config import ConfigError

    seq, tp = 512, 2
    parallel = ParallelConfig(model_parallel=tp)
    composite = memory_report(wide, parallel, MB, seq, "O2")
    flash = memory_report(wide, parallel, MB, seq, "O2", attention="flash")
    heads = wide.num_heads // tp
    assert composite["attention"] == "composite"  # CPU: the reference backend
    assert composite["bytes"]["activations.attention"] == MB * heads * seq * seq * (4 + 2)
    assert flash["bytes"]["activations.attention"] == MB * heads * seq * 64 + MB * seq * seq
    assert flash["bytes"]["activations.mask"] == composite["bytes"]["activations.mask"] == MB * seq * seq * 4
    assert flash["bytes"]["activations"] < composite["bytes"]["activations"]
    monkeypatch.setattr(dispatch, "device_target", lambda: "Ascend")
    assert memory_report(wide, parallel, MB, seq, "O2")["bytes"] == flash["bytes"]
    with pytest.raises(ConfigError, match="attention = 'sdpa'"):
        memory_report(wide, parallel, MB, seq, attention="sdpa")
