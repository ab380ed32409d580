"""Per-rank training memory: parameters, gradients, optimizer states and peak activations.

Computed from the configs alone (nothing is built), for the rank ``rank`` of the layout.

Parameters, gradients, optimizer states (exact, from the same tables the model uses)
    The rank's parameters are those of its pipeline stage (``stages_of_param``: the embedding on
    the first stage, final norm and head on the last), each of its tensor/expert-parallel local
    shape (``local_shape``); ``parameter_shapes`` lists the model's parameters without building it.

    - parameters: ``param_dtype`` bytes; under O2 the compute dtype (2 bytes) except the RMSNorm
      weights, which stay fp32 (``mindport.train.amp``).
    - gradients: 4 bytes per local element (the trainer accumulates fp32 gradients).
    - LoRA (``lora``): the adapters (A (r, in), B (out, r), split as the slicing table says) and
      ``modules_to_save`` are trained; the frozen base has parameters only (no gradient, moments
      or master). ``parameters.trainable`` / ``parameters.frozen`` split the parameter bytes.
    - optimizer, replicated AdamW: m and v, 4 bytes per element each, and a 4-byte fp32 master
      copy of every parameter that is not fp32 (O2).
    - optimizer, ``optimizer_shard`` (ZeRO-1, :mod:`mindport.train.zero`): m, v and the fp32
      master, each 4 bytes x ceil(n / parts) per parameter, parts = data_parallel (expert
      weights under expert parallelism: data_parallel / expert_parallel).

Peak activations (an estimate, per micro-batch of b sequences)
    Notation: s = seq_len / cp tokens a rank holds per sequence, h hidden, n and n_kv heads,
    d head dim, F ffn width, V vocabulary, t = model_parallel, p = t under sequence parallelism
    (else 1), a = bytes of an activation (2 under O2 or a 16-bit compute dtype, else 4: O1 keeps
    the residual stream, norms and softmax in fp32). What each layer keeps for its backward pass:

        norm inputs (residual stream)  2 b s h a / p
        projection inputs              2 b s h a        (normed x entering q/k/v and gate/up; full
                                                         sequence, gathered under sequence parallel)
        q, k, v after RoPE             b s (n + 2 n_kv) d a / t
        attention (``composite``)      b (n/t) s s_k (4 + a [a != 4])   probabilities: fp32 softmax
                                                         output, plus its copy in the compute dtype
        attention (``flash``)          b (n/t) s 64     FlashAttentionScore's softmax max and sum,
                                                         (B, N, S, 8) fp32 each, no probabilities
                                       + b s s_k        the uint8 copy of the mask each layer makes
                                                         for it (kept for FlashAttentionScoreGrad)
        attention output               b s n d a / t    (o_proj input)
        dense MLP                      3 b s F a / t    (gate, up, silu(gate) * up)
        MoE MLP                        4 b s E + b s k c (h + 3 I / t) a + 3 b s I_sh a / t
                                       (fp32 router logits; routed slots, c = capacity_factor or 1,
                                       their inputs and expert gate/up/product; the shared expert)

    ``attention`` names mindport's attention core on the target (the ``attention`` op of
    :mod:`mindport.dispatch`): ``composite`` is the reference backend (CPU, and any device without a
    fused kernel), ``flash`` the Ascend backend (``FlashAttentionScore``; UNEXECUTED, no NPU was
    reachable). The default follows the device MindSpore targets (``flash`` on Ascend); the planner
    plans for the 910B and passes ``flash``.

    s_k = s, except context parallelism: ``all_gather`` attends over the whole sequence
    (s_k = cp s) and ``ring`` keeps no probabilities, only a 4-byte log-sum-exp per query and head
    (either attention), and neither uses the mask.
    The attention mask the host builds, (B, 1, s, s) fp32, adds b s s 4 once per micro-batch
    (``activations.mask``; cp = 1 only: context parallelism passes none).
    The last stage adds the final norm and head inputs (b s h a / p + b s h a) and the logits:
    b s (V/t) (12 + a [a != 4]) (fp32 logits, and the softmax and one-hot the vocab-parallel
    cross-entropy builds in its backward).

    A recomputed layer keeps only its input (b s h a / p) and rebuilds the rest in its backward,
    so with any recomputed layer one full layer is added once. Micro-batches in flight: without
    pipeline parallelism one at a time (gradient accumulation is sequential). With it, stage k of P
    holds min(P - k, micro_batch_num) micro-batches, and mindport's 1F1B schedule keeps only their
    stage inputs (b s h a / p each), recomputing each micro-batch's forward inside its backward
    (:mod:`mindport.parallel.schedules`): peak = in-flight inputs + one micro-batch's activations.

    Not counted: temporaries of single kernels, the allocator's fragmentation and workspace,
    communication buffers (the emulated collectives on CPU allocate full-size zeros) and the RoPE
    tables.
"""
from __future__ import annotations

