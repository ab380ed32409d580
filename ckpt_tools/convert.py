"""Streaming checkpoint conversion: HF <-> mindport, per-rank sharded export, merge.

Every conversion first plans the whole output from the source's headers (names, dtypes,
shapes), checks it against the shapes the target ``config.json`` implies
(:func:`mindport.config.parameter_shapes`, no model is built), and only then
writes, one tensor at a time, into a temporary sibling of the destination that is renamed
into place at the end (:class:`~mindport.checkpoint.shards.StagingDir`): a failure never
leaves a partial directory behind.

Memory: a tensor's bytes are never mapped or loaded whole. Unchanged contiguous bytes are
copied file to file by the kernel (``copy_file_range``); stacking experts writes the E source
tensors one after another; splitting a stacked tensor (ms2hf) copies byte ranges; dtype
changes and strided slices (tensor-parallel row splits, merges) go through buffers of at
most ``CHUNK_BYTES``. ``dtype="keep"`` copies bytes verbatim, so hf2ms -> ms2hf is
bit-exact, bf16 included. (``pytorch_model*.bin`` sources are read through torch's mmap, or whole
for old-style non-zip files, so their pages do count towards resident memory.)

Every direction carries the source's non-weight files (tokenizer, generation_config.json, remote
code) and its HF config.json (:mod:`mindport.checkpoint.model_files`).

Formats
  mindport dir   config.json ``{"mindport_config": {...}}`` + safetensors with mindport
                 parameter names (metadata ``{"format": "ms"}``) + ``model.safetensors.index.json``
                 when there is more than one shard, + ``hf_config.json`` (the source's config.json,
                 verbatim) and the carried files. ``AutoModelForCausalLM.from_pretrained`` and
                 ``mindspore.load_checkpoint(shard, format="safetensors")`` read it.
  rank shards    ``--tp/--pp/--ep``: config.json + layout.json at the top, and one mindport-named
                 safetensors set per rank in ``rank_XXXX/``, holding only that rank's slices
                 (``mindport.parallel.sharding.shard_slices``) of its pipeline stage's parameters
                 (``stages_of_param``).

Rank numbering (written into layout.json) is the parallel layer's own
(``mindport.parallel.state.coordinates``): world = dp x pp x cp x tp with tp fastest,
``rank = ((dp_rank * pp + pp_rank) * cp + cp_rank) * tp + tp_rank``; the export has cp = 1.
Expert parallelism runs along the data-parallel axis, independent of the tp rank: ep
consecutive dp indices form an expert-parallel group, and expert weights are split over
experts by ``ep_rank = dp_rank % ep`` AND over their ffn axis by ``tp_rank`` (as
``shard_slices`` does). So the export writes dp = ep data-parallel replicas (world =
ep x pp x tp), every rank directory is complete on its own, and non-expert tensors are
identical across the dp ranks. A dense model refuses ``ep > 1``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from mindport.checkpoint.hf_checkpoint import HFCheckpoint, read_json
from mindport.checkpoint.model_files import carry_files, hf_config, replace_tokenizer, source_hf_config
from mindport.checkpoint.safetensors_io import (CheckpointError, FileRange, SafetensorsReader, bf16_bits_to_f32,
                                                f32_to_bf16_bits)
from mindport.checkpoint.tensor_check import check_shape, check_tensors, missing_tensor, unexpected_tensor
from mindport.checkpoint.shards import DEFAULT_SHARD_BYTES, StagingDir, write_shards
from mindport.config import ConfigError, ModelConfig, Shape, parameter_shapes
from mindport.dtypes import DTYPE_NAMES, ITEMSIZE, NUMPY_DTYPES, SAFETENSORS_CODES
from mindport.models.lora import ADAPTER_CONFIG
from mindport.parallel.layout import LAYOUT_FILE, Box, layout_text, rank_dir_name, rank_layout

CHUNK_BYTES = 32 << 20  # largest buffer a dtype change, a strided slice or a merge holds
_SHORT_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # --dtype spellings
DTYPE_CODES = {"keep": None, **SAFETENSORS_CODES, **{short: SAFETENSORS_CODES[n] for short, n in _SHORT_NAMES.items()}}
_FLOAT = ("F32", "F16", "BF16", "F64")
_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}  # bytes of any dtype, by item size


@dataclass
class Summary:
    tensors: int
    nbytes: int
    seconds: float
    dst: str

    def __str__(self) -> str:
        return f"converted {self.tensors} tensors, {self.nbytes / 1e9:.2f} GB in {self.seconds:.1f} s -> {self.dst}"


# --------------------------------------------------------------------------- sources

class _Src:
    """One stored tensor of a source checkpoint: dtype, shape and byte ranges of its data."""

    def __init__(self, name: str, path: str, dtype: str, shape: Shape, whole: Callable[[], FileRange | memoryview]):
        self.name, self.path, self.dtype, self.shape = name, path, dtype, tuple(shape)
        self._whole = whole

    def range(self, start: int, nbytes: int) -> FileRange | memoryview:
        whole = self._whole()
        return whole.sub(start, nbytes) if isinstance(whole, FileRange) else whole[start:start + nbytes]

    def read(self, start: int, nbytes: int):
        piece = self.range(start, nbytes)
        return piece.read() if isinstance(piece, FileRange) else piece


class _Source:
    """A checkpoint directory opened for streaming: validated headers, one :class:`_Src` per tensor."""

    def __init__(self, directory: str):
        self.directory = directory
        self.ckpt = HFCheckpoint(directory)  # validates every header, the index and duplicates
        self.files = list(self.ckpt.by_file())
        self._readers: list[SafetensorsReader] = []
        self.tensors: dict[str, _Src] = {}
        for path, names in self.files:
            if path.endswith(".safetensors"):
                reader = SafetensorsReader(path)
                self._readers.append(reader)
                for name in names:
                    info = reader.tensors[name]
                    self.tensors[name] = _Src(name, path, info.dtype, info.shape,
                                              lambda r=reader, n=name: r.file_range(n))
            else:
                for name in names:
                    info = self.ckpt.info(name)
                    self.tensors[name] = _Src(name, path, info.dtype, info.shape,
                                              lambda n=name: self.ckpt.raw_bytes(n))
        if all(path.endswith(".safetensors") for path, _ in self.files):
            self.ckpt.close()  # its readers were for validation; ours (unmapped reads) do the rest

    def by_file(self) -> list[tuple[str, list[str]]]:
        return self.files

    def close(self) -> None:
        for reader in self._readers:
            reader.close()
        self.ckpt.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------- output tensors

def _full(shape: Shape) -> Box:
    return tuple((0, n) for n in shape)


def _volume(shape) -> int:
    return int(math.prod(shape))


@dataclass
class _Out:
    """One output tensor: its name, dtype, shape, and where its bytes come from.

    ``parts``: (source tensor, box) pairs whose row-major contents, concatenated, are the
    tensor (one part, or E parts for stacked experts). ``pieces`` (merge): (source, offsets)
    boxes that tile the tensor, each source holding its box contiguously.
    """

    name: str
    dtype: str
    shape: Shape
    parts: list[tuple[_Src, Box]] = field(default_factory=list)
    pieces: list[tuple[_Src, tuple[int, ...]]] = field(default_factory=list)
    stacked: bool = False
    offsets: tuple[int, ...] = ()  # a rank's slice: where it starts in the global tensor

    @property
    def nbytes(self) -> int:
        return _volume(self.shape) * ITEMSIZE[self.dtype]

    def select(self, box: Box) -> list[tuple[_Src, Box]]:
        """The parts holding sub-box ``box`` of this tensor, in row-major order."""
        if self.stacked:
            (first, last), rest = box[0], box[1:]
            return [(self.parts[e][0], rest) for e in range(first, last)]
        (src, base), = self.parts
        if base != _full(src.shape) or src.shape != self.shape:
            raise AssertionError("select() needs a whole source tensor")
        return [(src, box)]

    def chunks(self) -> Iterator:
        if self.pieces:
            src0 = self.pieces[0][0]
            pieces = [(src, offsets, src.shape, 0) for src, offsets in self.pieces]
            yield from _cast(_assemble(self.shape, pieces, ITEMSIZE[src0.dtype]), src0.dtype, self.dtype)
            return
        for src, box in self.parts:
            yield from _cast(_box_chunks(src, src.shape, box, 0, ITEMSIZE[src.dtype]), src.dtype, self.dtype)


class _ResizedRows(_Out):
    """A vocabulary tensor (V, H) grown to (V', H): row i is the source's row i, or, for each i in
    ``means``, the mean (accumulated in float64) of the source rows it lists, all rows when empty."""

    def __init__(self, name: str, src: _Src, rows: int, means: dict[int, list[int]]):
        super().__init__(name, src.dtype, (rows, src.shape[1]), parts=[(src, _full(src.shape))])
        self.src, self.means = src, means

    def _rows(self, first: int, count: int) -> np.ndarray:
        """Source rows [first, first + count) as float32, (count, H)."""
        row = self.shape[1] * ITEMSIZE[self.dtype]
        raw = np.frombuffer(self.src.read(first * row, count * row), _RAW[ITEMSIZE[self.dtype]])
        return _to_f32(raw, self.dtype).reshape(count, self.shape[1])

    def _mean_of_all(self) -> np.ndarray:
        old_rows = self.src.shape[0]
        step = max(1, CHUNK_BYTES // (self.shape[1] * ITEMSIZE[self.dtype]))
        total = sum(self._rows(r, min(step, old_rows - r)).sum(axis=0, dtype=np.float64)
                    for r in range(0, old_rows, step))
        return total / old_rows

    def chunks(self) -> Iterator:
        row = self.shape[1] * ITEMSIZE[self.dtype]
        mean_of_all = self._mean_of_all() if any(not rows for rows in self.means.values()) else None
        i, block = 0, []
        while i < self.shape[0]:
            if i not in self.means:  # a run of kept rows, copied as one byte range
                if block:
                    yield _from_f32(np.stack(block).astype(np.float32), self.dtype)
                    block = []
                end = i
                while end < self.shape[0] and end not in self.means:
                    end += 1
                yield self.src.range(i * row, (end - i) * row)
                i = end
                continue
            rows = self.means[i]
            block.append(np.concatenate([self._rows(j, 1) for j in rows]).mean(axis=0, dtype=np.float64) if rows
                         else mean_of_all)
            if len(block) * row >= CHUNK_BYTES:
                yield _from_f32(np.stack(block).astype(np.float32), self.dtype)
                block = []
            i += 1
        if block:
            yield _from_f32(np.stack(block).astype(np.float32), self.dtype)


def _box_chunks(src: _Src, shape: Shape, box: Box, base: int, item: int) -> Iterator:
    """Row-major bytes of sub-box ``box`` of the tensor of ``shape`` stored at byte ``base`` of ``src``.

    A box that is whole in every axis but the first is one contiguous range (yielded as a
    range, copied by the kernel); otherwise blocks of at most CHUNK_BYTES rows are read and
    sliced, descending one axis when a single row is larger than that.
    """
    if not shape:
        yield src.range(base, item)
        return
    (first, last), inner = box[0], box[1:]
    row = _volume(shape[1:]) * item
    if all(b == (0, n) for b, n in zip(inner, shape[1:])):
        if last > first:
            yield src.range(base + first * row, (last - first) * row)
        return
    if row <= CHUNK_BYTES:
        step = max(1, CHUNK_BYTES // row)
        index = (slice(None),) + tuple(slice(a, b) for a, b in inner)
        for r in range(first, last, step):
            k = min(step, last - r)
            rows = np.frombuffer(src.read(base + r * row, k * row), _RAW[item]).reshape(k, *shape[1:])
            yield np.ascontiguousarray(rows[index])
    else:
        for r in range(first, last):
            yield from _box_chunks(src, shape[1:], inner, base + r * row, item)


def _assemble(shape: Shape, pieces: list, item: int) -> Iterator:
    """Row-major bytes of a tensor of ``shape`` tiled by ``pieces`` (src, offsets, local shape, base byte)."""
    if not shape:
        src, _, _, base = pieces[0]
        yield src.range(base, item)
        return
    row = _volume(shape[1:]) * item
    if all(tuple(off[1:]) == (0,) * (len(shape) - 1) and tuple(lsh[1:]) == tuple(shape[1:])
           for _, off, lsh, _ in pieces):
        for src, off, lsh, base in sorted(pieces, key=lambda p: p[1][0]):  # blocks along axis 0
            if lsh[0]:
                yield src.range(base, lsh[0] * row)
        return
    if row <= CHUNK_BYTES:
        step = max(1, CHUNK_BYTES // row)
        for r in range(0, shape[0], step):
            k = min(step, shape[0] - r)
            block = np.empty((k, *shape[1:]), _RAW[item])
            for src, off, lsh, base in pieces:
                a, b = max(r, off[0]), min(r + k, off[0] + lsh[0])
                if a >= b:
                    continue
                local_row = _volume(lsh[1:]) * item
                data = np.frombuffer(src.read(base + (a - off[0]) * local_row, (b - a) * local_row), _RAW[item])
                where = (slice(a - r, b - r),) + tuple(slice(o, o + n) for o, n in zip(off[1:], lsh[1:]))
                block[where] = data.reshape(b - a, *lsh[1:])
            yield block
    else:
        for r in range(shape[0]):
            sub = [(src, off[1:], lsh[1:], base + (r - off[0]) * _volume(lsh[1:]) * item)
                   for src, off, lsh, base in pieces if off[0] <= r < off[0] + lsh[0]]
            yield from _assemble(shape[1:], sub, item)


def _to_f32(raw: np.ndarray, code: str) -> np.ndarray:
    return bf16_bits_to_f32(raw.view(np.uint16)) if code == "BF16" else raw.view(NUMPY_DTYPES[code]).astype(np.float32)


def _from_f32(x: np.ndarray, code: str) -> np.ndarray:
    return f32_to_bf16_bits(x) if code == "BF16" else x.astype(NUMPY_DTYPES[code])


def _cast(chunks: Iterator, src_code: str, dst_code: str) -> Iterator:
    """Pass chunks through unchanged, or convert them (through fp32) in pieces of at most CHUNK_BYTES."""
    if src_code == dst_code:
        yield from chunks
        return
    item = ITEMSIZE[src_code]
    step = CHUNK_BYTES // item * item
    for chunk in chunks:
        if isinstance(chunk, np.ndarray):
            yield _from_f32(_to_f32(chunk.reshape(-1), src_code), dst_code)
            continue
        size = chunk.nbytes
        for start in range(0, size, step):
            if isinstance(chunk, FileRange):
                data = chunk.sub(start, min(step, size - start)).read()
            else:
                data = chunk[start:start + step]
            yield _from_f32(_to_f32(np.frombuffer(data, _RAW[item]), src_code), dst_code)


# --------------------------------------------------------------------------- planning

def _dtype_code(dtype: str | None) -> str | None:
    key = "keep" if dtype is None else str(dtype).lower()
    if key not in DTYPE_CODES:
        raise ConfigError(f"dtype {dtype!r}: expected one of keep, fp32, fp16, bf16")
    return DTYPE_CODES[key]


def _out_dtype(src: _Src, code: str | None) -> str:
    if code is None:
        return src.dtype
    if src.dtype not in _FLOAT:
        raise CheckpointError(f"{src.path}: tensor '{src.name}' is {src.dtype}: only floating-point tensors "
                              f"convert to {code}")
    return code


def _plan_from_hf(source: _Source, name_map, config: ModelConfig, code: str | None) -> list[_Out]:
    """mindport-named outputs of an HF checkpoint, every tensor checked against config.json."""
    expected = parameter_shapes(config)
    found: dict[str, dict[int | None, _Src]] = {name: {} for name in expected}
    for path, names in source.by_file():
        for hf_name in names:
            target = name_map.to_ours(hf_name, path)  # raises on an unmapped name
            if target.name is None:
                continue  # dropped on purpose (e.g. cached rotary buffers)
            if target.name not in expected:
                raise unexpected_tensor(path, hf_name, f"maps to '{target.name}', which the model described by "
                                                       f"config.json does not have")
            full = expected[target.name]
            if target.expert is not None and target.expert >= full[0]:
                raise unexpected_tensor(path, hf_name, f"expert {target.expert}, but config.json gives {full[0]} "
                                                       f"experts")
            src = source.tensors[hf_name]
            check_shape(path, hf_name, src.shape, full if target.expert is None else full[1:])
            found[target.name][target.expert] = src
    outs = []
    for name, shape in expected.items():
        hf_names = list(name_map.to_hf(name, config.num_experts))
        for hf_name, expert in hf_names:
            if expert not in found[name]:
                raise missing_tensor(source.directory, hf_name, f"needed for parameter '{name}'")
        if hf_names[0][1] is None:
            src = found[name][None]
            outs.append(_Out(name, _out_dtype(src, code), shape, parts=[(src, _full(src.shape))]))
            continue
        srcs = [found[name][e] for _, e in hf_names]
        dtypes = {_out_dtype(s, code) for s in srcs}
        if len(dtypes) > 1:
            odd = next(s for s in srcs if s.dtype != srcs[0].dtype)
            raise CheckpointError(f"{odd.path}: tensor '{odd.name}' is {odd.dtype} but '{srcs[0].name}' is "
                                  f"{srcs[0].dtype}: experts stack into one parameter, pass --dtype to make "
                                  f"them one dtype")
        outs.append(_Out(name, dtypes.pop(), shape, parts=[(s, _full(s.shape)) for s in srcs], stacked=True))
    return outs


def _plan_from_mindport(source: _Source, config: ModelConfig, code: str | None) -> list[_Out]:
    """The tensors of a mindport-format directory, checked against its config.json."""
    expected = parameter_shapes(config)
    found = {name: source.tensors[name].shape for _, names in source.by_file() for name in names}
    check_tensors(found, expected, source.directory, file_of=lambda name: source.tensors[name].path)
    outs = []
    for name, shape in expected.items():
        src = source.tensors[name]
        outs.append(_Out(name, _out_dtype(src, code), shape, parts=[(src, _full(shape))]))
    return outs


def _hf_outputs(outs: list[_Out], name_map, num_experts: int) -> list[_Out]:
    """HF-named outputs of mindport tensors: stacked experts split into one tensor per expert."""
    hf = []
    for out in outs:
        (src, _), = out.parts
        for hf_name, expert in name_map.to_hf(out.name, num_experts):
            if expert is None:
                hf.append(_Out(hf_name, out.dtype, out.shape, parts=out.parts))
            else:
                box = ((expert, expert + 1),) + _full(out.shape[1:])
                hf.append(_Out(hf_name, out.dtype, out.shape[1:], parts=[(src, box)]))
    return hf


@dataclass
class _RankPlan:
    rank: int
    coords: dict[str, int]
    outs: list[_Out]

    @property
    def dir_name(self) -> str:
        return rank_dir_name(self.rank)


def _plan_ranks(outs: list[_Out], config: ModelConfig, tp: int, pp: int, ep: int,
                offset=None) -> tuple[list[_RankPlan], dict]:
    """Per-rank slices of each pipeline stage's parameters, and the layout.json document."""
    layout, rank_boxes = rank_layout({o.name: (o.dtype, o.shape) for o in outs}, config, tp, pp, ep, offset)
    plans = []
    for doc, boxes in zip(layout["ranks"], rank_boxes):
        rank_outs = [_Out(o.name, o.dtype, tuple(b - a for a, b in boxes[o.name]), parts=o.select(boxes[o.name]),
                          offsets=tuple(a for a, _ in boxes[o.name])) for o in outs if o.name in boxes]
        coords = {k: doc[k] for k in ("dp_rank", "pp_rank", "cp_rank", "tp_rank", "ep_rank")}
        plans.append(_RankPlan(doc["rank"], coords, rank_outs))
    return plans, layout


# --------------------------------------------------------------------------- writing

def _check_paths(src: str, dst: str, overwrite: bool) -> None:
    if os.path.isfile(os.path.join(src, ADAPTER_CONFIG)):
        raise CheckpointError(f"{src}: a LoRA adapter ({ADAPTER_CONFIG}), not a model: merge it into its base "
                              f"with `mindport lora merge --base BASE --adapter {src} --dst OUT` (or `mindport lora "
                              f"export` for a PEFT adapter directory)")
    if os.path.exists(dst) and not overwrite:
        raise CheckpointError(f"{dst}: destination exists (pass --overwrite / overwrite=True to replace it)")
    if os.path.exists(dst) and os.path.realpath(dst) == os.path.realpath(src):
        raise CheckpointError(f"{dst}: destination is the source directory; write to another directory")


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="tensor", file=sys.stderr, disable=None if enabled else True, dynamic_ncols=True)


