"""The files of a model directory that are not weights, carried across every conversion.

A model directory holds more than tensors: tokenizer files, ``generation_config.json``, remote
code (``modeling_*.py``, ``configuration_*.py``), a README, ... Every writer of a model directory
(``convert hf2ms / ms2hf / split / merge``, training checkpoints, ``save_pretrained`` of a model
loaded from a directory) copies them with :func:`carry_files`, byte for byte.

The HF ``config.json`` a mindport directory came from is kept verbatim beside the mindport one as
``hf_config.json`` (:data:`SOURCE_CONFIG`). Exporting back to HF (:func:`hf_config`) returns it
with only the keys the conversion changes: the dtype the exported files hold, and any key whose
value the mindport config now implies differently. A model made from a preset has no source
config; its config.json is the family's ``config_to_hf``.
"""
from __future__ import annotations

import os
import re
import shutil

from mindport.checkpoint.hf_checkpoint import read_json
from mindport.config import MINDPORT_KEY

SOURCE_CONFIG = "hf_config.json"
# written by the directory's own writer, never carried: its config, layout, weights, training state
_OWN_FILES = {"config.json", "layout.json"}
_OWN_DIRS = re.compile(r"^(rank_\d+|train_state)$")
_WEIGHTS = re.compile(r"\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf)(\.index\.json)?$")
_DTYPE_KEYS = ("dtype", "torch_dtype")  # transformers 5 writes "dtype", 4.x "torch_dtype"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# every file of a tokenizer (transformers' slow and fast ones, sentencepiece's)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   SPECIAL_TOKENS_MAP, "added_tokens.json", "vocab.json", "merges.txt")


def _is_hf_config(path: str) -> bool:
    return os.path.isfile(path) and MINDPORT_KEY not in read_json(path)


def source_hf_config(directory: str | None) -> dict | None:
    """The HF config.json a model directory holds or came from (None: a preset-made model)."""
    if not directory:
        return None
    config_path, kept = os.path.join(directory, "config.json"), os.path.join(directory, SOURCE_CONFIG)
    if _is_hf_config(config_path):
        return read_json(config_path)
    return read_json(kept) if os.path.isfile(kept) else None


def carry_files(src: str | None, dst: str, to_hf: bool = False) -> list[str]:
    """Copy every non-weight file of model directory ``src`` into ``dst`` (sub-directories too);
    returns the relative paths copied. Into a mindport directory (``to_hf=False``) an HF
    config.json is kept as :data:`SOURCE_CONFIG`; into an HF one, SOURCE_CONFIG is left to
    :func:`hf_config`. Nothing ``dst``'s writer owns (config.json, layout.json, weights,
    ``rank_XXXX/``, ``train_state/``) is copied."""
    if not src:
        return []
    copied = []
    if not to_hf and _is_hf_config(os.path.join(src, "config.json")):
        shutil.copyfile(os.path.join(src, "config.json"), os.path.join(dst, SOURCE_CONFIG))
        copied.append(SOURCE_CONFIG)
    for root, dirs, files in os.walk(src):
        top = root == src
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (top and _OWN_DIRS.match(d)))
        for name in sorted(files):
            if name.startswith(".") or _WEIGHTS.search(name) or (
                    top and (name in _OWN_FILES or (to_hf and name == SOURCE_CONFIG))):
                continue
            rel = os.path.relpath(os.path.join(root, name), src)
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copyfile(os.path.join(src, rel), os.path.join(dst, rel))
            copied.append(rel)
    return copied


def replace_tokenizer(tokenizer_dir: str, dst: str) -> list[str]:
    """Give model directory ``dst`` the tokenizer files of ``tokenizer_dir`` instead of its own (none of
    the old ones is left beside the new, e.g. a stale tokenizer.json that transformers would prefer)."""
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(dst, name)):
            os.remove(os.path.join(dst, name))
    copied = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, name))]
    for name in copied:
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(dst, name))
    return copied


def hf_config(source: dict | None, family, config, files_dtype: str | None) -> dict:
    """config.json of an HF export of ``config``: the source's keys and values verbatim, except the
    dtype key (set to ``files_dtype``, the torch name of what every weight file holds, when known)
    and keys whose value ``family.config_to_hf`` gives differently for ``config`` than for the
    source. Without a source: ``family.config_to_hf(config)``."""
    if source is None:
        doc = family.config_to_hf(config)
        if files_dtype:
            doc["torch_dtype"] = files_dtype
        return doc
    before = family.config_to_hf(family.config_from_hf(source, SOURCE_CONFIG))
    now = family.config_to_hf(config)
    doc = dict(source)
    for key in set(before) | set(now):
        if key in _DTYPE_KEYS or before.get(key) == now.get(key):
            continue
        if key in now:
            doc[key] = now[key]
        else:
            doc.pop(key, None)
    for key in _DTYPE_KEYS:
        if files_dtype and key in doc:
            doc[key] = files_dtype
    return doc
