"""LoRA on a live model: which layers (PEFT's module matching on HF names), the frozen base, and
adapter files in PEFT's format.

Targets are named by HF module names (the family's name map: ``q_proj``, TeleChat2's ``query`` /
``key_value`` / ``dense``, ``shared_expert.gate_proj``, ...), so PEFT tensor names follow from the
same map, with no per-family table: the adapter of mindport's ``layers.0.attn.q_proj.weight``
(HF ``model.layers.0.self_attn.q_proj.weight``) is ``base_model.model.model.layers.0.self_attn.
q_proj.lora_A.weight``; a ``modules_to_save`` parameter keeps its HF name under the same prefix.
Adapters split over tensor parallelism as the slicing table says (:func:`~mindport.parallel.
sharding.adapter_rule`). Routed experts cannot be targeted: transformers 5 stores them as fused
3-D parameters, which PEFT adapts with one A per expert for the fused gate/up matrix (its
``target_parameters``), not per projection as mindport's layers would.

An adapter directory: ``adapter_config.json`` (PEFT's ``LoraConfig`` fields) and
``adapter_model.safetensors`` (fp32, PEFT's names), as ``PeftModel.save_pretrained`` writes.
"""
from __future__ import annotations

import json
import os
import re
import zlib

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
from mindport.parallel.sharding import global_shape, rule_for, shard_slices

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


def select(config: ModelConfig, lora: LoraConfig, source: str = "pet_config") -> tuple[dict[str, str], set[str]]:
    """(adapted: mindport weight name -> HF module name, saved: mindport parameters trained whole).

    Fails in one line on a target or saved module that matches nothing, or a target that is not a
    column- or row-parallel projection (routed experts, router, embedding, head)."""
    weights = hf_weights(config)
    modules = {hf.rsplit(".", 1)[0]: ours for hf, ours in weights.items() if hf.endswith(".weight")}
    # routed experts are fused 3-D parameters in transformers 5, not modules PEFT's names can reach
    experts = {m for m, ours in modules.items() if rule_for(ours).kind == "expert"}
    is_regex = isinstance(lora.target_modules, str)
    adapted: dict[str, str] = {}
    for target in [lora.target_modules] if is_regex else lora.target_modules:
        hits = [m for m in modules if m not in experts and module_matches(target, m, is_regex)]
        if not hits:
            expert = next((m for m in experts if module_matches(target, m, is_regex)), None)
            reason = (f"only routed experts ('{expert}'), which LoRA cannot adapt (fused 3-D parameters in "
                      f"transformers 5)" if expert else f"no module of this {config.family} model")
            raise ConfigError(f"{source}: key 'target_modules' = {target!r}: matches {reason}")
        for module in hits:
            ours = modules[module]
            kind = rule_for(ours).kind
            if kind not in _ADAPTABLE:
                raise ConfigError(f"{source}: key 'target_modules' = {target!r}: matches '{module}', a {kind} "
                                  f"weight: expected attention or MLP projections (column- or row-parallel "
                                  f"Linear layers)")
            adapted[ours] = module
    saved: set[str] = set()
    for target in lora.modules_to_save:
        hits = {ours for hf, ours in weights.items() if module_matches(target, hf.rsplit(".", 1)[0], False)}
        expert = next((n for n in hits if rule_for(n).kind == "expert"), None)
        if not hits or expert:
            reason = f"routed experts ('{expert}', fused in transformers 5)" if expert else \
                f"no module of this {config.family} model"
            raise ConfigError(f"{source}: key 'modules_to_save' = {target!r}: matches {reason}")
        saved |= hits
    return adapted, saved


def is_adapter(name: str) -> bool:
    return name.endswith((".lora_A.weight", ".lora_B.weight"))


def apply_lora(model, lora: LoraConfig, seed: int = 0, source: str = "pet_config") -> None:
    """Attach adapters to ``model``'s targeted Linear layers and freeze everything else but
    ``modules_to_save``. A is drawn as PEFT does (kaiming-uniform, bound 1/sqrt(in)) from a
    generator seeded by (seed, name) as the full tensor, then sliced, so every layout starts alike;
    B is zero, so the adapted model starts as the base."""
    adapted, saved = select(model.config, lora, source)
    groups = model.groups
    for cell_name, cell in model.cells_and_names():
        if isinstance(cell, Linear) and f"{cell_name}.weight" in adapted:
            cell.add_lora(lora.lora_rank, lora.scaling, lora.lora_dropout, cell_name)
            name, param = cell.lora_A.weight.name, cell.lora_A.weight
            full = global_shape(name, tuple(param.shape), groups.tp.size, groups.ep.size)
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            bound = 1.0 / np.sqrt(full[1])
            a = rng.uniform(-bound, bound, full).astype(np.float32)[shard_slices(name, full, groups.tp.rank,
                                                                                  groups.tp.size)]
            assign(param, a)
    for name, param in model.parameters_and_names():
        param.requires_grad = is_adapter(name) or name in saved
    model.lora = lora