def _write_files(directory: str, outs: list[_Out], max_bytes: int, metadata: dict, bar) -> int:
    """Write ``outs`` with the shard writer; returns bytes written."""
    by_name = {o.name: o for o in outs}
    write_shards(directory, [(o.name, o.dtype, o.shape, o.nbytes) for o in outs], lambda name: by_name[name].chunks(),
                 max_bytes, metadata, on_tensor=lambda: bar.update(1))
    return sum(o.nbytes for o in outs)


def _write_mindport(outs: list[_Out], config: ModelConfig, src: str, dst: str, overwrite: bool, tp: int, pp: int,
                    ep: int, max_bytes: int, progress: bool, start: float, offset=None) -> Summary:
    """Write ``outs`` as a mindport directory (or per-rank shards), with ``src``'s non-weight files."""
    if (tp, pp, ep) == (1, 1, 1):
        with StagingDir(dst, overwrite) as tmp, _progress(len(outs), progress) as bar:
            nbytes = _write_files(tmp, outs, max_bytes, {"format": "ms"}, bar)
            config.save(os.path.join(tmp, "config.json"))
            carry_files(src, tmp)
        return Summary(len(outs), nbytes, time.perf_counter() - start, dst)
    plans, layout = _plan_ranks(outs, config, tp, pp, ep, offset)  # fails before anything is written
    count = sum(len(p.outs) for p in plans)
    nbytes = 0
    with StagingDir(dst, overwrite) as tmp, _progress(count, progress) as bar:
        for plan in plans:
            rank_dir = os.path.join(tmp, plan.dir_name)
            os.mkdir(rank_dir)
            nbytes += _write_files(rank_dir, plan.outs, max_bytes, {"format": "ms"}, bar)
        config.save(os.path.join(tmp, "config.json"))
        with open(os.path.join(tmp, LAYOUT_FILE), "w", encoding="utf-8") as f:
            f.write(layout_text(layout))
        carry_files(src, tmp)
    return Summary(count, nbytes, time.perf_counter() - start, dst)


