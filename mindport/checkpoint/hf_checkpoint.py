"""Read a HuggingFace-format model directory tensor by tensor.

Weights may be one ``model.safetensors``, safetensors shards with
``model.safetensors.index.json``, or ``pytorch_model*.bin`` (loaded with torch,
``weights_only=True``: never arbitrary unpickling; mmap for the zip format, whole for old-style
files; torch is needed only then).
"""
from __future__ import annotations

import glob
import json
import os
import zipfile
from typing import Iterator

import numpy as np

from mindport.checkpoint.safetensors_io import CheckpointError, SafetensorsReader, TensorInfo
from mindport.dtypes import TORCH_NAMES

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file missing")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return doc


class _BinFile:
    """A ``pytorch_model*.bin`` shard, through torch's safe loader."""

    def __init__(self, path: str):
        try:
            import torch
        except ImportError:
            raise CheckpointError(f"{path}: reading .bin checkpoints needs torch (pip install 'mindport[test]')") from None
        try:
            # mmap needs the zip format (torch >= 1.6); an old-style pickle file is read whole
            self.state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as err:  # torch raises many types for corrupt files
            raise CheckpointError(f"{path}: cannot load as a torch checkpoint ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:200]})") from None
        self.path = path
        code = {getattr(torch, name): c for c, name in TORCH_NAMES.items()}
        self.tensors = {}
        for name, t in self.state.items():
            if t.dtype not in code:
                raise CheckpointError(f"{path}: tensor '{name}': unsupported dtype {t.dtype}")
            self.tensors[name] = TensorInfo(code[t.dtype], tuple(t.shape), 0, t.numel() * t.element_size())

    def get(self, name: str, raw: bool = False) -> np.ndarray:
        import torch

        t = self.state[name].contiguous()
        if t.dtype == torch.bfloat16:
            bits = t.view(torch.int16).numpy().view(np.uint16)
            return bits if raw else (bits.astype(np.uint32) << 16).view(np.float32)
        return t.numpy()

    def raw_bytes(self, name: str) -> memoryview:
        return memoryview(np.ascontiguousarray(self.get(name, raw=True))).cast("B")

    def close(self) -> None:
        self.state = {}


class HFCheckpoint:
    """The weights of an HF model directory: names, dtypes, shapes, and one tensor at a time."""

    def __init__(self, directory: str):
        self.directory = directory
        if not os.path.isdir(directory):
            raise CheckpointError(f"{directory}: not a directory")
        self.files = self._weight_files()
        self._open: dict[str, object] = {}
        self.location: dict[str, str] = {}  # tensor -> file
        for path in self.files:
            for name in self._reader(path).tensors:
                if name in self.location:
                    raise CheckpointError(f"{path}: tensor '{name}' also stored in {self.location[name]}")
                self.location[name] = path
        self._check_index()

    def _weight_files(self) -> list[str]:
        d = self.directory
        for index_name in (SAFE_INDEX, BIN_INDEX):
            index_path = os.path.join(d, index_name)
            if os.path.isfile(index_path):
                self.index = read_json(index_path).get("weight_map")
                if not isinstance(self.index, dict):
                    raise CheckpointError(f"{index_path}: key 'weight_map' missing: expected tensor -> file")
                files = []
                for shard in dict.fromkeys(self.index.values()):
                    path = os.path.join(d, shard)
                    if not os.path.isfile(path):
                        raise CheckpointError(f"{index_path}: names shard '{shard}', which is missing")
                    files.append(path)
                return files
        self.index = None
        files = sorted(glob.glob(os.path.join(d, "*.safetensors"))) or sorted(glob.glob(os.path.join(d, "pytorch_model*.bin")))
        if not files:
            raise CheckpointError(f"{d}: no model weights (*.safetensors or pytorch_model*.bin)")
        return files

    def _check_index(self) -> None:
        if self.index is None:
            return
        for name, shard in self.index.items():
            where = self.location.get(name)
            if where is None or os.path.basename(where) != shard:
                raise CheckpointError(f"{os.path.join(self.directory, shard)}: index lists tensor '{name}' "
                                      f"but the shard does not hold it")

    def _reader(self, path: str):
        if path not in self._open:
            self._open[path] = SafetensorsReader(path) if path.endswith(".safetensors") else _BinFile(path)
        return self._open[path]

    def names(self) -> list[str]:
        return list(self.location)

    def info(self, name: str) -> TensorInfo:
        return self._reader(self.location[name]).tensors[name]

    def get(self, name: str, raw: bool = False) -> np.ndarray:
        return self._reader(self.location[name]).get(name, raw=raw)

    def raw_bytes(self, name: str) -> memoryview:
        return self._reader(self.location[name]).raw_bytes(name)

    def by_file(self) -> Iterator[tuple[str, list[str]]]:
        """Tensor names grouped by the file holding them, in file order (for streaming)."""
        for path in self.files:
            yield path, [n for n in self._reader(path).tensors]

    def close(self) -> None:
        for reader in self._open.values():
            reader.close()
        self._open.clear()
