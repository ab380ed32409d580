"""``mindport lora merge``: a base model plus a LoRA adapter -> one model directory, streaming.

    W' = W + (B @ A) * (lora_alpha / r)        every adapted weight, in fp32, stored in W's dtype
    W_e' = W_e + (B_e @ A_e) * (lora_alpha / r)  every routed expert's adapted projection
    P' = the adapter's copy                    every ``modules_to_save`` parameter

as PEFT's ``merge_and_unload()`` does. The base (HF or mindport format) is read one tensor at a
time: unchanged tensors are copied byte for byte from file to file (the converter's sources), an
adapted one is read whole, updated and written, so peak memory is the adapter plus the largest
tensor. The adapter is a PEFT directory or a LoRA run's checkpoint, per-rank shards included
(:func:`mindport.models.lora.read_adapter`). The output keeps the base's format, tensor names,
dtypes, config.json and every non-weight file (tokenizer, remote code, generation config).
"""
from __future__ import annotations

import os
import shutil
import time

import numpy as np

from mindport.checkpoint.model_files import carry_files
from mindport.checkpoint.safetensors_io import CheckpointError
from mindport.checkpoint.shards import DEFAULT_SHARD_BYTES, StagingDir
from mindport.ckpt_tools.convert import (Summary, _check_paths, _from_f32, _full, _Out, _progress, _Source, _to_f32,
                                         _write_files)
from mindport.models.auto import read_config
from mindport.models.lora import adapter_tensors, is_adapter, read_adapter, weight_deltas
from mindport.models.registry import family
from mindport.parallel.layout import LAYOUT_FILE


class _Merged(_Out):
    """An adapted or replaced tensor: read whole, changed in fp32, written in its own dtype."""

    def __init__(self, out: _Out, change):
        super().__init__(out.name, out.dtype, out.shape, out.parts)
        self.change = change

    def chunks(self):
        (src, _), = self.parts
        raw = np.frombuffer(bytes(src.read(0, self.nbytes)), np.uint8)
        yield _from_f32(self.change(_to_f32(raw, self.dtype).reshape(self.shape)), self.dtype)


def merge_lora(base: str, adapter: str, dst: str, overwrite: bool = False, max_shard_bytes: int | None = None,
               progress: bool = True) -> Summary:
    """Write ``base`` with ``adapter`` merged into ``dst`` (module docstring)."""
    start = time.perf_counter()
    _check_paths(base, dst, overwrite)
    if os.path.isfile(os.path.join(base, LAYOUT_FILE)):
        raise CheckpointError(f"{os.path.join(base, LAYOUT_FILE)}: per-rank shards: run 'mindport convert merge' "
                              f"on the base first")
    config, is_hf = read_config(base)
    lora, tensors = read_adapter(adapter)
    by_ours = adapter_tensors(config, lora, tensors, adapter)  # mindport name -> whole tensor, checked
    name_map = family(config.family).name_map
    changes = {}  # base tensor name -> fp32 update
    for weight, delta in weight_deltas(lora, by_ours).items():
        for stored, expert in _stored_names(weight, name_map, config, is_hf):
            changes[stored] = lambda w, d=(delta if expert is None else delta[expert]): w + d
    for ours, array in by_ours.items():
        if not is_adapter(ours):
            (stored, _), = _stored_names(ours, name_map, config, is_hf)
            changes[stored] = lambda w, p=array: p
    with _Source(base) as source:
        outs = []
        for name, src in source.tensors.items():
            out = _Out(name, src.dtype, src.shape, [(src, _full(src.shape))])
            outs.append(_Merged(out, changes.pop(name)) if name in changes else out)
        if changes:
            raise CheckpointError(f"{base}: missing tensor '{next(iter(changes))}' (the adapter changes it)")
        with StagingDir(dst, overwrite) as tmp, _progress(len(outs), progress) as bar:
            nbytes = _write_files(tmp, outs, max_shard_bytes or DEFAULT_SHARD_BYTES,
                                  {"format": "pt" if is_hf else "ms"}, bar)
            carry_files(base, tmp, to_hf=is_hf)
            shutil.copyfile(os.path.join(base, "config.json"), os.path.join(tmp, "config.json"))
    return Summary(len(outs), nbytes, time.perf_counter() - start, dst)


def _stored_names(ours: str, name_map, config, is_hf: bool) -> list[tuple[str, int | None]]:
    """The base directory's (name, expert) pairs of mindport parameter ``ours``: one per routed expert
    in an HF base (``None``: the whole tensor)."""
    if not is_hf:
        return [(ours, None)]
    return list(name_map.to_hf(ours, config.num_experts))