def _read_model_config(src: str, want_hf: bool) -> ModelConfig:
    from mindport.models.auto import read_config

    if os.path.isfile(os.path.join(src, LAYOUT_FILE)):
        raise CheckpointError(f"{os.path.join(src, LAYOUT_FILE)}: per-rank shards: run 'mindport convert merge' "
                              f"first")
    config, is_hf = read_config(src)
    if is_hf != want_hf:
        kind = "an HF" if is_hf else "a mindport-format"
        raise CheckpointError(f"{os.path.join(src, 'config.json')}: {kind} directory; expected "
                              f"{'an HF' if want_hf else 'a mindport-format'} one")
    return config


# --------------------------------------------------------------------------- entry points

def hf_to_mindport(src: str, dst: str, dtype: str = "keep", overwrite: bool = False, tp: int = 1, pp: int = 1,
                   ep: int = 1, max_shard_bytes: int | None = None, progress: bool = True,
                   pp_offset=None) -> Summary:
    """Convert an HF model directory into a mindport directory (or per-rank shards when tp/pp/ep > 1)."""
    from mindport.models.registry import family

    start = time.perf_counter()
    _check_paths(src, dst, overwrite)
    code = _dtype_code(dtype)
    config = _read_model_config(src, want_hf=True)
    with _Source(src) as source:
        outs = _plan_from_hf(source, family(config.family).name_map, config, code)
        return _write_mindport(outs, config, src, dst, overwrite, tp, pp, ep,
                               max_shard_bytes or DEFAULT_SHARD_BYTES, progress, start, pp_offset)