from mindport import dispatch
from mindport.config import ConfigError, ModelConfig, ParallelConfig, parameter_shapes
from mindport.dtypes import itemsize
from mindport.models.lora import trained_shapes
from mindport.parallel.pipeline import stage_layers
from mindport.parallel.sharding import is_norm, local_shape, rule_for, stages_of_param, vocab_block
from mindport.parallel.state import coordinates
from mindport.train.zero import shard_length

ATTENTION_KINDS = ("composite", "flash")


def default_attention() -> str:
    """The attention core mindport runs on this device: ``flash`` on Ascend, else ``composite``."""
    return "flash" if dispatch.device_target() == "Ascend" else "composite"


def _check_attention(attention: str) -> None:
    if attention not in ATTENTION_KINDS:
        raise ConfigError(f"attention = {attention!r}: expected one of {', '.join(map(repr, ATTENTION_KINDS))}")

def _numel(shape) -> int:
    n = 1
    for x in shape:
        n *= int(x)
    return n


def local_parameters(config: ModelConfig, parallel: ParallelConfig, rank: int = 0,
                     pipeline_offset=None, lora=None) -> dict[str, tuple[int, ...]]:
    """name -> local shape of every parameter rank ``rank`` holds (its stage, its tp/ep shard),
    LoRA adapters included when ``lora`` is given."""
    coords = coordinates(parallel, rank)
    shapes = parameter_shapes(config)
    if lora is not None:
        shapes.update(trained_shapes(config, lora))
    out = {}
    for name, shape in shapes.items():
        if coords["pp"] in stages_of_param(name, config.num_layers, parallel.pipeline_stage, pipeline_offset):
            out[name] = local_shape(name, shape, parallel.model_parallel, parallel.expert_parallel,
                                    config.vocab_pad_multiple, coords["tp"])
    return out


def _activation_bytes(config: ModelConfig, amp_level: str) -> int:
    if amp_level == "O2" or config.compute_dtype != "float32":
        return 2
    return 4


