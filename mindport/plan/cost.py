"""The planner's cost model: step time, tokens/s and MFU of a layout on Ascend 910B NPUs.

Every hardware constant and every efficiency constant is in this module, named, with its source;
one set serves every model and every layout. Nothing here ran on an NPU (none was reachable):
the hardware figures are published ones, the efficiency constants were calibrated against the
four published runs in ``../shared/ASCEND.md`` (``CALIBRATION`` in :mod:`mindport.plan.planner`,
pinned by ``tests/plan/test_calibration.py``).

Hardware (:data:`ATLAS_800T_A2`): one node = 8 Ascend 910B, 64 GB HBM each, full-mesh HCCS inside
the node, one 200 GbE RoCE port per NPU between nodes. No Huawei datasheet was retrievable while
this was written: the figures are the ones published for the 910B on the pages named beside each
(secondary sources), cross-checked where a measurement exists. The published runs used: TeleChat2-115B
(mindformers) an Atlas 800T A2 cluster; Mixtral-8x7B and Llama2-70B (MindSpeed-LLM) an Atlas 900
A2 PoDc, a rack of the same 8 x 910B nodes. The model assumes the same chip (the 313 TFLOP/s
910B of the Atlas 800T A2) for all four.

Calibration: MATMUL_EFFICIENCY, COMM_EFFICIENCY and VECTOR_BYTES_PER_TOKEN are set near what large
GEMMs and collectives reach; ATTENTION_EFFICIENCY was then fitted: the three training runs differ
mostly in their attention share (Llama2-70B at 4K 4%, TeleChat2-115B at 8K 6%, Mixtral at 32K 34% of
the FLOPs), and only an attention core at about 10% of peak (forward; its backward 2x) puts all three
within 20% (0.93, 0.97, 1.15). It is the least certain constant: long-sequence predictions inherit
it. COLLECTIVE_LATENCY_S and DECODE_HBM_EFFICIENCY were fitted to the TeleChat2-115B decode figure.

Training step of one layout (per rank of the busiest pipeline stage; T = b s / cp tokens of a
micro-batch on a rank, t = tp):

compute
    Forward matmul FLOPs per token 2 x (the rank's weights a token meets: q/k/v/o, MLP or the
    top-k experts + shared expert + router, the head on the last stage), divided by t; causal
    attention 2 s n d / t per token and layer (QK^T and PV over s/2 keys on average: flash
    attention skips masked blocks). Backward = 2 x forward (input and weight gradients; LoRA:
    input gradients only, 1 x). Recompute adds forward passes: ``full`` one per layer, ``selective``
    the attention core (mindformers' select_recompute), and mindport's 1F1B (pp > 1) reruns every
    micro-batch's forward inside its backward (:mod:`mindport.parallel.schedules`), a layer-level
    recompute on top of that a third forward. A GEMM of shape (M, K, N) runs at
    ``MATMUL_EFFICIENCY * x / (x + MATMUL_HALF_DIM)`` of peak, x = min(M, K, N) (narrow tensor-
    parallel shards run slower); attention at ``ATTENTION_EFFICIENCY``; norms, SwiGLU, RoPE and
    residual adds are memory-bound: ``VECTOR_BYTES_PER_TOKEN`` x h bytes per token and layer at HBM
    speed.
communication (ring algorithms; HCCS inside a node, RoCE when a group spans nodes)
    tensor parallel: 2 all-reduces per layer forward (reduce-scatter + all-gather under sequence
    parallelism: same bytes), 2 backward, 2 per recomputed forward; exposed unless the
    implementation overlaps them (``tp_overlap``). Context parallel (ring): cp - 1 K/V hops per
    layer forward, twice that backward, hidden behind the attention core. Expert parallel: 2
    all-to-alls forward (dispatch, combine) and 2 backward of T k h bytes, exposed. Pipeline: one
    activation forward and one gradient backward per micro-batch and stage boundary, exposed.
    Data parallel: gradient all-reduce (fp32, over dp x cp; expert weights over dp / ep),
    reduce-scatter + all-gather under ZeRO; exposed in mindport (after the backward), hidden
    behind the last micro-batch's backward where the implementation overlaps it.
pipeline bubble
    1F1B: (pp - 1) x (forward + backward of one micro-batch); interleaved with v chunks per stage:
    divided by v.
optimizer
    AdamW reads and writes parameters, gradients, m, v and the fp32 master copy: bytes / HBM speed.
    Under LoRA the gradient reduction and the optimizer step cover only what the ``pet_config``
    trains (adapters and ``modules_to_save``, the memory report's accounting).

Decoding (``--mode infer``), per token step at batch B: the weights and the KV cache read once at
``DECODE_HBM_EFFICIENCY`` of HBM speed (or the matmuls, if slower), plus 2 tensor-parallel
all-reduces per layer at ``COLLECTIVE_LATENCY_S`` each.
"""
from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------- hardware
ATLAS_800T_A2_SOURCE = "https://e.huawei.com/en/products/computing/ascend/atlas-800t-a2"
ARTHURCHIAO_910B_SOURCE = "https://arthurchiao.art/blog/gpu-advanced-notes-2-zh/"


