"""Pipeline stage layout, computed from num_layers, pipeline_stage and mindformers' ``offset``.

Stage s holds ``num_layers // pipeline_stage + offset[s]`` consecutive layers. ``offset``
may be one integer for every stage or a list with one entry per stage; the counts must
be positive and add up to num_layers. Without an offset, the remainder of an uneven split
goes to the middle stages (the first holds the embedding, the last the head and loss).
"""
from __future__ import annotations

from mindport.config import ConfigError


def stage_layer_counts(num_layers: int, pipeline_stage: int, offset=None) -> list[int]:
    base = num_layers // pipeline_stage
    if offset is None or offset == 0:
        counts = [base] * pipeline_stage
        extra = num_layers - base * pipeline_stage
        middle = list(range(1, pipeline_stage - 1)) or list(range(pipeline_stage))
        for k in range(extra):
            counts[middle[k % len(middle)]] += 1
        return counts
    offsets = [offset] * pipeline_stage if isinstance(offset, int) else list(offset)
    if len(offsets) != pipeline_stage:
        raise ConfigError(f"key 'offset' = {offset!r}: expected {pipeline_stage} entries (one per pipeline stage)")
    counts = [base + o for o in offsets]
    if sum(counts) != num_layers or min(counts) < 1:
        raise ConfigError(f"key 'offset' = {offset!r}: gives stage sizes {counts}, expected positive sizes "
                          f"adding up to num_layers = {num_layers}")
    return counts


def stage_layers(num_layers: int, pipeline_stage: int, offset=None) -> list[range]:
    """The layer indices of every stage."""
    ranges, start = [], 0
    for count in stage_layer_counts(num_layers, pipeline_stage, offset):
        ranges.append(range(start, start + count))
        start += count
    return ranges


def stage_of_layer(layer: int, num_layers: int, pipeline_stage: int, offset=None) -> int:
    for stage, layers in enumerate(stage_layers(num_layers, pipeline_stage, offset)):
        if layer in layers:
            return stage
    raise ConfigError(f"layer {layer} is outside num_layers = {num_layers}")