def split(src: str, dst: str, tp: int = 1, pp: int = 1, ep: int = 1, overwrite: bool = False,
          max_shard_bytes: int | None = None, progress: bool = True, pp_offset=None) -> Summary:
    """Split a mindport directory into per-rank shards (``merge`` then ``split`` reshards)."""
    start = time.perf_counter()
    _check_paths(src, dst, overwrite)
    config = _read_model_config(src, want_hf=False)
    with _Source(src) as source:
        outs = _plan_from_mindport(source, config, None)
        return _write_mindport(outs, config, src, dst, overwrite, tp, pp, ep,
                               max_shard_bytes or DEFAULT_SHARD_BYTES, progress, start, pp_offset)


def mindport_to_hf(src: str, dst: str, overwrite: bool = False, max_shard_bytes: int | None = None,
                   dtype: str = "keep", progress: bool = True) -> Summary:
    """Export a mindport directory with HF names and layouts: shards + index, config.json (the source's,
    :mod:`~mindport.checkpoint.model_files`), generation_config.json and every other non-weight file."""
    from mindport.models.weights import write_hf_configs
    from mindport.models.registry import family

    start = time.perf_counter()
    _check_paths(src, dst, overwrite)
    code = _dtype_code(dtype)
    config = _read_model_config(src, want_hf=False)
    fam = family(config.family)
    with _Source(src) as source:
        outs = _hf_outputs(_plan_from_mindport(source, config, code), fam.name_map, config.num_experts)
        dtypes = {o.dtype for o in outs}
        files_dtype = DTYPE_NAMES.get(dtypes.pop()) if len(dtypes) == 1 else None  # what the files hold
        doc = hf_config(source_hf_config(src), fam, config, files_dtype)
        with StagingDir(dst, overwrite) as tmp, _progress(len(outs), progress) as bar:
            nbytes = _write_files(tmp, outs, max_shard_bytes or DEFAULT_SHARD_BYTES, {"format": "pt"}, bar)
            carry_files(src, tmp, to_hf=True)
            write_hf_configs(tmp, doc, config)
    return Summary(len(outs), nbytes, time.perf_counter() - start, dst)


