"""TP2, TP2+SP, DP2, DP2xTP2, PP2 (2 and 4 micro-batches) and PP2xTP2 on real msrun processes
(CPU): loss, gradient norm, logits, every gradient and every parameter after one AdamW step equal
the single-process run, slice by slice, and replicated parameters are bit-identical on every rank.
The runs of one world size share one msrun launch."""
import json
import os

import pytest

from testkit import launch
from testkit.launch import assert_layout_equals_single_process, msrun, rank_dumps, single_process_dump
from mindport import ConfigError, ParallelConfig
from mindport.parallel.state import check_layout, group_ranks

WORKER = os.path.join(os.path.dirname(__file__), "step_worker.py")
LAYOUTS = {
    "tp2": dict(model_parallel=2),
    "tp2_sp": dict(model_parallel=2, use_seq_parallel=True),
    "dp2": dict(data_parallel=2),
    "dp2_tp2": dict(data_parallel=2, model_parallel=2),
    "pp2_mb2": dict(pipeline_stage=2, micro_batch_num=2),
    "pp2_mb4": dict(pipeline_stage=2, micro_batch_num=4),
    "pp2_tp2": dict(pipeline_stage=2, micro_batch_num=2, model_parallel=2),
}
EXPORT_LAYOUT = dict(model_parallel=2, pipeline_stage=2, micro_batch_num=2)  # loaded from a per-rank export


@pytest.fixture(scope="module")
def reference(tiny_telechat_hf, tmp_path_factory):
    """HF dir of a tiny GQA TeleChat2 and the single-process step's dump."""
    return tiny_telechat_hf, single_process_dump(WORKER, tiny_telechat_hf, str(tmp_path_factory.mktemp("single")))


@pytest.fixture(scope="module")
def layout_runs(reference, tmp_path_factory):
    """name (a layout, or "export": TP2xPP2 from a per-rank export) -> its output directory, once its
    launch has run (2 launches: world 2 and world 4)."""
    from mindport.ckpt_tools.convert import hf_to_mindport

    root = str(tmp_path_factory.mktemp("layouts"))
    export = os.path.join(root, "tp2_pp2_export")
    hf_to_mindport(reference[0], export, tp=2, pp=2)
    runs = {name: (reference[0], layout) for name, layout in LAYOUTS.items()}
    runs["export"] = (export, EXPORT_LAYOUT)
    return launch.layout_runs(WORKER, runs, root)


def assert_run_equals_single_process(out_dir: str, ref: dict, layout: dict) -> None:
    dumps = rank_dumps(out_dir, ParallelConfig.from_dict(layout).world_size)
    assert_layout_equals_single_process(dumps, ref, layout)


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_equals_single_process(reference, layout_runs, name):
    assert_run_equals_single_process(layout_runs(name), reference[1], LAYOUTS[name])


@pytest.mark.slow
def test_ranks_load_their_shards_from_a_per_rank_export(reference, layout_runs):
    out = layout_runs("export")
    shards = os.path.join(os.path.dirname(out), "tp2_pp2_export")
    assert os.path.isdir(os.path.join(shards, "rank_0003"))
    assert not os.path.exists(os.path.join(shards, "model.safetensors"))
    assert_run_equals_single_process(out, reference[1], EXPORT_LAYOUT)


def test_group_layout_puts_tp_innermost():
    cfg = ParallelConfig(data_parallel=2, pipeline_stage=2, model_parallel=2, micro_batch_num=2)
    groups = group_ranks(cfg, 5)  # dp 1, pp 0, tp 1
    assert groups["tp"] == (4, 5) and groups["pp"] == (5, 7) and groups["dp"] == (1, 5)


def test_bad_layout_fails_before_any_work():
    with pytest.raises(ConfigError, match="= 4, but 2 processes were launched"):
        check_layout(ParallelConfig(data_parallel=2, model_parallel=2), 2)


@pytest.mark.slow
def test_bad_layout_under_msrun_fails_fast_with_its_error(reference, tmp_path):
    hf_dir, _ = reference
    with pytest.raises(AssertionError, match="but 2 processes were launched"):
        msrun(WORKER, [hf_dir, str(tmp_path / "o"), json.dumps(dict(data_parallel=2, model_parallel=2))], 2,
              str(tmp_path / "log"), timeout=120)
