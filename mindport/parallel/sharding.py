"""The one slicing table: how every mindport parameter splits over TP, EP and PP.

The checkpoint tools, model loading and training checkpoints slice and merge with it. The
tensor-parallel layers divide their own sizes by tp along the same axes; they cannot silently
disagree, since loading an unsplit checkpoint into a tp rank assigns each slice this table cuts
to that rank's parameter (a shape mismatch fails), and the layout tests do exactly that. Global
shapes come from :func:`mindport.config.parameter_shapes` (checked against every family's built
model). Each parameter name matches exactly one rule (a test checks this for every family).

Notation: tp = model_parallel, ep = expert_parallel. Splits are contiguous blocks along
one axis. Column-parallel weights (out, in) split the output axis 0 (q heads, kv heads,
ffn width; TeleChat2's interleaved ``key_value`` stays contiguous per kv head), row-parallel
weights split the input axis 1, vocab-parallel tables split the vocabulary, stacked expert
weights (E, ...) split experts over ep and their ffn axis over tp. Biases of row-parallel
layers are replicated (added once, after the reduction).

Vocabulary padding (Megatron's make-vocab-size-divisible-by): a vocabulary V that does not
split evenly (XVERSE's 100534) is padded to Vp, a multiple of ``vocab_pad_multiple`` x tp, and
rank r owns rows [r Vp/tp, (r+1) Vp/tp) of the padded table (:func:`vocab_block`). The padding
rows are never stored: a rank holds only its real rows (the last rank fewer), so per-rank
files, merges and exports carry exactly the V real rows, and the head pads its local logits to
Vp/tp columns with -inf (:class:`mindport.parallel.layers.VocabParallelHead`).

``partial_over_tp`` marks replicated parameters whose gradient is partial on each tp rank and
must be summed over the tp group (:class:`mindport.parallel.grad_sync.GradientSync`):

- ``"sequence_parallel"``: applied to sequence shards under sequence parallelism (norms,
  row-parallel biases added after the reduce-scatter); complete on every rank without it.
- ``"always"``: applied to every token but multiplied into tp-partial outputs before their
  reduction: the MoE router (its routing weights scale the experts' ffn-split outputs in the
  combine) and Qwen's shared-expert gate (it scales the shared expert's split output). A
  replicated term such as the router loss enters their gradient once per tp rank, so it
  back-propagates 1/tp of itself on each (:class:`mindport.parallel.comm.ShareGradient`).

After the sum every tp rank holds the same gradient, so replicas stay bit-identical and the
global gradient norm counts them once.

LoRA adapters (``<linear>.lora_A.weight`` (r, in), ``<linear>.lora_B.weight`` (out, r)) take their
rules from the weight they adapt (:func:`adapter_rule`): for a column-parallel weight B splits its
output axis like the weight and A is replicated; for a row-parallel weight A splits its input axis
and B is replicated. The replicated matrix's gradient is partial on each tp rank (it meets only this
rank's output columns, or this rank's partial sum of x A^T), so it is ``partial_over_tp="always"``.

Routed experts' adapters (PEFT's ``target_parameters`` model, :mod:`mindport.models.lora`) are stacks
per expert under ``layers.N.mlp.experts.``: ``gate_up_proj_lora_A`` (E, r, H), shared by the gate and
up projections, ``gate_proj_lora_B`` and ``up_proj_lora_B`` (E, I, r), ``down_proj_lora_A`` (E, r, I)
and ``down_proj_lora_B`` (E, H, r). They split over ep along the experts like the weights they adapt
(an expert's adapter lives with it) and over tp by the same column/row reasoning: gate/up B and down A
split the ffn axis I, the other factor is replicated over tp with a tp-partial gradient.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from mindport.config import vocab_block
from mindport.parallel.pipeline import stage_of_layer


@dataclass(frozen=True)
class Rule:
    pattern: str
    kind: str  # "column" | "row" | "vocab" | "expert" | "replicated"
    tp_axis: int | None = None
    ep_axis: int | None = None
    partial_over_tp: str = "never"  # "never" | "sequence_parallel" | "always" (module docstring)
    norm: bool = False  # a norm's weight: kept fp32 under AMP O2, never weight-decayed

    def __post_init__(self) -> None:
        assert self.partial_over_tp in ("never", "sequence_parallel", "always"), self.partial_over_tp
        assert self.partial_over_tp == "never" or self.tp_axis is None, self.pattern

    def grad_partial_over_tp(self, sequence_parallel: bool) -> bool:
        """True if this parameter's gradient must be summed over the tp group."""
        return self.partial_over_tp == "always" or (sequence_parallel and self.partial_over_tp == "sequence_parallel")

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None


_LAYER = r"layers\.\d+\."
_SP = "sequence_parallel"
RULES = (
    Rule(r"embed\.weight", "vocab", tp_axis=0),
    Rule(r"lm_head\.weight", "vocab", tp_axis=0),
    Rule(r"final_norm\.weight", "replicated", partial_over_tp=_SP, norm=True),
    Rule(_LAYER + r"(attn_norm|mlp_norm)\.weight", "replicated", partial_over_tp=_SP, norm=True),
    Rule(_LAYER + r"attn\.(q_proj|k_proj|v_proj|kv_proj)\.(weight|bias)", "column", tp_axis=0),
    Rule(_LAYER + r"attn\.o_proj\.weight", "row", tp_axis=1),
    Rule(_LAYER + r"attn\.o_proj\.bias", "replicated", partial_over_tp=_SP),
    Rule(_LAYER + r"mlp\.(shared\.)?(gate_proj|up_proj)\.(weight|bias)", "column", tp_axis=0),
    Rule(_LAYER + r"mlp\.(shared\.)?down_proj\.weight", "row", tp_axis=1),
    Rule(_LAYER + r"mlp\.down_proj\.bias", "replicated", partial_over_tp=_SP),
    Rule(_LAYER + r"mlp\.(router|shared_gate)\.weight", "replicated", partial_over_tp="always"),
    Rule(_LAYER + r"mlp\.experts\.(gate_proj|up_proj)", "expert", tp_axis=1, ep_axis=0),
    Rule(_LAYER + r"mlp\.experts\.down_proj", "expert", tp_axis=2, ep_axis=0),
)