def merge(src: str, dst: str, overwrite: bool = False, max_shard_bytes: int | None = None,
          progress: bool = True) -> Summary:
    """Join per-rank shards (``rank_XXXX/`` + layout.json) back into one mindport directory."""
    from mindport.models.auto import read_config

    start = time.perf_counter()
    _check_paths(src, dst, overwrite)
    layout_path = os.path.join(src, LAYOUT_FILE)
    layout = read_json(layout_path)
    config, is_hf = read_config(src)
    if is_hf:
        raise CheckpointError(f"{os.path.join(src, 'config.json')}: an HF directory; expected the config.json "
                              f"of a per-rank export")
    expected = parameter_shapes(config)
    tensors, ranks = _check_layout_doc(layout_path, layout)
    check_tensors({name: tuple(entry["shape"]) for name, entry in tensors.items()}, expected, layout_path)
    sources: list[_Source] = []
    try:
        pieces: dict[str, dict[tuple, _Src]] = {name: {} for name in expected}
        for entry in ranks:
            rank_dir = os.path.join(src, entry["dir"])
            source = _Source(rank_dir)
            sources.append(source)
            listed, used = entry["tensors"], False
            for name in source.tensors:
                if name not in listed:
                    raise CheckpointError(f"{source.tensors[name].path}: unexpected tensor '{name}' (not in "
                                          f"{LAYOUT_FILE} for {entry['dir']})")
            for name, where in listed.items():
                if name not in tensors:
                    raise CheckpointError(f"{layout_path}: {entry['dir']} lists tensor '{name}', which is not "
                                          f"among the layout's tensors")
                stored = source.tensors.get(name)
                if stored is None:
                    raise CheckpointError(f"{rank_dir}: missing tensor '{name}' (listed in {LAYOUT_FILE})")
                if stored.shape != tuple(where["shape"]) or stored.dtype != tensors[name]["dtype"]:
                    raise CheckpointError(f"{stored.path}: tensor '{name}' is {stored.dtype} {list(stored.shape)}, "
                                          f"{LAYOUT_FILE} says {tensors[name]['dtype']} {where['shape']}")
                boxes = pieces.setdefault(name, {})
                if tuple(where["offsets"]) not in boxes:  # the first replica of each slice is read
                    boxes[tuple(where["offsets"])] = stored
                    used = True
            if not used:
                source.close()  # a data-parallel replica of slices already found: keep file handles few
        outs = []
        for name, shape in expected.items():
            boxes = pieces[name]
            _check_tiling(layout_path, name, shape, boxes)
            outs.append(_Out(name, tensors[name]["dtype"], shape, pieces=[(s, off) for off, s in boxes.items()]))
        return _write_mindport(outs, config, src, dst, overwrite, 1, 1, 1, max_shard_bytes or DEFAULT_SHARD_BYTES,
                               progress, start)
    finally:
        for source in sources:
            source.close()


