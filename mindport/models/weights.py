"""Move weights between checkpoint files and a live mindport model.

Loading checks every tensor against the model: an HF tensor no parameter takes is
"unexpected", a parameter no tensor fills is "missing", and shapes must agree; each
error names the file and tensor. Export writes HF names and layouts in size-capped
shards into a temporary directory renamed into place at the end.
"""
from __future__ import annotations

import json
import os

import numpy as np

from mindport.checkpoint.hf_checkpoint import HFCheckpoint
from mindport.checkpoint.model_files import carry_files, hf_config, source_hf_config
from mindport.checkpoint.name_map import NameMap, Target
from mindport.checkpoint.safetensors_io import f32_to_bf16_bits
from mindport.checkpoint.tensor_check import check_shape, missing_tensor, unexpected_tensor
from mindport.checkpoint.shards import DEFAULT_SHARD_BYTES, StagingDir, write_shards
from mindport.dtypes import ITEMSIZE, NUMPY_DTYPES, SAFETENSORS_CODES
from mindport.parallel.sharding import global_shape, shard_slices

def load_into_model(model, ckpt: HFCheckpoint, name_map: NameMap | None, presliced: bool = False) -> None:
    """Fill ``model``'s parameters from a checkpoint (HF names via ``name_map``; None = mindport
    names). From an unsplit checkpoint, each tensor/expert-parallel rank reads only its own
    slice of each tensor, cut by the slicing table (:mod:`mindport.parallel.sharding`);
    ``presliced`` checkpoints (one rank's ``rank_XXXX/`` from ``mindport convert --tp/--pp/--ep``)
    already hold exactly this rank's slices."""
    from mindport.parallel.state import single_process

    groups = single_process() if presliced else model.groups
    tp, ep = groups.tp, groups.ep
    params = dict(model.parameters_and_names())
    stacks: dict[str, np.ndarray] = {}
    filled: dict[str, set] = {name: set() for name in params}
    for path, names in ckpt.by_file():
        for hf_name in names:
            target = name_map.to_ours(hf_name, path) if name_map else Target(hf_name)
            if target.name is None:
                continue
            if target.name not in params:
                if model.on_other_stage(target.name):
                    continue  # held by another pipeline stage
                raise unexpected_tensor(path, hf_name, f"model has no parameter '{target.name}'")
            param = params[target.name]
            full = global_shape(target.name, tuple(param.shape), tp.size, ep.size, model.config.vocab_size)
            if target.expert is not None and target.expert >= full[0]:
                raise unexpected_tensor(path, hf_name, f"expert {target.expert}, but the config gives {full[0]} "
                                                       f"experts")
            check_shape(path, hf_name, ckpt.info(hf_name).shape, full if target.expert is None else full[1:],
                        "the config implies")
            index = shard_slices(target.name, full, tp.rank, tp.size, ep.rank, ep.size, model.config.vocab_pad_multiple)
            if target.expert is None:
                assign(param, ckpt.get(hf_name)[index])
                filled[target.name].add(None)
                continue
            local_experts = range(*index[0].indices(full[0]))
            if target.expert not in local_experts:
                continue  # another expert-parallel rank holds this expert
            slot = target.expert - local_experts.start
            stack = stacks.setdefault(target.name, np.empty(tuple(param.shape), np.float32))
            stack[slot] = ckpt.get(hf_name)[index[1:]]
            filled[target.name].add(slot)
            if len(filled[target.name]) == param.shape[0]:
                assign(param, stacks.pop(target.name))
    for name, param in params.items():
        got = filled[name]
        if None in got or (got and len(got) == param.shape[0]):
            continue  # filled directly, or every local expert slot of a stack filled (and assigned)
        missing = _hf_names(name_map, name, param.shape[0], got)
        raise missing_tensor(ckpt.directory, missing, f"needed for parameter '{name}'")


def _hf_names(name_map: NameMap | None, our_name: str, num_experts: int, got: set) -> str:
    if name_map is None:
        return our_name
    for hf_name, expert in name_map.to_hf(our_name, num_experts):
        if expert not in got:
            return hf_name
    return our_name


def assign(param, array: np.ndarray) -> None:
    """Set a parameter from a numpy array, cast to the parameter's dtype."""
    from mindspore import Tensor

    param.set_data(Tensor(np.asarray(array, dtype=np.float32)).astype(param.dtype))


def tensor_bytes(param, dtype_code: str) -> np.ndarray:
    """A parameter's data in the given safetensors dtype (bf16 as raw bits)."""
    import mindspore as ms

    data = param.astype(ms.float32).asnumpy() if param.dtype == ms.bfloat16 else param.asnumpy()
    if dtype_code == "BF16":
        return f32_to_bf16_bits(data.astype(np.float32))
    return data.astype(NUMPY_DTYPES[dtype_code])


def export_hf(model, family, out_dir: str, overwrite: bool = False, dtype: str | None = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Save a live model as an HF directory: config.json, generation_config.json, safetensors, and the
    non-weight files of the directory it was loaded from (:mod:`~mindport.checkpoint.model_files`)."""
    config = model.config
    name_map = family.name_map
    params = dict(model.parameters_and_names())
    entries, source, dtypes = [], {}, set()
    for our_name, param in params.items():
        dtype_name = dtype or str(param.dtype).lower()
        dtypes.add(dtype_name)
        code = SAFETENSORS_CODES[dtype_name]
        for hf_name, expert in name_map.to_hf(our_name, config.num_experts):
            shape = tuple(param.shape if expert is None else param.shape[1:])
            entries.append((hf_name, code, shape, int(np.prod(shape)) * ITEMSIZE[code]))
            source[hf_name] = (param, expert, code)

    def fetch(hf_name: str) -> np.ndarray:
        param, expert, code = source[hf_name]
        data = tensor_bytes(param, code)
        return data if expert is None else data[expert]

    source_dir = model.source_dir  # from_pretrained's directory: its non-weight files come along
    doc = hf_config(source_hf_config(source_dir), family, config, dtypes.pop() if len(dtypes) == 1 else None)
    with StagingDir(out_dir, overwrite) as tmp:
        write_shards(tmp, entries, lambda name: [fetch(name)], max_shard_bytes)
        carry_files(source_dir, tmp, to_hf=True)
        write_hf_configs(tmp, doc, config)


def write_hf_configs(directory: str, hf_config: dict, config) -> None:
    """config.json, and generation_config.json (special token ids) unless one was carried from the source."""
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
    if os.path.isfile(os.path.join(directory, "generation_config.json")):
        return
    generation = {k: v for k, v in (("bos_token_id", config.bos_token_id), ("eos_token_id", config.eos_token_id),
                                    ("pad_token_id", config.pad_token_id)) if v is not None}
    with open(os.path.join(directory, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation, f, indent=2)