class ShardingError(ValueError):
    pass


_ADAPTER = re.compile(r"(?P<base>.+)\.lora_(?P<factor>[AB])\.weight"  # a Linear's
                      r"|(?P<experts>.+\.experts\.)(?P<proj>gate_up|gate|up|down)_proj_lora_(?P<expert_factor>[AB])")


def adapted_weight(name: str) -> tuple[str, str] | None:
    """(the weight a LoRA factor adapts, "A" or "B"), or None if ``name`` is not a LoRA factor; the
    experts' shared gate/up A adapts (and is sliced like) the gate projection's stack."""
    m = _ADAPTER.fullmatch(name)
    if m is None:
        return None
    if m.group("base"):
        return m.group("base") + ".weight", m.group("factor")
    proj = "gate" if m.group("proj") == "gate_up" else m.group("proj")
    return f"{m.group('experts')}{proj}_proj", m.group("expert_factor")


def adapter_rule(name: str) -> Rule | None:
    """The rule of a LoRA matrix (module docstring), or None if ``name`` is not one."""
    adapted = adapted_weight(name)
    if adapted is None:
        return None
    weight, factor = adapted
    base = rule_for(weight)
    if base.kind not in ("column", "row", "expert"):
        raise ShardingError(f"parameter '{name}': LoRA adapts column- or row-parallel weights and routed experts "
                            f"only, not a {base.kind} one")
    splits_output = base.kind == "column" or (base.kind == "expert" and base.tp_axis == 1)  # W (..., out, in)
    if factor == ("B" if splits_output else "A"):
        return Rule(re.escape(name), base.kind, tp_axis=base.tp_axis, ep_axis=base.ep_axis)
    return Rule(re.escape(name), "expert" if base.kind == "expert" else "replicated", ep_axis=base.ep_axis,
                partial_over_tp="always")


def rule_for(name: str) -> Rule:
    adapter = adapter_rule(name)
    if adapter is not None:
        return adapter
    found = [r for r in RULES if r.matches(name)]
    if len(found) != 1:
        raise ShardingError(f"parameter '{name}' matches {len(found)} slicing rules (expected exactly 1)")
    return found[0]


def is_norm(name: str) -> bool:
    """True for a norm's weight (its rule's ``norm`` flag)."""
    return rule_for(name).norm


def _block(size: int, parts: int, rank: int, name: str, axis: int) -> slice:
    if size % parts:
        raise ShardingError(f"parameter '{name}': axis {axis} of size {size} does not split into {parts}")
    step = size // parts
    return slice(rank * step, (rank + 1) * step)


def shard_slices(name: str, shape: tuple[int, ...], tp_rank: int = 0, tp_size: int = 1, ep_rank: int = 0,
                 ep_size: int = 1, vocab_multiple: int = 1) -> tuple[slice, ...]:
    """The index (one slice per axis) of this rank's piece of parameter ``name`` (of global
    ``shape``); a vocabulary table's last pieces are short when the vocabulary is padded."""
    rule = rule_for(name)
    index = [slice(None)] * len(shape)
    if rule.kind == "vocab" and tp_size > 1:
        rows = vocab_block(shape[0], tp_size, vocab_multiple)
        index[0] = slice(min(tp_rank * rows, shape[0]), min((tp_rank + 1) * rows, shape[0]))
    elif rule.tp_axis is not None and tp_size > 1:
        index[rule.tp_axis] = _block(shape[rule.tp_axis], tp_size, tp_rank, name, rule.tp_axis)
    if rule.ep_axis is not None and ep_size > 1:
        index[rule.ep_axis] = _block(shape[rule.ep_axis], ep_size, ep_rank, name, rule.ep_axis)
    return tuple(index)


def local_shape(name: str, shape: tuple[int, ...], tp_size: int = 1, ep_size: int = 1, vocab_multiple: int = 1,
                tp_rank: int = 0) -> tuple[int, ...]:
    index = shard_slices(name, shape, tp_rank, tp_size, 0, ep_size, vocab_multiple)
    return tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))


def global_shape(name: str, local: tuple[int, ...], tp_size: int = 1, ep_size: int = 1,
                 vocab_size: int | None = None) -> tuple[int, ...]:
    """The unsplit shape of a parameter whose local shard is ``local`` (a vocabulary table's
    first axis is ``vocab_size``: its local pieces need not be equal)."""
    rule = rule_for(name)
    shape = list(local)
    if rule.kind == "vocab" and vocab_size is not None and tp_size > 1:
        shape[0] = vocab_size
    elif rule.tp_axis is not None:
        shape[rule.tp_axis] *= tp_size
    if rule.ep_axis is not None:
        shape[rule.ep_axis] *= ep_size
    return tuple(shape)


_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


def stages_of_param(name: str, num_layers: int, pipeline_stage: int, offset=None) -> list[int]:
    """Pipeline stages holding parameter ``name``: its layer's stage; embedding on the first,
    final norm and head on the last."""
    m = _LAYER_INDEX.match(name)
    if m:
        return [stage_of_layer(int(m.group(1)), num_layers, pipeline_stage, offset)]
    if name.startswith("embed."):
        return [0]
    return [pipeline_stage - 1]