@dataclass(frozen=True)
class Hardware:
    """One node type: ``npus_per_node`` NPUs, each with these figures (bytes, bytes/s, FLOP/s)."""

    name: str
    chip: str
    peak_flops: float  # dense fp16/bf16 matmul
    hbm_bytes: float
    hbm_bandwidth: float
    hccs_links: int  # links from one NPU to the others of its node (full mesh: one per peer)
    hccs_link_bandwidth: float  # one direction, one link
    roce_bandwidth: float  # one direction, one NPU's NIC
    npus_per_node: int = 8


ATLAS_800T_A2 = Hardware(
    name="Atlas 800T A2",
    chip="Ascend 910B",
    # 8 NPUs, 2.5 PFLOPS FP16 per server (ATLAS_800T_A2_SOURCE) -> 313 TFLOP/s per NPU, bf16 the same;
    # a measured 4096^3 fp16 matmul reaches 315 TFLOP/s on a 910B2 (a higher-clocked 910B:
    # https://github.com/zzc0721/torch-performance-test-data/issues/109).
    peak_flops=313e12,
    hbm_bytes=64e9,  # 64 GB HBM2e per NPU (ATLAS_800T_A2_SOURCE; ai.gitee.com/docs/compute/clusters_gpu/ascend_gpu)
    hbm_bandwidth=1.6e12,  # 1.6 TB/s (ARTHURCHIAO_910B_SOURCE, 910B spec table)
    hccs_links=7,  # full mesh of 8: one HCCS link to each peer (ARTHURCHIAO_910B_SOURCE)
    hccs_link_bandwidth=56e9,  # 56 GB/s per link, 392 GB/s per NPU (ARTHURCHIAO_910B_SOURCE)
    roce_bandwidth=25e9,  # one 200 GbE RoCE port per NPU = 25 GB/s (ATLAS_800T_A2_SOURCE: 8 x 200GE)
)

# ------------------------------------------------------------------------------ efficiencies (calibrated)
# Calibrated once against the four published runs (see the module docstring); the same values for
# every model, layout and implementation.
MATMUL_EFFICIENCY = 0.80  # large-GEMM fraction of peak_flops
MATMUL_HALF_DIM = 128  # a GEMM whose smallest dimension is 128 runs at half MATMUL_EFFICIENCY
ATTENTION_EFFICIENCY = 0.10  # attention core (FlashAttentionScore) fraction of peak: fitted (module docstring)
VECTOR_BYTES_PER_TOKEN = 40  # HBM bytes x hidden per token and layer of norms, SwiGLU, RoPE, adds (fwd)
COMM_EFFICIENCY = 0.70  # achieved fraction of a link's bandwidth in a large collective
COLLECTIVE_LATENCY_S = 60e-6  # one small collective (decode all-reduce), launch + sync
DECODE_HBM_EFFICIENCY = 0.75  # achieved fraction of HBM bandwidth streaming weights while decoding
ADAM_BYTES_PER_PARAM = 32  # AdamW O2: read p(2) g(4) m v master(4 each), write p m v master
# What the memory report leaves out (kernel workspaces, the allocator's fragmentation, the CANN runtime's
# and HCCL's reserved buffers: a few GB per NPU): a layout fits when the report's largest rank stays
# within this fraction of HBM (54.4 GB of 64 GB), leaving 9.6 GB for them.
MEMORY_BUDGET = 0.85


@dataclass(frozen=True)
class Implementation:
    """What a training implementation does that the cost model sees (its documented features)."""

    name: str
    runnable: bool  # mindport runs it
    interleave: bool  # interleaved (virtual) pipeline stages
    pipeline_forward_recompute: bool  # 1F1B reruns each micro-batch's forward in its backward
    tp_overlap: float  # fraction of tensor-parallel communication hidden behind matmuls
    dp_overlap: bool  # gradient reduction overlapped with the last micro-batch's backward


