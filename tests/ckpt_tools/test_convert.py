"""Streaming converters: bit-exact round trips for every family, logits after conversion,
per-rank export and merge, and one clear error (and no output) for each bad input."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from testkit.checkpoints import KINDS
from testkit.hf_models import torch_logits
from mindport.ckpt_tools import convert
from mindport.checkpoint.hf_checkpoint import HFCheckpoint
from mindport.checkpoint.safetensors_io import CheckpointError, SafetensorsReader, f32_to_bf16_bits
from mindport.config import parameter_shapes
from mindport.config import ConfigError
from mindport.models.registry import families

QUIET = dict(progress=False)


def stored(directory: str) -> dict[str, tuple[str, tuple, bytes]]:
    """name -> (dtype, shape, raw bytes) of every tensor in a directory."""
    ckpt = HFCheckpoint(directory)
    try:
        return {n: (ckpt.info(n).dtype, tuple(ckpt.info(n).shape), bytes(ckpt.raw_bytes(n))) for n in ckpt.names()}
    finally:
        ckpt.close()


def assert_nothing_written(dst: str) -> None:
    parent, base = os.path.split(os.path.abspath(dst))
    assert not os.path.exists(dst)
    assert not [e for e in os.listdir(parent) if e.startswith(f".{base}.tmp-")], "staging directory left behind"


def metadata(path: str) -> dict:
    with SafetensorsReader(path) as reader:
        return reader.metadata


# ----------------------------------------------------------------------------- shapes without a model

TINY = [p for fam in families().values() for p in fam.presets if "tiny" in p]


@pytest.mark.parametrize("preset", TINY)
def test_parameter_shapes_match_the_built_model(preset):
    from mindport import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_preset(preset)
    assert parameter_shapes(model.config) == {n: tuple(p.shape) for n, p in model.parameters_and_names()}


def test_parameter_shapes_count_every_preset():
    for fam in families().values():
        for preset in fam.presets:
            config = fam.preset(preset)
            assert sum(int(np.prod(s)) for s in parameter_shapes(config).values()) == config.num_parameters(), preset


# ----------------------------------------------------------------------------- round trips

ROUND_TRIPS = [(k, "fp32", "single") for k in KINDS] + [(k, "bf16", "sharded") for k in KINDS] + [
    ("telechat", "fp32", "bin"), ("mixtral", "bf16", "bin"), ("xverse", "fp32", "legacy_bin"),
    ("qwen2_moe", "bf16", "legacy_bin")]


@pytest.mark.parametrize("kind, dtype, fmt", ROUND_TRIPS)
def test_hf2ms_ms2hf_round_trip_is_bit_exact(hf_dirs, tmp_path, kind, dtype, fmt):
    src = hf_dirs.get(kind, dtype, fmt)
    shard = 20_000 if fmt == "sharded" else None  # several output shards + index both ways
    ms_dir, hf_dir = str(tmp_path / "ms"), str(tmp_path / "hf")
    summary = convert.hf_to_mindport(src, ms_dir, max_shard_bytes=shard, **QUIET)
    convert.mindport_to_hf(ms_dir, hf_dir, max_shard_bytes=shard, **QUIET)
    before, after = stored(src), stored(hf_dir)
    assert sorted(after) == sorted(before)
    for name, (code, shape, data) in before.items():
        assert after[name][:2] == (code, shape), name
        assert after[name][2] == data, f"{name}: bytes differ"
    assert summary.tensors == len(parameter_shapes(convert._read_model_config(ms_dir, want_hf=False)))
    files = sorted(f for f in os.listdir(ms_dir) if f.endswith(".safetensors"))
    assert all(metadata(os.path.join(ms_dir, f)) == {"format": "ms"} for f in files)
    assert (len(files) > 1) == os.path.exists(os.path.join(ms_dir, "model.safetensors.index.json"))
    assert (fmt == "sharded") == os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json"))
    with open(os.path.join(src, "config.json")) as f:
        source = json.load(f)
    with open(os.path.join(hf_dir, "config.json")) as f:  # the source's, its dtype key saying what the files hold
        dtype_name = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
        assert json.load(f) == {**source, **{k: dtype_name for k in ("dtype", "torch_dtype") if k in source}}
    assert os.path.isfile(os.path.join(hf_dir, "generation_config.json"))


@pytest.mark.parametrize("kind", KINDS)
def test_converted_dir_loads_with_the_source_logits(hf_dirs, tmp_path, kind):
    import mindspore as ms

    from mindport import AutoConfig, AutoModelForCausalLM

    src = hf_dirs.get(kind)
    dst = str(tmp_path / "ms")
    convert.hf_to_mindport(src, dst, **QUIET)
    ids = np.random.default_rng(0).integers(0, 256, (2, 11))
    theirs = AutoModelForCausalLM.from_pretrained(src)(ids).asnumpy()
    ours = AutoModelForCausalLM.from_pretrained(dst)
    assert np.array_equal(ours(ids).asnumpy(), theirs)
    loaded = ms.load_checkpoint(os.path.join(dst, "model.safetensors"), format="safetensors")
    assert {n: tuple(p.shape) for n, p in loaded.items()} == parameter_shapes(ours.config)
    hf_dir = str(tmp_path / "hf")
    convert.mindport_to_hf(dst, hf_dir, **QUIET)
    assert AutoConfig.from_pretrained(hf_dir) == AutoConfig.from_pretrained(src)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_transformers_loads_the_export_with_the_source_logits(hf_dirs, tmp_path, kind):
    from transformers import AutoModelForCausalLM as HFAuto

    src = hf_dirs.get(kind)
    convert.hf_to_mindport(src, str(tmp_path / "ms"), **QUIET)
    convert.mindport_to_hf(str(tmp_path / "ms"), str(tmp_path / "hf"), max_shard_bytes=30_000, **QUIET)
    exported = HFAuto.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager").eval()
    ids = np.random.default_rng(1).integers(0, 256, (2, 10))
    assert np.array_equal(torch_logits(exported, ids), torch_logits(hf_dirs.models[kind], ids))


def test_dtype_conversion_in_small_chunks(hf_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "CHUNK_BYTES", 256)  # many chunks per tensor
    src = hf_dirs.get("mixtral")
    before = {n: np.frombuffer(d, np.float32).reshape(s) for n, (_, s, d) in stored(src).items()}
    convert.hf_to_mindport(src, str(tmp_path / "bf16"), dtype="bf16", **QUIET)
    convert.mindport_to_hf(str(tmp_path / "bf16"), str(tmp_path / "hf32"), dtype="fp32", **QUIET)
    convert.hf_to_mindport(src, str(tmp_path / "fp16"), dtype="fp16", **QUIET)
    bf16 = stored(str(tmp_path / "bf16"))
    gate = bf16["layers.1.mlp.experts.gate_proj"]
    expected = np.stack([before[f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight"] for e in range(4)])
    assert gate[:2] == ("BF16", expected.shape) and gate[2] == f32_to_bf16_bits(expected).tobytes()
    widened = stored(str(tmp_path / "hf32"))["model.embed_tokens.weight"]
    bits = f32_to_bf16_bits(before["model.embed_tokens.weight"])
    assert widened[2] == (bits.astype(np.uint32) << 16).tobytes()  # bf16 -> fp32 widens exactly
    fp16 = stored(str(tmp_path / "fp16"))["lm_head.weight"]
    assert fp16[0] == "F16" and fp16[2] == before["lm_head.weight"].astype(np.float16).tobytes()


# ----------------------------------------------------------------------------- per-rank export

def check_ranks(full_dir: str, sharded_dir: str) -> None:
    """Each rank holds exactly its stage's parameters, each sliced as sharding.py says."""
    from mindport.parallel.sharding import shard_slices, stages_of_param

    with open(os.path.join(sharded_dir, "layout.json")) as f:
        layout = json.load(f)
    tp, pp, ep, dp = layout["tp"], layout["pp"], layout["ep"], layout["dp"]
    assert dp == ep and layout["world_size"] == dp * pp * tp == len(layout["ranks"])
    full = stored(full_dir)
    layers = 1 + max(int(n.split(".")[1]) for n in full if n.startswith("layers."))
    for entry in layout["ranks"]:
        assert entry["rank"] == (entry["dp_rank"] * pp + entry["pp_rank"]) * tp + entry["tp_rank"]
        assert entry["ep_rank"] == entry["dp_rank"] % ep and entry["dir"] == f"rank_{entry['rank']:04d}"
        mine = stored(os.path.join(sharded_dir, entry["dir"]))
        assert set(mine) == set(entry["tensors"]) == {
            n for n in full if entry["pp_rank"] in stages_of_param(n, layers, pp)}
        for name, (code, shape, data) in mine.items():
            g_code, g_shape, g_data = full[name]
            whole = np.frombuffer(g_data, np.uint8).view({2: np.uint16, 4: np.uint32}[len(g_data) // np.prod(g_shape)])
            index = shard_slices(name, g_shape, entry["tp_rank"], tp, entry["ep_rank"], ep)
            assert code == g_code and data == np.ascontiguousarray(whole.reshape(g_shape)[index]).tobytes(), name
            assert entry["tensors"][name]["offsets"] == [s.indices(n)[0] for s, n in zip(index, g_shape)]


SPLITS = [("telechat", "fp32", dict(tp=2, pp=2)), ("mixtral", "bf16", dict(tp=2, pp=2, ep=2)),
          ("qwen2_moe", "fp32", dict(tp=2, ep=3)), ("xverse_moe", "bf16", dict(ep=4, pp=2))]


@pytest.mark.parametrize("kind, dtype, sizes", SPLITS)
def test_rank_export_slices_and_merges_bit_exactly(hf_dirs, tmp_path, monkeypatch, kind, dtype, sizes):
    import mindspore as ms

    monkeypatch.setattr(convert, "CHUNK_BYTES", 100)  # exercise row blocks and per-row descent
    src = hf_dirs.get(kind, dtype)
    full, ranks, merged = (str(tmp_path / d) for d in ("full", "ranks", "merged"))
    convert.hf_to_mindport(src, full, **QUIET)
    summary = convert.hf_to_mindport(src, ranks, **sizes, **QUIET)
    check_ranks(full, ranks)
    rank_dirs = [os.path.join(ranks, d) for d in os.listdir(ranks) if d.startswith("rank_")]
    assert summary.tensors == sum(len(stored(d)) for d in rank_dirs)
    assert ms.load_checkpoint(os.path.join(ranks, "rank_0001", "model.safetensors"), format="safetensors")
    convert.merge(ranks, merged, **QUIET)
    assert stored(merged) == stored(full)
    # reshard = merge + split with other sizes
    again, remerged = str(tmp_path / "again"), str(tmp_path / "remerged")
    convert.split(merged, again, tp=1, pp=2, ep=2 if "ep" in sizes else 1, **QUIET)
    check_ranks(full, again)
    convert.merge(again, remerged, **QUIET)
    assert stored(remerged) == stored(full)


def test_rank_export_refuses_impossible_layouts(hf_dirs, tmp_path):
    src = hf_dirs.get("telechat")
    with pytest.raises(ConfigError, match="--ep 2: the model has no experts"):
        convert.hf_to_mindport(src, str(tmp_path / "a"), ep=2, **QUIET)
    with pytest.raises(ConfigError, match="num_kv_heads"):  # 2 kv heads over 4 tp ranks
        convert.hf_to_mindport(src, str(tmp_path / "b"), tp=4, **QUIET)
    assert_nothing_written(str(tmp_path / "a"))
    assert_nothing_written(str(tmp_path / "b"))


# ----------------------------------------------------------------------------- bad input

def _rewrite_tensors(directory: str, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _edit_config(directory: str, **changes) -> None:
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        doc = json.load(f)
    doc.update(changes)
    with open(path, "w") as f:
        json.dump(doc, f)


def truncated(d):
    path = os.path.join(d, "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 100)
    return [path, "truncated"]


def corrupt_header(d):
    path = os.path.join(d, "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"#not json")
    return [path, "corrupt safetensors header"]


def missing_shard(d):
    os.remove(os.path.join(d, "model-00002-of-00003.safetensors"))
    return [os.path.join(d, "model.safetensors.index.json"), "model-00002-of-00003.safetensors", "missing"]


def missing_tensor(d):
    _rewrite_tensors(d, lambda t: t.pop("lm_head.weight"))
    return [d, "missing tensor 'lm_head.weight'"]


def missing_expert(d):
    _rewrite_tensors(d, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"))
    return ["missing tensor 'model.layers.1.block_sparse_moe.experts.3.w2.weight'", "layers.1.mlp.experts.down_proj"]


def unexpected_tensor(d):
    import torch

    _rewrite_tensors(d, lambda t: t.update({"transformer.h.0.self_attention.extra.weight": torch.zeros(2)}))
    return [os.path.join(d, "model.safetensors"), "unexpected tensor 'transformer.h.0.self_attention.extra.weight'"]


def extra_expert(d):
    import torch

    name = "model.layers.0.block_sparse_moe.experts.4.w1.weight"
    _rewrite_tensors(d, lambda t: t.update({name: torch.zeros(48, 64)}))
    return ["unexpected tensor 'model.layers.0.block_sparse_moe.experts.4.w1.weight'", "expert 4", "4 experts"]


def wrong_shape(d):
    _edit_config(d, ffn_hidden_size=128)
    return [os.path.join(d, "model.safetensors"), "tensor 'transformer.h.0.mlp.down_proj.weight' has shape [64, 96]",
            "config.json implies [64, 128]"]  # the first wrong tensor in file order


def unknown_model_type(d):
    _edit_config(d, model_type="gpt_neox")
    return [os.path.join(d, "config.json"), "model_type", "gpt_neox"]


BAD = [("telechat", "single", truncated), ("telechat", "single", corrupt_header),
       ("telechat", "sharded", missing_shard), ("telechat", "single", missing_tensor),
       ("mixtral", "single", missing_expert), ("telechat", "single", unexpected_tensor),
       ("mixtral", "single", extra_expert), ("telechat", "single", wrong_shape),
       ("telechat", "single", unknown_model_type)]


@pytest.mark.parametrize("kind, fmt, damage", BAD, ids=[b[2].__name__ for b in BAD])
def test_bad_input_fails_with_one_clear_error_and_no_output(hf_dirs, tmp_path, kind, fmt, damage):
    src = hf_dirs.copy(kind, str(tmp_path / "src"), fmt=fmt)
    expected = damage(src)
    for sizes in ({}, {"tp": 2, "pp": 2}):
        dst = str(tmp_path / "dst")
        with pytest.raises((CheckpointError, ConfigError)) as err:
            convert.hf_to_mindport(src, dst, **sizes, **QUIET)
        message = str(err.value)
        assert "\n" not in message
        for part in expected:
            assert part in message, (part, message)
        assert_nothing_written(dst)


def test_existing_destination_is_kept_without_overwrite(hf_dirs, tmp_path):
    src, dst = hf_dirs.get("telechat"), tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="destination exists"):
        convert.hf_to_mindport(src, str(dst), **QUIET)
    assert os.listdir(dst) == ["keep.txt"]
    convert.hf_to_mindport(src, str(dst), overwrite=True, **QUIET)
    assert "keep.txt" not in os.listdir(dst) and os.path.isfile(dst / "model.safetensors")
    assert not [e for e in os.listdir(tmp_path) if e != "dst"]


@pytest.mark.parametrize("sizes", [{}, {"tp": 2}])
def test_failure_while_writing_leaves_nothing(hf_dirs, tmp_path, monkeypatch, sizes):
    original, seen = convert._Out.chunks, []

    def failing(self):
        seen.append(self.name)
        if len(seen) == 7:
            raise CheckpointError("injected failure")
        yield from original(self)

    monkeypatch.setattr(convert._Out, "chunks", failing)
    dst = str(tmp_path / "dst")
    with pytest.raises(CheckpointError, match="injected"):
        convert.hf_to_mindport(hf_dirs.get("telechat"), dst, **sizes, **QUIET)
    assert_nothing_written(dst)


def test_ms2hf_and_merge_check_their_inputs(hf_dirs, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    src = hf_dirs.get("telechat")
    ms_dir, ranks = str(tmp_path / "ms"), str(tmp_path / "ranks")
    convert.hf_to_mindport(src, ms_dir, **QUIET)
    convert.hf_to_mindport(src, ranks, pp=2, **QUIET)
    with pytest.raises(CheckpointError, match="an HF directory; expected a mindport-format one"):
        convert.mindport_to_hf(src, str(tmp_path / "x"), **QUIET)
    with pytest.raises(CheckpointError, match="per-rank shards: run 'mindport convert merge' first"):
        convert.mindport_to_hf(ranks, str(tmp_path / "x"), **QUIET)
    path = os.path.join(ms_dir, "model.safetensors")
    tensors = load_file(path)
    tensors["layers.0.attn.extra"] = torch.zeros(1)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: unexpected tensor 'layers.0.attn.extra'")):
        convert.mindport_to_hf(ms_dir, str(tmp_path / "x"), **QUIET)
    layout_path = os.path.join(ranks, "layout.json")
    with open(layout_path) as f:
        good = f.read()
    layout = json.loads(good)
    del layout["ranks"][1]["tensors"]["final_norm.weight"]["offsets"]
    with open(layout_path, "w") as f:
        json.dump(layout, f)
    with pytest.raises(CheckpointError, match=re.escape(f"{layout_path}: ranks[1]: expected 'dir' and 'tensors'")):
        convert.merge(ranks, str(tmp_path / "x"), **QUIET)
    with open(layout_path, "w") as f:
        f.write(good)
    os.rename(os.path.join(ranks, "rank_0001"), os.path.join(ranks, "moved"))
    with pytest.raises(CheckpointError, match="rank_0001: not a directory"):
        convert.merge(ranks, str(tmp_path / "x"), **QUIET)
    assert_nothing_written(str(tmp_path / "x"))


# ----------------------------------------------------------------------------- command line

def test_cli(hf_dirs, tmp_path, capsys):
    from mindport.cli import main

    src = hf_dirs.get("mixtral", "bf16")
    ms_dir, hf_dir, ranks, merged = (str(tmp_path / d) for d in ("ms", "hf", "ranks", "merged"))
    assert main(["convert", "hf2ms", "--src", src, "--dst", ms_dir]) == 0
    out = capsys.readouterr().out
    assert re.fullmatch(rf"converted {len(stored(ms_dir))} tensors, \d+\.\d\d GB in \d+\.\d s -> {ms_dir}\n", out)
    assert main(["convert", "ms2hf", "--src", ms_dir, "--dst", hf_dir, "--max-shard-size", "50KB"]) == 0
    assert os.path.isfile(os.path.join(hf_dir, "model.safetensors.index.json"))
    assert main(["convert", "hf2ms", "--src", src, "--dst", ranks, "--tp", "2", "--ep", "2"]) == 0
    assert main(["convert", "merge", "--src", ranks, "--dst", merged]) == 0
    assert stored(merged) == stored(ms_dir)
    capsys.readouterr()
    from mindport import AutoModelForCausalLM
    from mindport.errors import ConfigError

    with pytest.raises(ConfigError) as err:  # a per-rank export read by one process: the message says how
        AutoModelForCausalLM.from_pretrained(ranks)
    assert "key 'tp' = 2: expected 1, this run's model_parallel (`--model-parallel`)" in str(err.value)
    assert f"`mindport convert merge --src {ranks} --dst DIR`" in str(err.value)
    assert main(["convert", "hf2ms", "--src", src, "--dst", ms_dir]) == 2
    err = capsys.readouterr().err
    assert err == f"mindport: error: {ms_dir}: destination exists (pass --overwrite / overwrite=True to replace it)\n"
    bad = hf_dirs.copy("telechat", str(tmp_path / "bad"))
    _edit_config(bad, model_type="bert")
    assert main(["convert", "hf2ms", "--src", bad, "--dst", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mindport: error: ") and err.count("\n") == 1 and "'bert'" in err
    assert_nothing_written(str(tmp_path / "out"))


def test_parse_size():
    assert convert.parse_size("5GB") == 5 * 10**9
    assert convert.parse_size("2GiB") == 2 * 2**30
    assert convert.parse_size("1024") == 1024
    with pytest.raises(ConfigError, match="size '5XB'"):
        convert.parse_size("5XB")


def test_writer_falls_back_to_reads_without_copy_file_range(hf_dirs, tmp_path, monkeypatch):
    import errno

    from mindport.checkpoint import safetensors_io

    def unsupported(*args):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(safetensors_io.os, "copy_file_range", unsupported)
    monkeypatch.setattr(safetensors_io, "_READ_STEP", 1000)  # several reads per tensor
    src = hf_dirs.get("qwen2_moe", "bf16")
    convert.hf_to_mindport(src, str(tmp_path / "ms"), **QUIET)
    convert.mindport_to_hf(str(tmp_path / "ms"), str(tmp_path / "hf"), **QUIET)
    assert stored(str(tmp_path / "hf")) == stored(src)


def test_writer_rejects_wrong_chunk_sizes(tmp_path):
    from mindport.checkpoint.safetensors_io import SafetensorsWriter

    writer = SafetensorsWriter(str(tmp_path / "x.safetensors"), [("a", "F32", (4,))])
    with pytest.raises(CheckpointError, match="tensor 'a' has 12 bytes, declared 16"):
        writer.write_chunks("a", [b"\0" * 8, b"\0" * 4])
    with pytest.raises(CheckpointError, match=r"tensor 'a' has 20\+ bytes, declared 16"):
        writer.write_chunks("a", [b"\0" * 8, b"\0" * 12])
