"""Shared constants are defined once: a module-level UPPER_CASE name lives in one module of the
core (families under research/ and operators under ops/ each declare the same names by design),
and the ignored label is always IGNORE_INDEX, never a literal -100."""
from __future__ import annotations

import ast
from collections import defaultdict

from test_imports import modules

PER_PLUGIN = ("mindport.research.", "mindport.ops.")  # each family / operator declares FAMILY, KERNELS, ...


def test_every_shared_constant_is_defined_in_one_module():
    defined = defaultdict(list)
    for name, path in modules().items():
        if name.startswith(PER_PLUGIN):
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            for target in targets:
                if isinstance(target, ast.Name) and target.id.lstrip("_").isupper():
                    defined[target.id].append(name)
    twice = {constant: where for constant, where in defined.items() if len(where) > 1}
    assert not twice, f"constants defined in several modules: {twice}"


def test_no_literal_ignore_index():
    literals = [f"{name}:{node.lineno}" for name, path in modules().items()
                for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
                and isinstance(node.operand, ast.Constant) and node.operand.value == 100
                and name != "mindport.constants"]
    assert not literals, f"-100 written out (use mindport.constants.IGNORE_INDEX): {literals}"
