"""What a compiled decode step launches, read from MindSpore's profiler: every projection runs the
skinny matmul kernel (not MatMul) and RoPE slices nothing (StridedSlice is ~10x a Split on CPU); and
what generate launches beside it per token: nothing."""
import collections
import csv
import glob

from mindspore import Tensor

from mindport import AutoModelForCausalLM
from mindport.parallel.layers import Linear


def kernels_per_step(step, inputs, steps: int, out_dir: str) -> dict[str, float]:
    """Kernel type -> launches per call of ``step(*inputs)``, profiled over ``steps`` calls."""
    from mindspore import Profiler

    step(*inputs)  # compiled and warm before profiling
    profiler = Profiler(output_path=out_dir)
    for _ in range(steps):
        step(*inputs)
    profiler.analyse()
    counts = collections.Counter()
    for path in glob.glob(f"{out_dir}/**/cpu_op_type_info_*.csv", recursive=True):
        for row in csv.DictReader(open(path)):
            counts[row["op_type"]] += int(row["type_occurrences"]) / steps
    return dict(counts)


def test_decode_step_projects_with_the_skinny_kernel_and_slices_nothing(tmp_path):
    model = AutoModelForCausalLM.from_preset("telechat2-tiny-gqa")
    model.generate([[5, 6, 7]], max_new_tokens=2, eos_token_id=[])  # builds the (1, 5) decoder
    decoder = model.compiled_decoders[(1, 5)]
    compiled, calls = decoder.step, []
    decoder.step = lambda *inputs: calls.append(inputs) or compiled(*inputs)
    model.generate([[5, 6, 7]], max_new_tokens=2, eos_token_id=[])
    counts = kernels_per_step(compiled, calls[-1], 3, str(tmp_path))  # the one-token step
    projections = sum(isinstance(cell, Linear) for _, cell in model.cells_and_names())
    assert counts.get("Custom") == projections, counts
    assert "MatMul" not in counts and "StridedSlice" not in counts, counts


def test_generate_launches_no_op_beside_the_compiled_steps(monkeypatch):
    """Slicing or casting a Tensor outside a graph launches an op (~0.3 ms each on CPU, a few percent of a
    decode step; the profiler does not list them): the last position's logits are sliced on the host."""
    model = AutoModelForCausalLM.from_preset("telechat2-tiny-gqa")
    model.generate([[5, 6, 7]], max_new_tokens=3, eos_token_id=[])  # compiles the steps
    launched = []
    for method in ("__getitem__", "astype"):
        original = getattr(Tensor, method)
        monkeypatch.setattr(Tensor, method, lambda self, *a, _f=original, _m=method: launched.append(_m) or _f(self, *a))
    model.generate([[5, 6, 7]], max_new_tokens=3, eos_token_id=[])
    assert launched == []