VOCAB_PARAMS = ("embed.weight", "lm_head.weight")  # the parameters with one row per token


@dataclass
class ResizeSummary(Summary):
    old_rows: int = 0
    tokens: int = 0  # the new tokenizer's
    rows: int = 0  # written: tokens padded to a multiple of pad_to_multiple
    pad_to_multiple: int = 1
    from_pieces: int = 0  # new rows initialised as the mean of their pieces' rows
    from_all: int = 0  # padding rows and tokens no old piece covers: the mean of all old rows

    def __str__(self) -> str:
        return (f"{super().__str__()}\nvocabulary {self.old_rows} -> {self.rows} rows ({self.tokens} tokens, padded "
                f"to a multiple of {self.pad_to_multiple}); {self.from_pieces} new rows = mean of their pieces' "
                f"old rows, {self.from_all} = mean of all old rows")


def _new_row_sources(old, new, old_rows: int, rows: int) -> dict[int, list[int]]:
    """Each row to initialise -> the old rows to average (empty: all). A token without a row of its own
    (new, or past the old model's rows) gets the rows of the pieces the old tokenizer's model splits it
    into; new padding rows and tokens made of no stored old row get the mean of all old rows. The old
    model's own padding rows that no token takes are kept."""
    from mindport.vocab import check_extends, piece_splitter, pieces

    check_extends(old, new)
    split, new_pieces = piece_splitter(old), pieces(new)
    means = {}
    for i in range(min(old.vocab_size, old_rows), rows):
        if i < old_rows and (i < old.vocab_size or i >= new.vocab_size):
            continue  # a padding row of the old model no token uses: kept
        parts = split(new_pieces[i]) if i < new.vocab_size and new_pieces[i] is not None else []
        means[i] = [j for j in parts if j < old_rows]
    return means


