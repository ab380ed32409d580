"""Templated HF <-> mindport tensor-name maps, shared by from_pretrained and the converters.

A family lists ``(hf_template, our_template)`` pairs. ``{i}`` is the layer index and
``{e}`` an expert index. A template pair where ``{e}`` appears only on the HF side
stacks the per-expert HF tensors along a new leading axis of one mindport parameter
(``experts.{e}.gate_proj.weight`` [I, H] x E -> ``experts.gate_proj`` [E, I, H]).
``our_template=None`` drops an HF tensor on purpose (e.g. cached rotary buffers).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

from mindport.checkpoint.safetensors_io import CheckpointError

_FIELD = re.compile(r"\{(i|e)\}")


def _compile(template: str) -> re.Pattern:
    parts = _FIELD.split(template)
    regex = "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>\\d+)" for k, p in enumerate(parts))
    return re.compile(regex + r"\Z")


@dataclass(frozen=True)
class Target:
    """Where one HF tensor lives in mindport: a parameter, and its expert slot if stacked."""

    name: str | None  # None: dropped on purpose
    expert: int | None = None


class NameMap:
    def __init__(self, rules: list[tuple[str, str | None]]):
        self.rules = [(hf, ours, _compile(hf), _compile(ours) if ours else None) for hf, ours in rules]

    @staticmethod
    def stacked(hf: str, ours: str | None) -> bool:
        return ours is not None and "{e}" in hf and "{e}" not in ours

    def to_ours(self, hf_name: str, source: str = "checkpoint") -> Target:
        """Map an HF tensor name; an unmapped name is an unexpected tensor."""
        for hf, ours, hf_re, _ in self.rules:
            m = hf_re.match(hf_name)
            if m:
                if ours is None:
                    return Target(None)
                fields = m.groupdict()
                expert = int(fields["e"]) if self.stacked(hf, ours) else None
                return Target(ours.format(**fields), expert)
        raise CheckpointError(f"{source}: unexpected tensor '{hf_name}' (no mindport parameter maps to it)")

    def to_hf(self, our_name: str, num_experts: int) -> Iterator[tuple[str, int | None]]:
        """HF names for one mindport parameter: one name, or one per expert when stacked."""
        for hf, ours, _, ours_re in self.rules:
            if ours_re is None:
                continue
            m = ours_re.match(our_name)
            if m:
                fields = m.groupdict()
                if self.stacked(hf, ours):
                    for e in range(num_experts):
                        yield hf.format(e=e, **fields), e
                else:
                    yield hf.format(**fields), None
                return
        raise CheckpointError(f"mindport parameter '{our_name}' has no HF name in this family's map")
