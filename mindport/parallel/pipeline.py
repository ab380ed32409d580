"""Pipeline stage layout, computed from num_layers, pipeline_stage and mindformers' ``offset``.

Stage s holds ``num_layers // pipeline_stage + offset[s]`` consecutive layers. ``offset``
may be one integer for every stage or a list with one entry per stage; the counts must
be positive and add up to num_layers. Without an offset, the remainder of an uneven split
goes to the middle stages (the first holds the embedding, the last the head and loss).
"""
from __future__ import annotations

from mindport.config import ConfigError, stage_layer_counts


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