MINDPORT = Implementation("mindport", runnable=True, interleave=False, pipeline_forward_recompute=True,
                          tp_overlap=0.0, dp_overlap=False)
# mindformers (MindSpore graph mode, the TeleChat2-115B run): interleaved stages, no TP overlap
MINDFORMERS = Implementation("mindformers", runnable=False, interleave=True, pipeline_forward_recompute=False,
                             tp_overlap=0.0, dp_overlap=True)
# MindSpeed-LLM (Megatron-core on torch_npu): interleaved stages, --overlap-grad-reduce, --use-mc2
# (matmul fused with its TP collective; half of it taken as hidden)
MINDSPEED = Implementation("MindSpeed-LLM", runnable=False, interleave=True, pipeline_forward_recompute=False,
                           tp_overlap=0.5, dp_overlap=True)


def gemm_efficiency(m: float, k: float, n: float) -> float:
    x = min(m, k, n)
    return MATMUL_EFFICIENCY * x / (x + MATMUL_HALF_DIM)


def group_bandwidth(hw: Hardware, size: int, stride: int) -> float:
    """Per-rank bandwidth (bytes/s) of a ring collective over ``size`` ranks ``stride`` apart."""
    if size * stride <= hw.npus_per_node:  # inside one node: every peer over its own HCCS link
        return min(size - 1, hw.hccs_links) * hw.hccs_link_bandwidth * COMM_EFFICIENCY
    return hw.roce_bandwidth * COMM_EFFICIENCY


def all_gather_time(hw: Hardware, nbytes: float, size: int, stride: int) -> float:
    """All-gather (or reduce-scatter) of a ``nbytes`` full tensor over the group."""
    if size == 1:
        return 0.0
    return (size - 1) / size * nbytes / group_bandwidth(hw, size, stride)


@dataclass(frozen=True)
class Layout:
    """A training layout: degrees, micro-batching, recompute, ZeRO, and whose implementation runs it.

    micro_batch: sequences per micro-batch (``batch_size``); micro_batches: per step and data-parallel
    rank (pipeline: ``micro_batch_num``; without: gradient accumulation); interleave: pipeline chunks
    per stage (1: plain 1F1B); recompute: ``none`` | ``selective`` | ``full``; offset: mindformers'
    per-stage layer offsets (``ParallelConfig.offset``).
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    sequence_parallel: bool = False
    micro_batch: int = 1
    micro_batches: int = 1
    interleave: int = 1
    recompute: str = "none"
    zero: bool = False
    implementation: Implementation = MINDPORT
    offset: int | tuple[int, ...] = 0

    @property
    def npus(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    def describe(self) -> str:
        parts = [f"dp{self.dp}", f"tp{self.tp}", f"pp{self.pp}"]
        parts += [f"cp{self.cp}"] * (self.cp > 1) + [f"ep{self.ep}"] * (self.ep > 1)
        parts += ["sp"] * self.sequence_parallel + [f"vpp{self.interleave}"] * (self.interleave > 1)
        parts += [f"mb{self.micro_batch}x{self.micro_batches}", f"rc-{self.recompute}"] + ["zero"] * self.zero
        if self.offset:
            parts.append("offset" + ",".join(map(str, self.offset)))
        return " ".join(parts)


def _layer_gemms(config, tokens: float, tp: int, ep: int) -> list[tuple[float, float, float, float]]:
    """(flops, m, k, n) of one layer's forward GEMMs on one rank for ``tokens`` tokens."""
    h, d = config.hidden_size, config.head_dim
    n, n_kv = config.num_heads // tp, config.num_kv_heads // tp
    out = [(2 * tokens * h * (n + 2 * n_kv) * d, tokens, h, (n + 2 * n_kv) * d),
           (2 * tokens * n * d * h, tokens, n * d, h)]
    if config.is_moe:
        e, k, inner = config.num_experts, config.moe_top_k, config.moe_intermediate_size // tp
        out.append((2 * tokens * h * e, tokens, h, e))  # router (replicated over tp)
        per_expert = max(tokens * k / e, 1.0)  # tokens an expert sees (balanced routing)
        out += [(2 * tokens * k * h * inner * 3, per_expert, h, inner)]  # gate, up, down of the k experts
        if config.shared_expert_intermediate_size:
            shared = config.shared_expert_intermediate_size // tp
            out.append((2 * tokens * h * shared * 3, tokens, h, shared))
    else:
        inner = config.ffn_hidden_size // tp
        out.append((2 * tokens * h * inner * 3, tokens, h, inner))
    return out


