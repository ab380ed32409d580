"""Per-rank export layout: which ``rank_XXXX/`` directory holds which slice of which tensor.

Pure layout math shared by the converter (``mindport convert --tp/--pp/--ep``, merge) and the
trainer's parallel checkpoints: the ranks follow the parallel layer's own order
(:func:`mindport.parallel.state.coordinates`), the slices the slicing table
(:func:`mindport.parallel.sharding.shard_slices`), and an export holds dp = ep replicas, no cp.
"""
from __future__ import annotations

import json
import os

from mindport.checkpoint.hf_checkpoint import read_json
from mindport.config import ConfigError, ModelConfig, ParallelConfig, Shape
from mindport.errors import CheckpointError
from mindport.parallel.pipeline import stage_layers
from mindport.parallel.sharding import rule_for, shard_slices, stages_of_param
from mindport.parallel.state import check_layout, coordinates, rank_of

LAYOUT_FILE = "layout.json"
Box = tuple[tuple[int, int], ...]  # [start, stop) per axis


def rank_dir_name(rank: int) -> str:
    """The directory of export rank ``rank``'s weight shards: ``rank_XXXX``."""
    return f"rank_{rank:04d}"


def box_of(index: tuple[slice, ...], shape: Shape) -> Box:
    """The [start, stop) box a contiguous slice index cuts out of ``shape``."""
    box = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise CheckpointError(f"slice {s} has step {step}: only contiguous blocks are supported")
        box.append((start, stop))
    return tuple(box)


def rank_layout(tensors: dict[str, tuple[str, Shape]], config: ModelConfig, tp: int, pp: int, ep: int,
                offset=None) -> tuple[dict, list[dict[str, Box]]]:
    """The layout.json document of per-rank shards of ``tensors`` (name -> (dtype, global shape)),
    and for each export rank the box (sharding.py) each of its tensors takes. Pure: no I/O, so the
    converter and the trainer's parallel checkpoints share one layout."""
    for key, value in (("tp", tp), ("pp", pp), ("ep", ep)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"--{key} {value!r}: expected a positive integer")
    if ep > 1 and not config.is_moe:
        raise ConfigError(f"--ep {ep}: the model has no experts (num_experts = 0); expert parallelism needs a "
                          f"MoE model")
    dp = ep  # expert-parallel groups run along the data-parallel axis (module docstring)
    layout_config = ParallelConfig(data_parallel=dp, model_parallel=tp, pipeline_stage=pp, expert_parallel=ep,
                                   micro_batch_num=pp)
    check_layout(layout_config, layout_config.world_size)
    layout_config.check_model(config, f"--tp {tp} --pp {pp} --ep {ep}")
    rank_boxes, rank_docs = [], []
    for rank in range(layout_config.world_size):
        c = coordinates(layout_config, rank)  # the parallel layer's own rank order
        coords = dict(dp_rank=c["dp"], pp_rank=c["pp"], cp_rank=c["cp"], tp_rank=c["tp"], ep_rank=c["dp"] % ep)
        boxes = {name: box_of(shard_slices(name, shape, c["tp"], tp, coords["ep_rank"], ep, config.vocab_pad_multiple),
                               shape)
                 for name, (_, shape) in tensors.items()
                 if c["pp"] in stages_of_param(name, config.num_layers, pp, offset)}
        rank_boxes.append(boxes)
        rank_docs.append({"rank": rank, "dir": rank_dir_name(rank), **coords,
                          "tensors": {name: {"offsets": [a for a, _ in box], "shape": [b - a for a, b in box]}
                                      for name, box in boxes.items()}})
    layout = {
        "format": "mindport-rank-shards", "version": 1,
        "tp": tp, "pp": pp, "ep": ep, "dp": dp, "cp": 1, "world_size": dp * pp * tp,
        "rank_formula": "rank = ((dp_rank * pp + pp_rank) * cp + cp_rank) * tp + tp_rank",
        "ep_formula": "ep_rank = dp_rank % ep: ep consecutive dp indices form an expert-parallel group "
                      "(mindport.parallel.state), independent of tp_rank; expert weights split over experts by "
                      "ep_rank and over their ffn axis by tp_rank (mindport.parallel.sharding); this export "
                      "writes dp = ep replicas",
        "pipeline_offset": offset,
        "pipeline_layers": [[r.start, r.stop] for r in stage_layers(config.num_layers, pp, offset)],
        "tensors": {name: {"dtype": dtype, "shape": list(shape), "rule": rule_for(name).kind}
                    for name, (dtype, shape) in tensors.items()},
        "ranks": rank_docs,
    }
    return layout, rank_boxes


def layout_text(layout: dict) -> str:
    """layout.json, one line per tensor (json.dump with indent puts every list item on its own line)."""

    def table(entries: dict, pad: str) -> str:
        rows = ",\n".join(f"{pad}{json.dumps(k)}: {json.dumps(v)}" for k, v in entries.items())
        return "{\n" + rows + "\n" + pad[:-1] + "}"

    fields = []
    for key, value in layout.items():
        if key == "tensors":
            text = table(value, "  ")
        elif key == "ranks":
            ranks = []
            for rank in value:
                head = json.dumps({k: v for k, v in rank.items() if k != "tensors"})[:-1]
                ranks.append(f'  {head}, "tensors": {table(rank["tensors"], "    ")}}}')
            text = "[\n" + ",\n".join(ranks) + "\n ]"
        else:
            text = json.dumps(value)
        fields.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(fields) + "\n}\n"


def rank_directory(path: str, groups) -> str:
    """This rank's ``rank_XXXX/`` in a per-rank export, after checking the layout matches."""
    layout_path = os.path.join(path, LAYOUT_FILE)
    layout = read_json(layout_path)
    run = groups.config
    for key, ours in (("tp", run.model_parallel), ("pp", run.pipeline_stage), ("ep", run.expert_parallel)):
        if layout.get(key) != ours:
            option = {"tp": "model_parallel (`--model-parallel`)", "pp": "pipeline_stage",
                      "ep": "expert_parallel"}[key]
            raise ConfigError(f"{layout_path}: key '{key}' = {layout.get(key)!r}: expected {ours}, this run's "
                              f"{option}: run with that layout under msrun, or join the shards with `mindport "
                              f"convert merge --src {path} --dst DIR` (and `split` for another layout)")
    return os.path.join(path, rank_dir_name(export_rank(groups)))


def export_rank(groups) -> int:
    """The ``rank_XXXX`` holding this rank's slices in a per-rank export of its layout (tp, pp, ep;
    the export has dp = ep replicas and no cp: see :func:`rank_layout`)."""
    p, c = groups.config, groups.coords
    export = ParallelConfig(data_parallel=p.expert_parallel, pipeline_stage=p.pipeline_stage,
                            model_parallel=p.model_parallel, micro_batch_num=p.pipeline_stage)
    return rank_of(export, dp=c["dp"] % p.expert_parallel, pp=c["pp"], tp=c["tp"])
