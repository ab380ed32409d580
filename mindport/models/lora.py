"""LoRA on a live model: which layers (PEFT's module matching on HF names), the frozen base, and
adapter files in PEFT's format.

Targets are named by HF module names (the family's name map: ``q_proj``, TeleChat2's ``query`` /
``key_value`` / ``dense``, ``shared_expert.gate_proj``, ...), so PEFT tensor names follow from the
same map, with no per-family table: the adapter of mindport's ``layers.0.attn.q_proj.weight``
(HF ``model.layers.0.self_attn.q_proj.weight``) is ``base_model.model.model.layers.0.self_attn.
q_proj.lora_A.weight``; a ``modules_to_save`` parameter keeps its HF name under the same prefix.
Adapters split over tensor and expert parallelism as the slicing table says (:func:`~mindport.
parallel.sharding.adapter_rule`).

Routed experts follow PEFT's ``target_parameters`` on transformers 5's fused experts (``experts.
gate_up_proj`` (E, 2I, H), ``experts.down_proj`` (E, H, I)): expert e has its own A_e (r, in) and
B_e (out, r), added as W_e + (alpha / r) B_e A_e; for ``gate_up_proj`` the gate and up projections
share A_e and B_e is [B_gate_e; B_up_e]. PEFT stores the stack as lora_A (E r, in), rows e r..(e+1) r
for expert e, and lora_B (out, r E), column j E + e for expert e's column j; two targeted parameters
of one module nest, the first registered (gate_up_proj) inside: ``experts.base_layer.lora_A.weight``.
mindport keeps the stacks per expert (:mod:`mindport.transformer.moe`), the gate and up B apart so
tensor parallelism splits each like its weight.

An adapter directory: ``adapter_config.json`` (PEFT's ``LoraConfig`` fields) and
``adapter_model.safetensors`` (fp32, PEFT's names), as ``PeftModel.save_pretrained`` writes.
"""
from __future__ import annotations

import json
import os
import re
import zlib
from typing import NamedTuple

import numpy as np

from mindport.checkpoint.hf_checkpoint import HFCheckpoint, read_json
from mindport.checkpoint.safetensors_io import SafetensorsReader, SafetensorsWriter
from mindport.checkpoint.shards import StagingDir
from mindport.checkpoint.tensor_check import check_tensors, missing_tensor
from mindport.config import MINDPORT_KEY, ConfigError, LoraConfig, ModelConfig, parameter_shapes
from mindport.models import registry
from mindport.models.weights import assign
from mindport.parallel.layers import Linear
from mindport.parallel.layout import LAYOUT_FILE
from mindport.parallel.sharding import adapted_weight, global_shape, rule_for, shard_slices
from mindport.transformer.moe import Experts

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_ADAPTABLE = ("column", "row")


def hf_weights(config: ModelConfig) -> dict[str, str]:
    """HF tensor name -> mindport parameter name, for every tensor of the whole model (all stages)."""
    name_map = registry.family(config.family).name_map
    return {hf: ours for ours in parameter_shapes(config) for hf, _ in name_map.to_hf(ours, config.num_experts)}


def module_matches(target: str, module: str, is_regex: bool) -> bool:
    """PEFT's rule: a regex matches the whole module name; a name equals it or ends it after a dot."""
    if is_regex:
        return re.fullmatch(target, module) is not None
    return module == target or module.endswith("." + target)


EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")  # transformers 5's fused experts, in registration order
# fused parameter -> (mindport A, mindport Bs joined along the output axis) under ``layers.N.mlp.experts.``
_EXPERT_FACTORS = {"gate_up_proj": ("gate_up_proj_lora_A", ("gate_proj_lora_B", "up_proj_lora_B")),
                   "down_proj": ("down_proj_lora_A", ("down_proj_lora_B",))}


class Selection(NamedTuple):
    linear: dict[str, str]  # adapted Linear weight (mindport name) -> HF module name
    experts: dict[str, tuple[str, tuple[str, ...]]]  # "layers.N.mlp.experts" -> (HF module, fused parameters)
    saved: set[str]  # mindport parameters trained whole