def resize_vocab(src: str, tokenizer: str, dst: str, pad_to_multiple: int = 1, overwrite: bool = False,
                 max_shard_bytes: int | None = None, progress: bool = True) -> ResizeSummary:
    """HF model directory ``src`` with the vocabulary of ``tokenizer`` (an extension of ``src``'s own):
    embedding and lm_head rows of old tokens copied, each new token's row the mean of the old rows of
    its pieces (Chinese-Mixtral's initialisation), rows padded to a multiple of ``pad_to_multiple``
    (recorded as config.json's ``make_vocab_size_divisible_by``), every other tensor copied byte for
    byte. ``dst`` gets the new tokenizer's files instead of the old ones."""
    from mindport.models.registry import family
    from mindport.models.weights import write_hf_configs
    from mindport.tokenizer import Tokenizer

    start = time.perf_counter()
    _check_paths(src, dst, overwrite)
    if isinstance(pad_to_multiple, bool) or not isinstance(pad_to_multiple, int) or pad_to_multiple < 1:
        raise ConfigError(f"pad_to_multiple = {pad_to_multiple!r}: expected a positive integer")
    config = _read_model_config(src, want_hf=True)
    fam = family(config.family)
    old, new = Tokenizer.load(src), Tokenizer.load(tokenizer)
    old_rows = config.vocab_size
    rows = -(-max(new.vocab_size, old_rows) // pad_to_multiple) * pad_to_multiple
    means = _new_row_sources(old, new, old_rows, rows)
    resized = config.replace(vocab_size=rows)
    with _Source(src) as source:
        _plan_from_hf(source, fam.name_map, config, None)  # every tensor checked against config.json
        outs = []
        for _, names in source.by_file():
            for hf_name in names:
                tensor = source.tensors[hf_name]
                if fam.name_map.to_ours(hf_name).name in VOCAB_PARAMS:
                    outs.append(_ResizedRows(hf_name, tensor, rows, means))
                else:
                    outs.append(_Out(hf_name, tensor.dtype, tensor.shape, parts=[(tensor, _full(tensor.shape))]))
        doc = hf_config(source_hf_config(src), fam, resized, None)
        doc["make_vocab_size_divisible_by"] = pad_to_multiple
        with StagingDir(dst, overwrite) as tmp, _progress(len(outs), progress) as bar:
            nbytes = _write_files(tmp, outs, max_shard_bytes or DEFAULT_SHARD_BYTES, {"format": "pt"}, bar)
            carry_files(src, tmp, to_hf=True)
            replace_tokenizer(os.path.dirname(new.source), tmp)
            write_hf_configs(tmp, doc, resized)
    from_all = sum(1 for parts in means.values() if not parts)
    return ResizeSummary(len(outs), nbytes, time.perf_counter() - start, dst, old_rows, new.vocab_size, rows,
                         pad_to_multiple, len(means) - from_all, from_all)


def _check_layout_doc(layout_path: str, layout: dict) -> tuple[dict, list]:
    """The 'tensors' and 'ranks' of layout.json, with every field merge reads present and well typed."""
    def ints(value) -> bool:
        return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)

    tensors, ranks = layout.get("tensors"), layout.get("ranks")
    if not isinstance(tensors, dict) or not isinstance(ranks, list) or not ranks:
        raise CheckpointError(f"{layout_path}: expected keys 'tensors' (name -> dtype, global shape) and 'ranks'")
    for name, entry in tensors.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str) or not ints(entry.get("shape")):
            raise CheckpointError(f"{layout_path}: tensor '{name}': expected {{\"dtype\": ..., \"shape\": [...]}}")
    for k, rank in enumerate(ranks):
        listed = rank.get("tensors") if isinstance(rank, dict) else None
        well_formed = isinstance(listed, dict) and isinstance(rank.get("dir"), str) and all(
            isinstance(w, dict) and ints(w.get("offsets")) and ints(w.get("shape")) for w in listed.values())
        if not well_formed:
            raise CheckpointError(f"{layout_path}: ranks[{k}]: expected 'dir' and 'tensors' (name -> offsets, shape)")
    return tensors, ranks


