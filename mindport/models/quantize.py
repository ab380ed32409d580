"""Weight-only int8 inference: per-output-channel symmetric quantization of the projections.

Notation: W (out, in) a projection's weight (a routed experts' stack: (E, out, in)), q int8 of
W's shape, s (out,) (or (E, out)) float32 scales.

    s_o = max_i |W_oi| / 127   (1 for an all-zero row),   q = round(W / s) in [-127, 127]

The model keeps q and s in place of W (the fp32 weights are dropped), and dequantizes inside its
compiled graph at each matmul: a Linear computes (x q^T) * s, which is x (q s)^T with the
per-output-channel scale applied to the (N, out) product instead of the (out, in) weight; the
routed experts' stacks are dequantized (q * s[..., None]) before their grouped matmuls.

Quantized: every tensor-parallel projection (the slicing table's column and row rules: attention,
dense MLP, shared experts) and the routed experts. Kept in their dtype: embeddings, norms,
biases, the MoE router and Qwen's shared-expert gate (their outputs pick experts, and a rounding
error flips a choice: tiny tensors, not worth it) and the LM head (the last matmul before the
logits, kept as transformers' int8 integrations keep ``lm_head`` by default).

Tensor parallelism: a row-parallel shard (o_proj, down_proj, the experts' down stacks) holds a
block of every output channel's inputs, so its absmax is taken over the tp group: each rank
quantizes its own shard with the single-process scales, and the quantized model computes what the
single-process quantized model computes.

LoRA: an attached adapter is merged first (W + (alpha / r) B A in fp32, the delta ``mindport lora
merge`` adds), then the merged weight is quantized; the model carries no adapter afterwards.
A quantized model is for inference: training it or saving it with ``save_pretrained`` fails.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor

from mindport.config import ConfigError
from mindport.constants import QUANTIZATIONS
from mindport.models.lora import trained_weights, weight_deltas
from mindport.parallel.comm import collectives
from mindport.parallel.layers import Linear
from mindport.parallel.sharding import rule_for
from mindport.transformer.moe import Experts

INT8_MAX = 127
_PROJECTION_RULES = ("column", "row")
_EXPERT_STACKS = ("gate_proj", "up_proj", "down_proj")


def quantize_rows(weight: np.ndarray, absmax: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 of ``weight``'s shape, s float32 (..., out)) of ``weight`` (..., out, in), per output
    row; ``absmax`` (..., out) replaces the rows' own max |W| (a row split over ranks)."""
    if absmax is None:
        absmax = np.abs(weight).max(-1)
    scale = np.where(absmax > 0, absmax / INT8_MAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(weight / scale[..., None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


class Int8Projection:
    """Mixed in before a :class:`Linear` class: ``weight`` is q (out, in) int8 and ``weight_scale``
    s (out,); y = (x q^T) * s (+ bias, and the layer's reduction, as before)."""

    def project(self, x: Tensor) -> Tensor:
        lead, dt = x.shape[:-1], self.compute_dtype
        y = self.matmul(x.reshape(-1, self.in_features).astype(dt), self.weight.astype(dt))  # (N, out)
        return (y * self.weight_scale.astype(dt)).reshape(*lead, self.out_features)


class Int8Experts(Experts):
    """Routed experts with int8 stacks ``gate_proj``/``up_proj`` (E, I, H), ``down_proj`` (E, H, I) and
    their scales ``<stack>_scale`` (E, out), dequantized before the grouped matmuls."""

    def expert_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        dt = self.compute_dtype
        return (self.gate_proj.astype(dt) * self.gate_proj_scale.astype(dt).expand_dims(-1),
                self.up_proj.astype(dt) * self.up_proj_scale.astype(dt).expand_dims(-1),
                self.down_proj.astype(dt) * self.down_proj_scale.astype(dt).expand_dims(-1))


_INT8_CLASSES: dict[type, type] = {}


def _int8_class(cls: type) -> type:
    """``cls`` (a Linear class) with :class:`Int8Projection`'s ``project``, one class per base class."""
    if cls not in _INT8_CLASSES:
        _INT8_CLASSES[cls] = type(f"Int8{cls.__name__}", (Int8Projection, cls), {})
    return _INT8_CLASSES[cls]


def quantize_weights(model, mode: str = "int8") -> None:
    """Quantize ``model``'s projection weights in place (module docstring): after loading, with or
    without an attached LoRA adapter, on every rank of a tensor/expert/pipeline layout (each rank its
    own shard; under tensor parallelism every tp rank must call it, as it exchanges row maxima)."""
    if mode not in QUANTIZATIONS:
        raise ValueError(f"quantize: {mode!r}: expected one of {', '.join(QUANTIZATIONS)}")
    if model.quantization is not None:
        raise ConfigError(f"quantize: the model is already quantized ({model.quantization})")
    deltas = weight_deltas(model.lora, trained_weights(model)) if model.lora is not None else {}
    tp = model.groups.tp
    comm = collectives(tp) if tp.size > 1 else None

    def quantized(name: str, weight: Parameter) -> tuple[Parameter, Parameter]:
        w = weight.astype(ms.float32).asnumpy()
        if name in deltas:
            w = w + deltas[name]
        absmax = np.abs(w).max(-1)
        if comm is not None and rule_for(name).tp_axis == w.ndim - 1:  # inputs split: the row's max over tp
            gathered = comm.all_gather(Tensor(absmax[..., None]), -1)  # (..., out, tp)
            absmax = gathered.asnumpy().max(-1)
        q, scale = quantize_rows(w, absmax)
        return (Parameter(Tensor(q), name=name, requires_grad=False),
                Parameter(Tensor(scale), name=f"{name}_scale", requires_grad=False))

    for cell_name, cell in model.cells_and_names():
        if isinstance(cell, Linear) and rule_for(f"{cell_name}.weight").kind in _PROJECTION_RULES:
            cell.weight, cell.weight_scale = quantized(f"{cell_name}.weight", cell.weight)
            cell.lora_A = cell.lora_B = None
            cell.__class__ = _int8_class(type(cell))
        elif isinstance(cell, Experts):
            for stack in _EXPERT_STACKS:
                q, scale = quantized(f"{cell_name}.{stack}", getattr(cell, stack))
                setattr(cell, stack, q)
                setattr(cell, f"{stack}_scale", scale)
            for attr in ("gate_up_proj_lora_A", "gate_proj_lora_B", "up_proj_lora_B", "down_proj_lora_A",
                         "down_proj_lora_B"):
                if getattr(cell, attr) is not None:
                    delattr(cell, attr)
                    setattr(cell, attr, None)
            cell.__class__ = Int8Experts
    for param in model.get_parameters():
        param.requires_grad = False
    model.lora = None
    model.quantization = mode
    model.compiled_decoders.clear()  # compiled before: they would hold the old graphs


def quantized_bytes(model) -> tuple[int, int]:
    """(bytes of the int8 weights + their scales, bytes the same weights take in float32)."""
    params = dict(model.parameters_and_names())
    int8 = [n for n, p in params.items() if p.dtype == ms.int8]
    quantized = sum(params[n].size + params[f"{n}_scale"].size * 4 for n in int8)
    return quantized, sum(params[n].size * 4 for n in int8)