def select(config: ModelConfig, lora: LoraConfig, source: str = "pet_config") -> Selection:
    """What ``lora`` adapts in a ``config`` model. Fails in one line on a target or saved module
    that matches nothing, a target module that is not a column- or row-parallel projection (router,
    embedding, head; routed experts are ``target_parameters``), or a target parameter that is not a
    routed experts' fused projection."""
    weights = hf_weights(config)
    modules = {hf.rsplit(".", 1)[0]: ours for hf, ours in weights.items() if hf.endswith(".weight")}
    # routed experts are fused 3-D parameters in transformers 5, reached by target_parameters
    experts = {m for m, ours in modules.items() if rule_for(ours).kind == "expert"}
    is_regex = isinstance(lora.target_modules, str)
    linear: dict[str, str] = {}
    for target in [lora.target_modules] if is_regex else lora.target_modules:
        hits = [m for m in modules if m not in experts and module_matches(target, m, is_regex)]
        if not hits:
            expert = next((m for m in experts if module_matches(target, m, is_regex)), None)
            reason = (f"only routed experts ('{expert}'): target them with target_parameters "
                      f"{['experts.' + p for p in EXPERT_PARAMETERS]}" if expert else
                      f"no module of this {config.family} model")
            raise ConfigError(f"{source}: key 'target_modules' = {target!r}: matches {reason}")
        for module in hits:
            ours = modules[module]
            kind = rule_for(ours).kind
            if kind not in _ADAPTABLE:
                raise ConfigError(f"{source}: key 'target_modules' = {target!r}: matches '{module}', a {kind} "
                                  f"weight: expected attention or MLP projections (column- or row-parallel "
                                  f"Linear layers)")
            linear[ours] = module
    return Selection(linear, _select_experts(config, lora, source), _select_saved(config, lora, weights, source))


