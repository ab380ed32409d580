"""The one tensor check of every checkpoint reader: unexpected, missing and wrongly shaped tensors.

Each error is one line naming the file and the tensor. The expected shapes come from the config
(:func:`mindport.config.parameter_shapes`), so no model is built (a 115B model's parameters would
not fit in memory).
"""
from __future__ import annotations

from typing import Callable, Mapping

from mindport.config import Shape
from mindport.errors import CheckpointError


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