def _check_tiling(layout_path: str, name: str, shape: Shape, boxes: dict[tuple, _Src]) -> None:
    """The distinct slices of a tensor must cover it exactly once."""
    spans = []
    for offsets, stored in boxes.items():
        span = tuple((o, o + n) for o, n in zip(offsets, stored.shape))
        if len(span) != len(shape) or any(a < 0 or b > n for (a, b), n in zip(span, shape)):
            raise CheckpointError(f"{stored.path}: tensor '{name}': slice {list(span)} lies outside the global "
                                  f"shape {list(shape)}")
        spans.append(span)
    for k, one in enumerate(spans):
        for other in spans[k + 1:]:
            if all(a < d and c < b for (a, b), (c, d) in zip(one, other)):
                raise CheckpointError(f"{layout_path}: tensor '{name}': slices {list(one)} and {list(other)} overlap")
    covered = sum(_volume(b - a for a, b in span) for span in spans)
    if covered != _volume(shape):
        raise CheckpointError(f"{layout_path}: tensor '{name}': the rank slices cover {covered} of "
                              f"{_volume(shape)} elements")


def parse_size(text: str) -> int:
    """'5GB' (10^9, as transformers reads it), '5GiB' (2^30), '500MB', '1024' (bytes)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = str(text).strip().upper()
    number = s.rstrip("KMGTIB")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise ConfigError(f"size {text!r}: expected a positive size such as 5GB, 500MB or 2GiB")
    return int(value * units[unit])