def _select_experts(config: ModelConfig, lora: LoraConfig, source: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    fused = registry.family(config.family).fused_experts
    chosen: dict[int, set[str]] = {}
    for target in lora.target_parameters:
        hits = [(i, p) for i in range(config.num_layers) for p in EXPERT_PARAMETERS
                if fused and config.num_experts and module_matches(target, f"{fused.format(i=i)}.{p}", False)]
        if not hits:
            expected = (f"one of {['experts.' + p for p in EXPERT_PARAMETERS]}" if fused and config.num_experts
                        else "none: its routed experts are not fused parameters in transformers 5")
            raise ConfigError(f"{source}: key 'target_parameters' = {target!r}: matches no routed experts' "
                              f"parameter of this {config.family} model (expected {expected})")
        for i, parameter in hits:
            chosen.setdefault(i, set()).add(parameter)
    if chosen and lora.lora_dropout:
        raise ConfigError(f"{source}: key 'lora_dropout' = {lora.lora_dropout}: expected 0 with target_parameters "
                          f"(an expert's delta is added to its weight, as in PEFT, so x is never dropped)")
    return {f"layers.{i}.mlp.experts": (fused.format(i=i), tuple(p for p in EXPERT_PARAMETERS if p in chosen[i]))
            for i in sorted(chosen)}


def _select_saved(config: ModelConfig, lora: LoraConfig, weights: dict[str, str], source: str) -> set[str]:
    saved: set[str] = set()
    for target in lora.modules_to_save:
        hits = {ours for hf, ours in weights.items() if module_matches(target, hf.rsplit(".", 1)[0], False)}
        expert = next((n for n in hits if rule_for(n).kind == "expert"), None)
        if not hits or expert:
            reason = f"routed experts ('{expert}', fused in transformers 5)" if expert else \
                f"no module of this {config.family} model"
            raise ConfigError(f"{source}: key 'modules_to_save' = {target!r}: matches {reason}")
        saved |= hits
    return saved


def is_adapter(name: str) -> bool:
    return adapted_weight(name) is not None


def apply_lora(model, lora: LoraConfig, seed: int = 0, source: str = "pet_config") -> None:
    """Attach adapters to ``model``'s targeted Linear layers and routed experts and freeze everything
    else but ``modules_to_save``. A is drawn as PEFT does (kaiming-uniform, bound 1/sqrt(in)) from a
    generator seeded by (seed, name) as the full tensor, then sliced, so every layout starts alike;
    B is zero, so the adapted model starts as the base."""
    selection = select(model.config, lora, source)
    groups = model.groups
    for cell_name, cell in model.cells_and_names():
        if isinstance(cell, Linear) and f"{cell_name}.weight" in selection.linear:
            cell.add_lora(lora.lora_rank, lora.scaling, lora.lora_dropout, cell_name)
        elif isinstance(cell, Experts) and cell_name in selection.experts:
            cell.add_lora(lora.lora_rank, lora.scaling, selection.experts[cell_name][1], cell_name)
    for name, param in model.parameters_and_names():
        param.requires_grad = is_adapter(name) or name in selection.saved
        if is_adapter(name) and adapted_weight(name)[1] == "A":
            full = global_shape(name, tuple(param.shape), groups.tp.size, groups.ep.size)
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            bound = 1.0 / np.sqrt(full[-1])
            index = shard_slices(name, full, groups.tp.rank, groups.tp.size, groups.ep.rank, groups.ep.size)
            assign(param, rng.uniform(-bound, bound, full).astype(np.float32)[index])
    model.lora = lora


def to_peft(config: ModelConfig, lora: LoraConfig, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PEFT-named whole tensors of the adapter and saved parameters ``tensors`` (mindport names, whole)."""
    out = {peft: tensors[ours] for peft, ours in _linear_peft_names(config, tensors).items()}
    for experts, (module, parameters) in select(config, lora).experts.items():
        for parameter in parameters:
            a_name, b_names = _EXPERT_FACTORS[parameter]
            a = tensors[f"{experts}.{a_name}"]  # (E, r, in)
            b = np.concatenate([tensors[f"{experts}.{n}"] for n in b_names], 1)  # (E, out, r)
            e, r, _ = a.shape
            peft_a, peft_b = _expert_peft_names(module, parameter, parameters)
            out[peft_a] = a.reshape(e * r, a.shape[2])
            out[peft_b] = b.transpose(1, 2, 0).reshape(b.shape[1], r * e)
    return out


def from_peft(config: ModelConfig, lora: LoraConfig, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of :func:`to_peft`: mindport-named whole tensors of a complete PEFT adapter."""
    shapes = trained_shapes(config, lora)
    peft_of = {n: p for p, n in _linear_peft_names(config, shapes).items()}
    out = {n: tensors[peft_of[n]] for n in shapes if n in peft_of}
    for experts, (module, parameters) in select(config, lora).experts.items():
        for parameter in parameters:
            a_name, b_names = _EXPERT_FACTORS[parameter]
            peft_a, peft_b = _expert_peft_names(module, parameter, parameters)
            a, b = tensors[peft_a], tensors[peft_b]  # (E r, in), (out, r E)
            e = config.num_experts
            r = a.shape[0] // e
            out[f"{experts}.{a_name}"] = a.reshape(e, r, a.shape[1])
            stacked = b.reshape(b.shape[0], r, e).transpose(2, 0, 1)  # (E, out, r)
            for n, part in zip(b_names, np.split(stacked, len(b_names), 1)):
                out[f"{experts}.{n}"] = part
    return out


def _linear_peft_names(config: ModelConfig, names) -> dict[str, str]:
    """PEFT name -> mindport name of the Linear adapters and saved parameters among ``names`` (the
    experts' adapters are not named one to one: :func:`to_peft`)."""
    hf_of = {ours: hf for hf, ours in hf_weights(config).items()}
    out = {}
    for name in names:
        if not is_adapter(name):
            out[PEFT_PREFIX + hf_of[name]] = name
        elif name.endswith(".weight"):
            base, factor = name.rsplit(".", 2)[0], name.rsplit(".", 2)[1]
            out[f"{PEFT_PREFIX}{hf_of[base + '.weight'].rsplit('.', 1)[0]}.{factor}.weight"] = name
    return out


def _expert_peft_names(module: str, parameter: str, parameters: tuple[str, ...]) -> tuple[str, str]:
    """PEFT's (lora_A, lora_B) names of fused ``parameter`` of experts ``module`` when ``parameters``
    are targeted there: each one registered later wraps it once more (``base_layer.``)."""
    later = sum(EXPERT_PARAMETERS.index(p) > EXPERT_PARAMETERS.index(parameter) for p in parameters)
    prefix = f"{PEFT_PREFIX}{module}.{'base_layer.' * later}"
    return prefix + "lora_A.weight", prefix + "lora_B.weight"


def weight_deltas(lora: LoraConfig, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adapted weight (mindport name) -> its fp32 delta (alpha / r) B A, from whole mindport-named
    adapter ``tensors``; a routed experts' stack gets (E, out, in), B_e A_e per expert."""
    scaling = np.float32(lora.scaling)
    out = {}
    for name, a in tensors.items():
        adapted = adapted_weight(name)
        if adapted is None or adapted[1] != "A":
            continue
        if name.endswith(".weight"):  # a Linear's
            out[adapted[0]] = (tensors[name[:-len("A.weight")] + "B.weight"] @ a) * scaling
            continue
        experts, parameter = name[:-len("_lora_A")].rsplit(".", 1)
        for b_name in _EXPERT_FACTORS[parameter][1]:
            out[f"{experts}.{b_name[:-len('_lora_B')]}"] = np.matmul(tensors[f"{experts}.{b_name}"], a) * scaling
    return out


def adapter_config_doc(lora: LoraConfig, base: str | None) -> dict:
    """adapter_config.json as PEFT writes it (the fields mindport uses; PEFT defaults the rest)."""
    target = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": lora.lora_rank,
            "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout, "target_modules": target,
            "modules_to_save": list(lora.modules_to_save) or None,
            "target_parameters": list(lora.target_parameters) or None, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True}


def read_adapter_config(directory: str) -> LoraConfig:
    """The :class:`LoraConfig` of a PEFT adapter directory; settings mindport does not implement fail
    in one line naming the key."""
    path = os.path.join(directory, ADAPTER_CONFIG)
    doc = read_json(path)
    if doc.get("peft_type") != "LORA":
        raise ConfigError(f"{path}: key 'peft_type' = {doc.get('peft_type')!r}: expected 'LORA'")
    for key, default in (("bias", "none"), ("fan_in_fan_out", False), ("use_rslora", False), ("use_dora", False),
                         ("rank_pattern", {}), ("alpha_pattern", {}),
                         ("layers_to_transform", None), ("trainable_token_indices", None)):
        if doc.get(key) and doc[key] != default:  # unset, empty or PEFT's default
            raise ConfigError(f"{path}: key '{key}' = {doc[key]!r}: expected {default!r} (not supported)")
    target = doc.get("target_modules")
    return LoraConfig.from_dict({"lora_rank": doc.get("r", 8), "lora_alpha": float(doc.get("lora_alpha", 8)),
                                 "lora_dropout": float(doc.get("lora_dropout", 0.0)),
                                 "target_modules": target if isinstance(target, str) else list(target or []),
                                 "modules_to_save": list(doc.get("modules_to_save") or []),
                                 "target_parameters": list(doc.get("target_parameters") or [])}, path)


def write_adapter_config(directory: str, lora: LoraConfig, base: str | None) -> None:
    with open(os.path.join(directory, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(adapter_config_doc(lora, base), f, indent=2)


def trained_weights(model) -> dict[str, np.ndarray]:
    """This rank's adapter and saved parameters as fp32 arrays, by mindport name."""
    import mindspore as ms

    return {n: p.astype(ms.float32).asnumpy() for n, p in model.parameters_and_names() if p.requires_grad}


def save_adapter(model, directory: str, overwrite: bool = False, base: str | None = None) -> None:
    """Write ``model``'s adapter (single process: whole tensors) as a PEFT adapter directory."""
    if len(model.groups.world.ranks) > 1:
        raise ConfigError(f"{directory}: save_adapter runs in one process; a parallel run's checkpoint holds "
                          f"its adapter per rank (`mindport lora export` joins it)")
    write_adapter(directory, model.lora, to_peft(model.config, model.lora, trained_weights(model)),
                  base or model.source_dir, overwrite)


def write_adapter(directory: str, lora: LoraConfig, tensors: dict[str, np.ndarray], base: str | None,
                  overwrite: bool = False) -> None:
    """A PEFT adapter directory from PEFT-named whole tensors, written atomically."""
    with StagingDir(directory, overwrite) as tmp:
        write_adapter_config(tmp, lora, base)
        writer = SafetensorsWriter(os.path.join(tmp, ADAPTER_WEIGHTS),
                                   [(n, "F32", a.shape) for n, a in tensors.items()], {"format": "pt"})
        for n, a in tensors.items():
            writer.write(n, np.ascontiguousarray(a, dtype=np.float32))
        writer.close()


def export_adapter(src: str, dst: str, overwrite: bool = False) -> int:
    """A LoRA training checkpoint (per-rank shards or not) -> a PEFT adapter directory; returns the
    number of tensors. The base recorded in ``adapter_config.json`` is kept."""
    lora, tensors = read_adapter(src)
    base = read_json(os.path.join(src, ADAPTER_CONFIG)).get("base_model_name_or_path")
    write_adapter(dst, lora, tensors, base, overwrite)
    return len(tensors)


def read_adapter(directory: str) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """(config, PEFT name -> whole fp32 tensor) of an adapter directory: PEFT's files, or a parallel
    LoRA run's checkpoint (``layout.json`` + ``rank_XXXX/adapter_model.safetensors``, mindport names),
    whose slices are joined here (the adapter is small next to the model)."""
    lora = read_adapter_config(directory)
    layout_path = os.path.join(directory, LAYOUT_FILE)
    if not os.path.isfile(layout_path):
        ckpt = HFCheckpoint(directory)
        try:
            return lora, {name: np.asarray(ckpt.get(name), np.float32) for name in ckpt.names()}
        finally:
            ckpt.close()
    config = ModelConfig.from_dict(read_json(os.path.join(directory, "config.json"))[MINDPORT_KEY], directory)
    layout = read_json(layout_path)
    whole = {n: np.zeros(t["shape"], np.float32) for n, t in layout["tensors"].items()}
    for rank in layout["ranks"]:
        path = os.path.join(directory, rank["dir"], ADAPTER_WEIGHTS)
        with SafetensorsReader(path) as reader:
            for name, box in rank["tensors"].items():
                if name not in reader.tensors:
                    raise missing_tensor(path, name, "layout.json places a slice of it here")
                index = tuple(slice(o, o + n) for o, n in zip(box["offsets"], box["shape"]))
                whole[name][index] = reader.get(name)
    return lora, to_peft(config, lora, whole)


def adapter_tensors(config: ModelConfig, lora: LoraConfig, tensors: dict[str, np.ndarray],
                    source: str) -> dict[str, np.ndarray]:
    """mindport name -> whole tensor of an adapter's PEFT-named ``tensors``, after the one tensor check
    (every adapter and saved tensor present and shaped as ``lora`` implies for ``config``, nothing else)."""
    zeros = {n: np.broadcast_to(np.float32(0), shape) for n, shape in trained_shapes(config, lora).items()}
    expected = {n: a.shape for n, a in to_peft(config, lora, zeros).items()}
    check_tensors({n: a.shape for n, a in tensors.items()}, expected, source, f"{ADAPTER_CONFIG} implies",
                  unexpected_reason="not an adapter or saved module of this config")
    return from_peft(config, lora, tensors)


def load_adapter(model, directory: str) -> None:
    """Attach the adapter in ``directory`` (:func:`read_adapter`) to ``model``, each rank taking its
    slices; every tensor must be present and shaped as the config implies."""
    lora, tensors = read_adapter(directory)
    whole = adapter_tensors(model.config, lora, tensors, directory)
    apply_lora(model, lora, source=os.path.join(directory, ADAPTER_CONFIG))
    groups = model.groups
    for name, param in model.parameters_and_names():
        if param.requires_grad:
            index = shard_slices(name, whole[name].shape, groups.tp.rank, groups.tp.size, groups.ep.rank,
                                 groups.ep.size, model.config.vocab_pad_multiple)
            assign(param, whole[name][index])


def trained_shapes(config: ModelConfig, lora: LoraConfig) -> dict[str, tuple[int, ...]]:
    """Global shapes of the adapter and saved parameters of the whole model (every pipeline stage):
    A (r, in) and B (out, r) of each adapted (out, in) weight; a routed experts' stack (E, out, in)
    gets (E, r, in) and (E, out, r) (the gate and up projections one A, two Bs)."""
    selection = select(config, lora)
    shapes = parameter_shapes(config)
    r = lora.lora_rank
    out = {}
    for weight in selection.linear:
        rows, cols = shapes[weight]
        prefix = weight[:-len(".weight")]
        out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = (r, cols), (rows, r)
    for experts, (_, parameters) in selection.experts.items():
        for parameter in parameters:
            a_name, b_names = _EXPERT_FACTORS[parameter]
            e, rows, cols = shapes[f"{experts}.{b_names[0][:-len('_lora_B')]}"]
            out[f"{experts}.{a_name}"] = (e, r, cols)
            out.update({f"{experts}.{b}": (e, rows, r) for b in b_names})
    return {**out, **{n: shapes[n] for n in sorted(selection.saved)}}