def peft_names(config: ModelConfig, names) -> dict[str, str]:
    """mindport name -> PEFT tensor name, for the adapters and saved parameters among ``names``."""
    hf_of = {ours: hf for hf, ours in hf_weights(config).items()}
    out = {}
    for name in names:
        if is_adapter(name):
            base, factor = name.rsplit(".", 2)[0], name.rsplit(".", 2)[1]
            out[name] = f"{PEFT_PREFIX}{hf_of[base + '.weight'].rsplit('.', 1)[0]}.{factor}.weight"
        else:
            out[name] = PEFT_PREFIX + hf_of[name]
    return out


def adapter_config_doc(lora: LoraConfig, base: str | None) -> dict:
    """adapter_config.json as PEFT writes it (the fields mindport uses; PEFT defaults the rest)."""
    target = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": lora.lora_rank,
            "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout, "target_modules": target,
            "modules_to_save": list(lora.modules_to_save) or None, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True}


def read_adapter_config(directory: str) -> LoraConfig:
    """The :class:`LoraConfig` of a PEFT adapter directory; settings mindport does not implement fail
    in one line naming the key."""
    path = os.path.join(directory, ADAPTER_CONFIG)
    doc = read_json(path)
    if doc.get("peft_type") != "LORA":
        raise ConfigError(f"{path}: key 'peft_type' = {doc.get('peft_type')!r}: expected 'LORA'")
    for key, default in (("bias", "none"), ("fan_in_fan_out", False), ("use_rslora", False), ("use_dora", False),
                         ("rank_pattern", {}), ("alpha_pattern", {}), ("target_parameters", None),
                         ("layers_to_transform", None), ("trainable_token_indices", None)):
        if doc.get(key) and doc[key] != default:  # unset, empty or PEFT's default
            raise ConfigError(f"{path}: key '{key}' = {doc[key]!r}: expected {default!r} (not supported)")
    target = doc.get("target_modules")
    return LoraConfig.from_dict({"lora_rank": doc.get("r", 8), "lora_alpha": float(doc.get("lora_alpha", 8)),
                                 "lora_dropout": float(doc.get("lora_dropout", 0.0)),
                                 "target_modules": target if isinstance(target, str) else list(target or []),
                                 "modules_to_save": list(doc.get("modules_to_save") or [])}, path)


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
    weights = trained_weights(model)
    names = peft_names(model.config, weights)
    write_adapter(directory, model.lora, {names[n]: a for n, a in weights.items()}, base or model.source_dir,
                  overwrite)


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
    names = peft_names(config, layout["tensors"])
    whole = {names[n]: np.zeros(t["shape"], np.float32) for n, t in layout["tensors"].items()}
    for rank in layout["ranks"]:
        path = os.path.join(directory, rank["dir"], ADAPTER_WEIGHTS)
        with SafetensorsReader(path) as reader:
            for name, box in rank["tensors"].items():
                if name not in reader.tensors:
                    raise missing_tensor(path, name, "layout.json places a slice of it here")
                index = tuple(slice(o, o + n) for o, n in zip(box["offsets"], box["shape"]))
                whole[names[name]][index] = reader.get(name)
    return lora, whole


def adapter_tensors(config: ModelConfig, lora: LoraConfig, tensors: dict[str, np.ndarray],
                    source: str) -> dict[str, np.ndarray]:
    """mindport name -> whole tensor of an adapter's PEFT-named ``tensors``, after the one tensor check
    (every adapter and saved tensor present and shaped as ``lora`` implies for ``config``, nothing else)."""
    shapes = trained_shapes(config, lora)
    names = peft_names(config, shapes)
    check_tensors({n: a.shape for n, a in tensors.items()}, {names[n]: s for n, s in shapes.items()}, source,
                  f"{ADAPTER_CONFIG} implies", unexpected_reason="not an adapter or saved module of this config")
    return {n: tensors[names[n]] for n in shapes}


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
    A (r, in) and B (out, r) of each adapted (out, in) weight."""
    adapted, saved = select(config, lora)
    shapes = parameter_shapes(config)
    out = {}
    for weight in adapted:
        rows, cols = shapes[weight]
        prefix = weight[:-len(".weight")]
        out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = (lora.lora_rank, cols), (rows, lora.lora_rank)
    return {**out, **{n: shapes[n] for n in sorted(saved)}}