def layer_activation_terms(config: ModelConfig, parallel: ParallelConfig, micro_batch: int, seq_len: int,
                           amp_level: str = "O0", attention: str = "composite") -> dict[str, int]:
    """Bytes one decoder layer keeps for its backward pass, per term (see the module docstring)."""
    _check_attention(attention)
    a = _activation_bytes(config, amp_level)
    t, cp = parallel.model_parallel, parallel.context_parallel
    p = t if parallel.use_seq_parallel and t > 1 else 1
    b, s, h, d = micro_batch, seq_len // cp, config.hidden_size, config.head_dim
    n, n_kv = config.num_heads // t, config.num_kv_heads // t
    extra_copy = a if a != 4 else 0
    if cp > 1 and parallel.context_parallel_algo == "ring":  # no probabilities, one log-sum-exp per query and head
        probs = b * n * s * 4
    else:
        s_k = s if cp == 1 else cp * s
        probs = b * n * s * 64 + b * s * s_k if attention == "flash" else b * n * s * s_k * (4 + extra_copy)
    terms = {
        "norm_inputs": 2 * b * s * h * a // p,
        "projection_inputs": 2 * b * s * h * a,
        "qkv": b * s * (n + 2 * n_kv) * d * a,
        "attention": probs,
        "attention_out": b * s * n * d * a,
    }
    if config.is_moe:
        slots = b * s * config.moe_top_k * (config.capacity_factor or 1.0)
        terms["mlp"] = int(4 * b * s * config.num_experts
                           + slots * (h + 3 * config.moe_intermediate_size // t) * a
                           + 3 * b * s * config.shared_expert_intermediate_size // t * a)
    else:
        terms["mlp"] = 3 * b * s * (config.ffn_hidden_size // t) * a
    return terms


def memory_report(config: ModelConfig, parallel: ParallelConfig, micro_batch: int, seq_len: int,
                  amp_level: str = "O0", recompute: bool | int = False, rank: int = 0,
                  pipeline_offset=None, lora=None, attention: str | None = None) -> dict:
    """Memory of rank ``rank`` when training ``config`` under ``parallel``.

    micro_batch: sequences per micro-batch on one data-parallel rank (``TrainConfig.batch_size``);
    seq_len: tokens per sequence before context-parallel splitting; amp_level: O0 | O1 | O2;
    recompute: True (every layer), N (the first N layers of the stage) or False; lora: a
    :class:`~mindport.config.LoraConfig` (only the adapters and saved modules train); attention:
    ``composite`` | ``flash`` (default: this device's, :func:`default_attention`).

    Returns ``{"rank", "coords", "stage", "stages", "layers", "parameter_count", "optimizer_shard",
    "shard_parts", "expert_shard_parts", ..., "bytes": {name: bytes}}``; ``bytes`` holds parameters, gradients,
    optimizer.adam_m / adam_v / master, optimizer, activations.<term> (one layer),
    activations.layer, activations.head, activations.mask, activations (peak) and total.
    """
    attention = attention or default_attention()
    if amp_level not in ("O0", "O1", "O2"):
        raise ConfigError(f"key 'amp_level' = {amp_level!r}: expected one of 'O0', 'O1', 'O2'")
    if seq_len % parallel.context_parallel:
        raise ConfigError(f"seq_len = {seq_len}: expected a multiple of context_parallel = "
                          f"{parallel.context_parallel}")
    parallel.check_model(config)
    coords = coordinates(parallel, rank)
    stage, stages = coords["pp"], parallel.pipeline_stage
    layers = list(stage_layers(config.num_layers, stages, pipeline_offset)[stage])
    local = local_parameters(config, parallel, rank, pipeline_offset, lora)
    trained = set(trained_shapes(config, lora)) if lora is not None else set(local)

    param_bytes = grad_bytes = master_bytes = moment_elems = frozen_bytes = 0
    count = 0
    dp, ep = parallel.data_parallel, parallel.expert_parallel
    for name, shape in local.items():
        n = _numel(shape)
        count += n
        if amp_level == "O2" and not is_norm(name):
            dtype_bytes = 2
        else:
            dtype_bytes = itemsize(config.param_dtype)
        param_bytes += n * dtype_bytes
        if name not in trained:
            frozen_bytes += n * dtype_bytes
            continue
        grad_bytes += 4 * n
        if parallel.optimizer_shard:
            parts = dp // ep if ep > 1 and rule_for(name).kind == "expert" else dp
            slice_elems = shard_length(n, parts)
            moment_elems += slice_elems
            master_bytes += 4 * slice_elems
        else:
            moment_elems += n
            master_bytes += 4 * n if dtype_bytes != 4 else 0

    terms = layer_activation_terms(config, parallel, micro_batch, seq_len, amp_level, attention)
    layer = sum(terms.values())
    a = _activation_bytes(config, amp_level)
    t = parallel.model_parallel
    p = t if parallel.use_seq_parallel and t > 1 else 1
    b, s, h = micro_batch, seq_len // parallel.context_parallel, config.hidden_size
    layer_input = b * s * h * a // p
    head = 0
    if stage == stages - 1:
        head = layer_input + b * s * h * a + b * s * vocab_block(config.vocab_size, t, config.vocab_pad_multiple) * (12 + (a if a != 4 else 0))
    recomputed = len(layers) if recompute is True else min(int(recompute or 0), len(layers))
    mask = b * s * s * 4 if parallel.context_parallel == 1 else 0
    one_micro_batch = (len(layers) - recomputed) * layer + recomputed * layer_input + head + mask
    if recomputed:
        one_micro_batch += layer  # the layer being rebuilt during its backward
    if stages > 1:
        in_flight = min(stages - stage, parallel.micro_batch_num)
        peak = in_flight * layer_input + one_micro_batch
    else:
        in_flight = 1
        peak = one_micro_batch

    out = {
        "parameters.trainable": param_bytes - frozen_bytes,
        "parameters.frozen": frozen_bytes,
        "parameters": param_bytes,
        "gradients": grad_bytes,
        "optimizer.adam_m": 4 * moment_elems,
        "optimizer.adam_v": 4 * moment_elems,
        "optimizer.master": master_bytes,
    }
    out["optimizer"] = out["optimizer.adam_m"] + out["optimizer.adam_v"] + master_bytes
    out.update({f"activations.{k}": v for k, v in terms.items()})
    out["activations.layer"] = layer
    out["activations.head"] = head
    out["activations.mask"] = mask
    out["activations"] = peak
    out["total"] = param_bytes + grad_bytes + out["optimizer"] + peak
    return {"rank": rank, "coords": coords, "stage": stage, "stages": stages, "layers": layers,
            "parameter_count": count, "optimizer_shard": parallel.optimizer_shard,
            "shard_parts": dp if parallel.optimizer_shard else 1,
            "expert_shard_parts": dp // ep if parallel.optimizer_shard else 1, "micro_batch": micro_batch, "seq_len": seq_len,
            "amp_level": amp_level, "attention": attention, "recomputed_layers": recomputed, "micro_batches_in_flight": in_flight,
            "bytes": out}


def human_bytes(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_memory_report(report: dict) -> str:
    """``name: value`` lines in bytes and human units (the parts of a sum indented above it)."""
    c = report["coords"]
    layers = report["layers"]
    span = f"{layers[0]}-{layers[-1]}" if layers else "none"
    lines = [
        f"memory rank {report['rank']} (dp {c['dp']}, pp {c['pp']}, cp {c['cp']}, tp {c['tp']}): "
        f"stage {report['stage'] + 1}/{report['stages']}, layers {span}, micro-batch {report['micro_batch']} x "
        f"{report['seq_len']} tokens, amp {report['amp_level']}, {report['attention']} attention, recomputed layers {report['recomputed_layers']}, "
        f"micro-batches in flight {report['micro_batches_in_flight']}, optimizer "
        + (f"sharded over {report['shard_parts']} ranks" if report["optimizer_shard"] else "replicated")
        + (f" (experts over {report['expert_shard_parts']})"
           if report["optimizer_shard"] and report["expert_shard_parts"] != report["shard_parts"] else ""),
        f"parameter elements: {report['parameter_count']:,}",
    ]
    width = max(len(k) for k in report["bytes"]) + 4
    for name, value in report["bytes"].items():
        label = ("  " if "." in name else "") + name + ":"  # dotted names are parts of the line below them
        note = {"activations": " peak (estimate)", "activations.layer": " one layer",
                "activations.head": " final norm, head, loss",
                "activations.mask": " fp32 attention mask"}.get(name, "")
        lines.append(f"{label:<{width}} {value:>16,} B {human_bytes(value):>12}{note}")
    return "\n".join(lines)
