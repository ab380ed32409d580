"""Model families: what each ``research/<family>`` folder declares, and how a config.json
finds its family.

A family is data: architecture constants, the config.json key map, presets and the
tensor-name map. Everything else (building, loading, converting) is generic.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

from mindport.checkpoint.name_map import NameMap
from mindport.config import ConfigError, ModelConfig

_REQUIRED = [f.name for f in dataclasses.fields(ModelConfig)
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name != "family"]


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    arch: dict[str, Any]  # ModelConfig fields every model of the family shares
    hf_fields: dict[str, str]  # config.json key -> ModelConfig field
    hf_export: dict[str, Any]  # constant config.json keys written on export
    presets: dict[str, dict[str, Any]]
    names: list[tuple[str, str | None]]
    hf_defaults: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields when the HF key is absent
    from_hf_hook: Callable[[dict, dict], None] | None = None  # (hf, fields) -> edit fields in place
    to_hf_hook: Callable[[ModelConfig, dict], None] | None = None  # (config, hf) -> edit hf in place
    chat_template_file: str | None = None  # the family chat model's template (research/<family>/chat_template.jinja)
    chat_tokens: tuple[str, ...] = ()  # special tokens that template writes (reserved by `mindport tokenizer train`)
    fused_experts: str | None = None  # transformers 5's module of the fused routed experts (PEFT target_parameters)

    @property
    def chat_template(self) -> str | None:
        """The default chat template of the family's tokenizers (used when a tokenizer has none)."""
        if self.chat_template_file is None:
            return None
        with open(self.chat_template_file, encoding="utf-8") as f:
            return f.read()

    @property
    def name_map(self) -> NameMap:
        return NameMap(self.names)

    def preset(self, name: str, **overrides) -> ModelConfig:
        if name not in self.presets:
            raise ConfigError(f"preset '{name}' is not a {self.name} preset (known: {', '.join(self.presets)})")
        values = {**self.arch, **self.presets[name], **overrides}
        return ModelConfig.from_dict({"family": self.name, **values}, f"preset {name}")

    def config_from_hf(self, hf: dict, source: str) -> ModelConfig:
        values: dict[str, Any] = {"family": self.name, **self.arch, **self.hf_defaults}
        for hf_key, ours in self.hf_fields.items():
            if hf.get(hf_key) is not None:
                values[ours] = hf[hf_key]
        _read_rope_parameters(hf, values, source)
        if self.from_hf_hook:
            self.from_hf_hook(hf, values)
        for ours in _REQUIRED:
            if ours not in values:
                keys = [k for k, v in self.hf_fields.items() if v == ours]
                raise ConfigError(f"{source}: key '{keys[0] if keys else ours}' missing: expected the model's {ours}")
        return ModelConfig.from_dict(values, source)

    def config_to_hf(self, config: ModelConfig) -> dict[str, Any]:
        hf: dict[str, Any] = dict(self.hf_export)
        for hf_key, ours in self.hf_fields.items():
            value = getattr(config, ours)
            if value is not None and hf_key not in hf:
                hf[hf_key] = value
        if self.to_hf_hook:
            self.to_hf_hook(config, hf)
        hf["torch_dtype"] = config.param_dtype
        return hf


def _read_rope_parameters(hf: dict, values: dict, source: str) -> None:
    """transformers 5 writes ``rope_parameters: {rope_type, rope_theta}``; 4.x ``rope_theta`` and
    ``rope_scaling``. Only plain RoPE is supported for HF-style families."""
    params = hf.get("rope_parameters") or {}
    if params.get("rope_theta") is not None and hf.get("rope_theta") is None:
        values["rope_theta"] = params["rope_theta"]
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise ConfigError(f"{source}: key 'rope_type' = {rope_type!r}: expected 'default' (plain RoPE)")


def families(package: str = "mindport.research") -> dict[str, Family]:
    """Every family folder in ``package`` (each sub-package's ``FAMILY``), found as the CLI
    commands are: a new ``research/<family>/`` is picked up without editing this file."""
    found = {}
    for info in sorted(pkgutil.iter_modules(importlib.import_module(package).__path__), key=lambda m: m.name):
        if info.ispkg and not info.name.startswith("_"):
            fam = importlib.import_module(f"{package}.{info.name}").FAMILY
            found[fam.name] = fam
    return found


def family(name: str) -> Family:
    fams = families()
    if name not in fams:
        raise ConfigError(f"key 'family' = {name!r}: expected one of {', '.join(fams)}")
    return fams[name]


def detect(hf: dict, source: str) -> Family:
    """The family of an HF config.json, from ``model_type`` (architectures alone is not trusted)."""
    model_type = hf.get("model_type")
    for fam in families().values():
        if model_type in fam.model_types:
            return fam
    supported = sorted(t for fam in families().values() for t in fam.model_types)
    raise ConfigError(f"{source}: key 'model_type' = {model_type!r}: expected one of {', '.join(supported)}")


def find_preset(name: str) -> ModelConfig:
    """A preset by name, from whichever family has it."""
    for fam in families().values():
        if name in fam.presets:
            return fam.preset(name)
    known = [p for fam in families().values() for p in fam.presets]
    raise ConfigError(f"preset {name!r} unknown (known: {', '.join(known)})")
