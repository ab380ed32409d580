"""The name and shape of every parameter a config builds, computed without building the model.

The converters check checkpoints against this table instead of instantiating the model
(a 115B model's parameters would not fit in memory). It mirrors the cells in
``mindport/transformer`` (layers, attention, mlp, moe) and the order in which they
register parameters; a test checks it against the real model of every family's tiny
preset, and its parameter count against ``ModelConfig.num_parameters()`` for every preset.

Every reader checks tensors the one way (:func:`check_tensors`, or its parts for name-mapped
checkpoints): an unexpected, missing or wrongly shaped tensor fails naming the file and the tensor.
"""
from __future__ import annotations

from typing import Callable, Mapping

from mindport.checkpoint.safetensors_io import CheckpointError
from mindport.config import ModelConfig

Shape = tuple[int, ...]


def _linear(shapes: dict[str, Shape], prefix: str, in_features: int, out_features: int, bias: bool) -> None:
    shapes[f"{prefix}.weight"] = (out_features, in_features)  # (out, in), as HF stores it
    if bias:
        shapes[f"{prefix}.bias"] = (out_features,)


def parameter_shapes(config: ModelConfig) -> dict[str, Shape]:
    """mindport parameter name -> shape, in the model's parameter order."""
    h, d = config.hidden_size, config.head_dim
    n, nkv = config.num_heads, config.num_kv_heads
    shapes: dict[str, Shape] = {"embed.weight": (config.vocab_size, h)}
    for i in range(config.num_layers):
        p = f"layers.{i}."
        shapes[p + "attn_norm.weight"] = (h,)
        _linear(shapes, p + "attn.q_proj", h, n * d, config.qkv_bias)
        if config.kv_layout == "interleaved":
            _linear(shapes, p + "attn.kv_proj", h, 2 * nkv * d, config.qkv_bias)
        else:
            _linear(shapes, p + "attn.k_proj", h, nkv * d, config.qkv_bias)
            _linear(shapes, p + "attn.v_proj", h, nkv * d, config.qkv_bias)
        _linear(shapes, p + "attn.o_proj", n * d, h, config.o_bias)
        shapes[p + "mlp_norm.weight"] = (h,)
        if config.is_moe:
            e, width = config.num_experts, config.moe_intermediate_size
            _linear(shapes, p + "mlp.router", h, e, False)
            shapes[p + "mlp.experts.gate_proj"] = (e, width, h)  # stacked experts, no ".weight"
            shapes[p + "mlp.experts.up_proj"] = (e, width, h)
            shapes[p + "mlp.experts.down_proj"] = (e, h, width)
            shared = config.shared_expert_intermediate_size
            if shared:
                _linear(shapes, p + "mlp.shared.gate_proj", h, shared, False)
                _linear(shapes, p + "mlp.shared.up_proj", h, shared, False)
                _linear(shapes, p + "mlp.shared.down_proj", shared, h, False)
                if config.shared_expert_gate:
                    _linear(shapes, p + "mlp.shared_gate", h, 1, False)
        else:
            f = config.ffn_hidden_size
            _linear(shapes, p + "mlp.gate_proj", h, f, config.gate_up_bias)
            _linear(shapes, p + "mlp.up_proj", h, f, config.gate_up_bias)
            _linear(shapes, p + "mlp.down_proj", f, h, config.down_bias)
    shapes["final_norm.weight"] = (h,)
    shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


# --------------------------------------------------------------------------- the one tensor check

def unexpected_tensor(path: str, name: str, reason: str) -> CheckpointError:
    """``path``: unexpected tensor 'name' (reason)."""
    return CheckpointError(f"{path}: unexpected tensor '{name}' ({reason})")


def missing_tensor(path: str, name: str, reason: str | None = None) -> CheckpointError:
    """``path``: missing tensor 'name' (reason)."""
    return CheckpointError(f"{path}: missing tensor '{name}'" + (f" ({reason})" if reason else ""))


def check_shape(path: str, name: str, shape, expected, implied_by: str = "config.json implies", note: str = "") -> None:
    """Fail unless tensor ``name`` of file ``path`` has the ``expected`` shape."""
    if tuple(shape) != tuple(expected):
        raise CheckpointError(f"{path}: tensor '{name}' has shape {list(shape)}, {implied_by} {list(expected)}{note}")


def check_tensors(found: Mapping[str, Shape], expected: Mapping[str, Shape], source: str,
                  implied_by: str = "config.json implies", file_of: Callable[[str], str] | None = None,
                  unexpected_reason: str = "the model described by config.json has no such parameter") -> None:
    """Fail on the first tensor of ``found`` (name -> shape) that ``expected`` lacks or shapes otherwise,
    then on the first of ``expected`` that ``found`` lacks. Errors name the tensor's file
    (``file_of(name)``, default ``source``)."""
    for name, shape in found.items():
        path = file_of(name) if file_of else source
        if name not in expected:
            raise unexpected_tensor(path, name, unexpected_reason)
        check_shape(path, name, shape, expected[name], implied_by)
    for name in expected:
        if name not in found:
            raise missing_tensor(source, name)
