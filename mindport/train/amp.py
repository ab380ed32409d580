"""Mixed precision for training: O0, O1, O2, and loss scaling.

What casts what (checked on MindSpore 2.10, CPU):

* MindSpore's ``amp.auto_mixed_precision(net, "O1")`` is a *source rewrite*
  (``mindspore.rewrite``). On our ``CausalLM`` it fails (the generated module loses a
  module-level constant); applied per ``DecoderLayer`` it works, and what it does to our
  cells is exactly one thing: it wraps the ``ops.MatMul`` primitive inside each
  :class:`~mindport.transformer.layers.Linear` with casts (inputs -> fp16, output -> fp32).
  The functional matmuls of the attention core are left alone. As side effects it writes
  generated modules into ``./rewritten_network`` of the working directory, puts our package
  folders on ``sys.path`` and re-runs our ``dispatch.register`` decorators. ``"auto"`` level
  works in PYNATIVE only (its decorator breaks ``ms.jit``), and ``O2``'s ``Cell.to_float``
  is overridden by our Linear, which casts to ``config.compute_dtype`` itself.
* So mindport applies the same casts itself, without a rewrite:

  - **O0**: everything fp32.
  - **O1**: each Linear's MatMul gets exactly the casts MindSpore's O1 rewrite inserts
    (fp16 in, fp32 out, see :class:`LowPrecisionMatMul`); weights, residual stream, norms,
    softmax and loss stay fp32. No loss scaling is needed (gradients of fp32 weights), but a
    configured scale is applied.
  - **O2**: the model is rebuilt with ``param_dtype = compute_dtype = float16`` (our Linear and
    Embedding then cast to fp16 themselves), the RMSNorm weights are put back to fp32
    (RMSNorm statistics are fp32 in every case), the optimiser updates an fp32 master copy of
    every fp16 weight and copies it back after each step, and the loss is scaled.
* Loss scaling uses MindSpore's own ``amp.StaticLossScaler`` / ``amp.DynamicLossScaler``
  and ``amp.all_finite``. MindSpore refuses dynamic scaling on CPU inside
  ``build_train_network``; mindport's functional step runs the dynamic scaler on CPU too,
  but the default everywhere is static (dynamic is opt-in: ``loss_scale_type: dynamic``).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from mindport.config import ConfigError
from mindport.dtypes import dtype_of
from mindport.ops.skinny_matmul import skinny_matmul
from mindport.parallel.sharding import is_norm


class LowPrecisionMatMul(nn.Cell):
    """``MatMul(transpose_b=True)`` with MindSpore O1's casts: inputs to ``dtype``, output to fp32."""

    def __init__(self, dtype=ms.float16):
        super().__init__()
        self.dtype = dtype
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x: Tensor, w: Tensor) -> Tensor:
        return self.matmul(x.astype(self.dtype), w.astype(self.dtype)).astype(ms.float32)


def _linears(model):
    from mindport.parallel.layers import Linear

    return [cell for _, cell in model.cells_and_names() if isinstance(cell, Linear)]


def apply_o1(model, dtype: str = "float16") -> int:
    """Swap every Linear's MatMul for :class:`LowPrecisionMatMul`; returns how many were swapped."""
    linears = _linears(model)
    for cell in linears:
        matmul = getattr(cell, "matmul", None)  # x W^T: skinny_matmul (MatMul at training shapes)
        if matmul is not skinny_matmul:
            raise ConfigError("amp_level 'O1': mindport.parallel.layers.Linear no longer computes x W^T through "
                              "`matmul = skinny_matmul`; update mindport/train/amp.py")
        cell.matmul = LowPrecisionMatMul(dtype_of(dtype))
    return len(linears)


def build_o2(model, dtype: str = "float16"):
    """(fp16 model, fp32 masters): a copy of ``model`` with fp16 weights except the norms.

    ``masters`` has one fp32 Parameter per trained model parameter that is not fp32 (named
    ``master.<name>``); fp32 parameters (the norms) are their own master. A LoRA model's copy gets the
    same adapters and frozen base (which has no master).
    """
    from mindport.models.auto import AutoModelForCausalLM
    from mindport.models.lora import apply_lora

    low = model.config.replace(param_dtype=dtype, compute_dtype=dtype)
    new = AutoModelForCausalLM.from_config(low)
    if model.lora is not None:
        apply_lora(new, model.lora)
    source = dict(model.parameters_and_names())
    owners = {name: cell for name, cell in new.cells_and_names()}
    masters = {}
    for name, param in list(new.parameters_and_names()):
        data = source[name].astype(ms.float32)
        if is_norm(name):
            owner_name, attr = name.rsplit(".", 1)
            setattr(owners[owner_name], attr, Parameter(Tensor(data.asnumpy()), name=param.name,
                                                        requires_grad=param.requires_grad))
        else:
            param.set_data(data.astype(dtype_of(dtype)))
            if param.requires_grad:
                masters[name] = Parameter(Tensor(data.asnumpy()), name=f"master.{name}")
    return new, masters


def loss_scaler(kind: str, value: float, factor: float, window: int):
    """MindSpore's StaticLossScaler or DynamicLossScaler."""
    if kind == "dynamic":
        return ms.amp.DynamicLossScaler(float(value), int(factor), int(window))
    return ms.amp.StaticLossScaler(float(value))