def _gemm_time(hw: Hardware, gemms) -> float:
    return sum(f / (hw.peak_flops * gemm_efficiency(m, k, n)) for f, m, k, n in gemms)


def train_step(config, layout: Layout, seq_length: int, hw: Hardware = ATLAS_800T_A2, lora=None) -> dict:
    """Predicted step time of ``layout`` training ``config`` on sequences of ``seq_length`` tokens
    (``lora``: a :class:`~mindport.config.LoraConfig`, only its adapters and saved modules train).

    Returns seconds per step split into ``compute``, ``communication`` (exposed), ``bubble`` and
    ``optimizer``, plus ``step``, ``tokens_per_s_per_npu`` and ``mfu``.
    """
    from mindport.config import stage_layer_counts
    from mindport.train.flops import matmul_params, train_flops_per_token

    impl, L = layout.implementation, layout
    if L.interleave > 1 and not impl.interleave:
        raise ValueError(f"layout {L.describe()}: {impl.name} has no interleaved pipeline stages")
    t, cp, pp, v = L.tp, L.cp, L.pp, L.interleave
    tokens = L.micro_batch * seq_length / cp  # one micro-batch on one rank
    h, a = config.hidden_size, 2  # activations in fp16/bf16

    # one layer, one micro-batch, forward
    layer_gemm = _gemm_time(hw, _layer_gemms(config, tokens, t, L.ep))
    attention = 2 * tokens * (seq_length / 2) * (config.num_heads // t) * config.head_dim * 2  # QK^T + PV, causal
    attention_time = attention / (hw.peak_flops * ATTENTION_EFFICIENCY)
    vector_time = VECTOR_BYTES_PER_TOKEN * tokens * h / (t if L.sequence_parallel else 1) / hw.hbm_bandwidth
    forward = layer_gemm + attention_time + vector_time
    backward_gemm = 1.0 if lora else 2.0
    backward = backward_gemm * layer_gemm + 2 * attention_time + 2 * vector_time
    if pp > 1 and impl.pipeline_forward_recompute:
        recompute_passes = 1.0 + (L.recompute == "full")
    else:
        recompute_passes = 1.0 if L.recompute == "full" else 0.0
    recompute = recompute_passes * forward + (attention_time if L.recompute == "selective" else 0.0)

    # tensor-parallel communication per layer (2 collectives forward, 2 backward, 2 per rerun forward)
    tp_collective = all_gather_time(hw, tokens * h * a, t, 1) * 2  # an all-reduce = reduce-scatter + all-gather
    tp_comm = 2 * tp_collective * (2 + recompute_passes) * (1 - impl.tp_overlap)
    # expert parallelism: all-to-all dispatch + combine, forward and backward
    ep_comm = 0.0
    if config.is_moe and L.ep > 1:
        stride = pp * cp * t
        volume = tokens * config.moe_top_k * h * a * (L.ep - 1) / L.ep  # leaves each rank
        ep_comm = 2 * (2 + recompute_passes) * volume / group_bandwidth(hw, L.ep, stride)
    # context-parallel ring: K/V blocks, hidden behind the attention core
    cp_comm = 0.0
    if cp > 1:
        kv_block = tokens * 2 * (config.num_kv_heads // t) * config.head_dim * a
        ring = (cp - 1) * kv_block / group_bandwidth(hw, 2, t)
        cp_comm = max(0.0, 3 * ring - 3 * attention_time)

    per_layer = forward + backward + recompute
    vocab = -(-config.vocab_size // t)  # the last stage's head and loss, forward + backward
    head = 2 * tokens * h * vocab * (1 + backward_gemm) / (hw.peak_flops * gemm_efficiency(tokens, h, vocab))
    counts = stage_layer_counts(config.num_layers, pp, L.offset)
    micro_batch_time = max(c * per_layer + head * (k == pp - 1) for k, c in enumerate(counts))  # slowest stage
    layers = max(counts)
    comm_per_micro_batch = layers * (tp_comm + ep_comm + cp_comm)
    if pp > 1:  # activation forward, gradient backward, one hop per micro-batch
        p2p = 2 * tokens * h * a / (t if L.sequence_parallel else 1)
        stride = cp * t
        link = hw.roce_bandwidth if stride >= hw.npus_per_node else hw.hccs_link_bandwidth
        comm_per_micro_batch += p2p / (link * COMM_EFFICIENCY)
    m = L.micro_batches
    compute = m * micro_batch_time
    bubble = (pp - 1) / v * (micro_batch_time + comm_per_micro_batch) if pp > 1 else 0.0
    communication = m * comm_per_micro_batch

    # data-parallel gradient reduction and the optimizer step
    trainable = local_parameter_count(config, layout, lora)
    experts = 0  # expert weights on this rank: reduced over dp / ep (the ranks holding the same experts)
    if config.is_moe and lora is None:
        experts = counts[0] * 3 * h * (config.moe_intermediate_size // t) * (config.num_experts // L.ep)
    stride = pp * t if cp == 1 else t
    dp_comm = 0.0
    for elements, group in ((trainable - experts, L.dp * cp), (experts, L.dp // L.ep * cp)):
        if group > 1:  # fp32 gradients: all-reduce 2 x, or ZeRO's reduce-scatter (4 B) + param all-gather (2 B)
            volume = 4 * elements * (1.5 if L.zero else 2.0) * (group - 1) / group
            dp_comm += volume / group_bandwidth(hw, group, stride)
    if impl.dp_overlap:
        dp_comm = max(0.0, dp_comm - layers * backward)
    communication += dp_comm
    optimizer = ADAM_BYTES_PER_PARAM * trainable / (L.dp if L.zero else 1) / hw.hbm_bandwidth

    step = compute + communication + bubble + optimizer
    tokens_per_step = L.dp * m * L.micro_batch * seq_length
    per_npu = tokens_per_step / step / layout.npus
    model_flops = train_flops_per_token(config, seq_length, causal=True)
    if lora:
        model_flops -= 2 * matmul_params(config)  # no weight gradients for the frozen base
    return {"compute": compute, "communication": communication, "bubble": bubble, "optimizer": optimizer,
            "step": step, "tokens_per_step": tokens_per_step, "tokens_per_s_per_npu": per_npu,
            "mfu": per_npu * model_flops / hw.peak_flops}


def parallel_config(layout: Layout):
    """The :class:`mindport.config.ParallelConfig` of ``layout`` (its mindformers keys)."""
    from mindport.config import ParallelConfig

    return ParallelConfig(data_parallel=layout.dp, model_parallel=layout.tp, pipeline_stage=layout.pp,
                          context_parallel=layout.cp, expert_parallel=layout.ep,
                          micro_batch_num=layout.micro_batches if layout.pp > 1 else 1,
                          use_seq_parallel=layout.sequence_parallel, optimizer_shard=layout.zero,
                          offset=list(layout.offset) if layout.offset else 0)


def local_parameter_count(config, layout: Layout, lora=None) -> int:
    """Trained parameter elements on the first rank (first pipeline stage, its tp/ep shard): all of
    them, or under ``lora`` the adapters and saved modules only."""
    from mindport.models.lora import trained_shapes
    from mindport.train.memory import local_parameters

    local = local_parameters(config, parallel_config(layout), pipeline_offset=layout.offset, lora=lora)
    trained = local.keys() if lora is None else local.keys() & trained_shapes(config, lora).keys()
    total = 0
    for shape in (local[name] for name in trained):
        n = 1
        for x in shape:
            n *= x
        total += n
    return total


def kv_bytes_per_token(config, tp: int) -> int:
    """KV-cache bytes one token adds on one tensor-parallel rank (fp16/bf16 keys and values)."""
    return 2 * config.num_layers * (config.num_kv_heads // tp) * config.head_dim * 2


def decode_step(config, tp: int, batch: int, context: int, weight_bytes: float,
                hw: Hardware = ATLAS_800T_A2) -> dict:
    """Seconds of one decoding step (one new token for each of ``batch`` sequences holding ``context``
    tokens) on a tensor-parallel group of ``tp``; ``weight_bytes``: the weights one rank holds."""
    from mindport.train.flops import matmul_params

    read = weight_bytes + batch * context * kv_bytes_per_token(config, tp)
    memory = read / (hw.hbm_bandwidth * DECODE_HBM_EFFICIENCY)
    flops = 2 * batch * (matmul_params(config) + 2 * config.num_layers * config.num_heads * config.head_dim * context) / tp
    compute = flops / (hw.peak_flops * gemm_efficiency(batch, config.hidden_size, config.hidden_size / tp))
    communication = 0.0
    if tp > 1:
        per_collective = COLLECTIVE_LATENCY_S + 2 * batch * config.hidden_size * 2 / group_bandwidth(hw, tp, 1)
        communication = 2 * config.num_layers * per_collective
    step = max(memory, compute) + communication
    return {"memory": memory, "compute": compute, "communication": communication, "step": step,
            "tokens_per_s": batch / step}
