"""Modules import only downward: no import circle, no import from a higher layer.

Every module of the installed namespace (``mindport.*``, ``mindport.research``, ``mindport.ops``,
``mindport.ckpt_tools``) is parsed, and every import statement in it (module level and inside
functions) becomes an edge to the mindport module it names.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"mindport": ROOT / "mindport", "mindport.research": ROOT / "research", "mindport.ops": ROOT / "ops",
           "mindport.ckpt_tools": ROOT / "ckpt_tools"}  # namespace -> folder, as setup.py installs them

# Bottom to top. A module belongs to the first layer with a prefix of its name; it may import its own
# layer (no circle allowed) and the layers below.
LAYERS = [
    ("ground floor: errors, constants, dtypes", ["mindport.errors", "mindport.constants", "mindport.dtypes",
                                                 "mindport.corpus"]),
    ("config dataclasses", ["mindport.config"]),
    ("checkpoint file library", ["mindport.checkpoint"]),
    ("op dispatch and custom operators", ["mindport.dispatch", "mindport.ops"]),
    ("parallel", ["mindport.parallel"]),
    ("transformer", ["mindport.transformer"]),
    ("inference: decoding loop, KV-cache driving", ["mindport.infer"]),  # the model's generate() calls it
    # research/<family> is data the registry loads by name; it builds its FAMILY with models.registry.Family
    ("models and family data", ["mindport.models", "mindport.research"]),
    ("tokenizers, chat templates (default templates come from the families), vocabulary extension",
     ["mindport.chat_template", "mindport.tokenizer", "mindport.vocab"]),
    ("training", ["mindport.train"]),
    ("evaluation: benchmark readers, few-shot prompts, scoring, reports", ["mindport.evaluation"]),
    ("layout planner: cost model over the memory report", ["mindport.plan"]),
    ("conversion tool", ["mindport.ckpt_tools"]),
    ("serving: the OpenAI-compatible HTTP server over the inference engine", ["mindport.serve"]),
    ("command line and public API", ["mindport.commands", "mindport.cli", "mindport"]),
]


def modules() -> dict[str, Path]:
    found = {}
    for namespace, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([namespace, *parts])] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The mindport modules ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    edges = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            edges.add(target)
    return edges


def layer_of(name: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"module {name} is in no layer: add it to LAYERS")


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_every_module_is_in_a_layer_and_the_walk_sees_the_tree():
    setup = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    mapped = next(ast.literal_eval(node.value) for node in setup.body
                  if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "MAPPED")
    assert SOURCES == {"mindport": ROOT / "mindport", **{ns: ROOT / folder for folder, ns in mapped.items()}}
    edges = graph()
    assert "mindport.ckpt_tools.convert" in edges and "mindport.ops.moe_routing" in edges
    assert "mindport.config" in edges["mindport.models.registry"]
    for name in edges:
        layer_of(name)


def test_no_upward_import():
    upward = [f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
              for name, targets in graph().items() for target in sorted(targets)
              if layer_of(target) > layer_of(name)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_circle():
    edges = graph()
    circles, done = [], set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            circles.append(" -> ".join(stack[stack.index(name):] + [name]))
            return
        if name in done:
            return
        for target in sorted(edges[name]):
            visit(target, stack + [name])
        done.add(name)

    for name in sorted(edges):
        visit(name, [])
    assert not circles, "import circles:\n" + "\n".join(sorted(set(circles)))
