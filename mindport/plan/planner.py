"""Layout planner: the legal layouts of a model on N NPUs, their memory (the training memory report,
:func:`mindport.train.memory.memory_report`, with the 910B's flash attention and, for LoRA, the
adapters of a ``pet_config``) and predicted speed (:mod:`mindport.plan.cost`), ranked by tokens/s
per NPU; decoding memory and speed for ``--mode infer``; the calibration runs.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from itertools import product

from mindport.config import ConfigError, LoraConfig, ModelConfig, ParallelConfig, stage_layer_counts
from mindport.plan.cost import (ATLAS_800T_A2, MEMORY_BUDGET, MINDFORMERS, MINDPORT, MINDSPEED, Hardware, Layout,
                                decode_step, kv_bytes_per_token, parallel_config, train_step)

AMP_LEVEL = "O2"  # fp16/bf16 weights with an fp32 master copy: how the large models train on Ascend
MODES = ("train", "lora", "infer")
ATTENTION = "flash"  # mindport's attention core on Ascend (FlashAttentionScore, UNEXECUTED): the memory it keeps
GIB = 2**30


def load_model(spec: str) -> ModelConfig:
    """A preset name, an HF or mindport model directory, or a config.json file."""
    from mindport.models.auto import AutoConfig
    from mindport.models.registry import detect, find_preset

    if os.path.isdir(spec):
        return AutoConfig.from_pretrained(spec)
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            try:
                hf = json.load(f)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{spec}: not valid JSON: {err}") from None
        return detect(hf, spec).config_from_hf(hf, spec)
    if spec.endswith(".json") or os.sep in spec:
        raise ConfigError(f"--model {spec!r}: no such file or directory")
    return find_preset(spec)


@dataclass
class Plan:
    layout: Layout
    cost: dict
    memory: dict  # the largest rank's memory report (bytes split as memory_report splits them)
    fits: bool

    def row(self) -> dict:
        b = self.memory["bytes"]
        return {"layout": self.layout.describe(), "implementation": self.layout.implementation.name,
                "runnable_by_mindport": self.layout.implementation.runnable,
                "tokens_per_s_per_npu": self.cost["tokens_per_s_per_npu"], "mfu": self.cost["mfu"],
                "memory_gib": b["total"] / GIB, "fits": self.fits,
                "memory_split_gib": {k: b[k] / GIB for k in ("parameters", "gradients", "optimizer", "activations")},
                "step_s": {k: self.cost[k] for k in ("compute", "communication", "bubble", "optimizer", "step")},
                "parallel_config": parallel_config(self.layout).to_dict(),
                "recompute": self.layout.recompute, "micro_batch": self.layout.micro_batch}


def default_lora(config: ModelConfig) -> LoraConfig:
    """The LoRA planned without a ``pet_config``: rank 16 on every projection an adapter can target
    (attention, dense MLP or shared expert), by the family's HF module names."""
    from mindport.models.lora import hf_weights
    from mindport.parallel.sharding import rule_for

    modules = sorted({hf.rsplit(".", 2)[-2] for hf, ours in hf_weights(config).items()
                      if hf.endswith(".weight") and rule_for(ours).kind in ("column", "row")})
    return LoraConfig(lora_rank=16, lora_alpha=32.0, target_modules=modules)


def training_memory(config: ModelConfig, layout: Layout, seq_length: int, lora: LoraConfig | None = None) -> dict:
    """The memory report of the largest rank (first or last pipeline stage, or the one with most
    layers); under LoRA the frozen base has no gradients or optimizer state (the report's accounting)."""
    from mindport.train.memory import memory_report

    parallel = parallel_config(layout)
    counts = stage_layer_counts(config.num_layers, layout.pp, layout.offset)
    stages = {0, counts.index(max(counts)), layout.pp - 1}  # most in flight, most layers, the head
    reports = [memory_report(config, parallel, layout.micro_batch, seq_length, AMP_LEVEL, layout.recompute == "full",
                             rank=stage * layout.cp * layout.tp, pipeline_offset=parallel.offset, lora=lora,
                             attention=ATTENTION)
               for stage in sorted(stages)]
    return max(reports, key=lambda r: r["bytes"]["total"])


def evaluate(config: ModelConfig, layout: Layout, seq_length: int, lora: LoraConfig | None = None,
             hw: Hardware = ATLAS_800T_A2) -> Plan:
    cost = train_step(config, layout, seq_length, hw, lora=lora)
    memory = training_memory(config, layout, seq_length, lora=lora)
    return Plan(layout, cost, memory, memory["bytes"]["total"] <= MEMORY_BUDGET * hw.hbm_bytes)


def config_layout(run) -> Layout:
    """The layout a run config (:class:`mindport.train.config.RunConfig`) trains with: ``micro_batch_num``
    micro-batches with pipeline stages, else ``gradient_accumulation_steps``."""
    p, t = run.parallel, run.train
    if not isinstance(t.recompute, bool):
        raise ConfigError(f"key 'recompute' = {t.recompute!r}: the planner models true or false (every layer or none)")
    micro_batches = p.micro_batch_num if p.pipeline_stage > 1 else t.grad_accumulation
    offset = (p.offset,) * p.pipeline_stage if isinstance(p.offset, int) else tuple(p.offset)  # one per stage
    return Layout(p.data_parallel, p.model_parallel, p.pipeline_stage, p.context_parallel, p.expert_parallel,
                  p.use_seq_parallel, t.batch_size, micro_batches, 1, "full" if t.recompute else "none",
                  p.optimizer_shard, MINDPORT, offset if any(offset) else 0)


def predicted_line(plan: Plan) -> str:
    """The ``# Predicted:`` header line of a training run config."""
    return (f"# Predicted: {plan.cost['tokens_per_s_per_npu']:.0f} tokens/s per NPU, MFU {100 * plan.cost['mfu']:.1f}%, "
            f"{plan.memory['bytes']['total'] / GIB:.1f} GiB on the largest rank (memory report; budget "
            f"{MEMORY_BUDGET * ATLAS_800T_A2.hbm_bytes / 1e9:.1f} GB of 64 GB).")


def config_prediction(run) -> str:
    """The ``# Predicted:`` header line of a run config, for its own layout (nothing searched): training
    and LoRA (its ``pet_config``) speed and memory, or for a serving config (``run_mode: predict``)
    weights, the contexts that fit and decode speed at batch 1 and at its ``batch_size``."""
    seq = run.train.seq_length
    if run.run_mode != "predict":
        return predicted_line(evaluate(run.model, config_layout(run), seq, run.lora))
    tp, batch = run.parallel.model_parallel, run.train.batch_size
    row = plan_inference(run.model, tp, seq, tps=(tp,), batch=batch)[0]
    rates = row["decode_tokens_per_s"]
    return (f"# Predicted: weights {row['weights_gib']:.1f} GiB per NPU, room for {row['max_batch']} contexts of {seq} "
            f"tokens; decode {rates['batch_1']:.1f} tokens/s at batch 1, {rates[f'batch_{batch}']:.0f} at batch {batch}.")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def parse_layout(text: str) -> dict[str, int]:
    """``dp=1,tp=8,pp=4`` -> {"dp": 1, "tp": 8, "pp": 4} (keys dp, tp, pp, ep, cp)."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        if key not in ("dp", "tp", "pp", "ep", "cp") or not value.isdigit() or int(value) < 1:
            raise ConfigError(f"--layout {text!r}: item {item!r}: expected KEY=N with KEY one of dp, tp, pp, ep, cp "
                              f"and N a positive integer")
        out[key] = int(value)
    return out


def pipeline_offsets(num_layers: int, pp: int) -> list:
    """The even split, and the split that moves one layer from the last stage (which also runs the
    head and loss) to the first, as mindformers' per-stage offsets."""
    if pp == 1:
        return [0]
    counts = stage_layer_counts(num_layers, pp)
    if counts[-1] < 2:
        return [0]
    moved = [counts[0] + 1] + counts[1:-1] + [counts[-1] - 1]
    base = num_layers // pp
    return [0, tuple(c - base for c in moved)]


def candidate_layouts(config: ModelConfig, npus: int, seq_length: int, global_batch: int,
                      fixed: dict[str, int] | None = None, implementation=MINDPORT):
    """Every layout of ``npus`` ranks that ``implementation`` can train (mindport: what
    :meth:`ParallelConfig.check_training` accepts) with ``global_batch`` sequences a step."""
    fixed = fixed or {}
    for tp in [t for t in (1, 2, 4, 8) if npus % t == 0]:
        for pp in _divisors(npus // tp):
            for cp in [c for c in (1, 2, 4, 8) if npus % (tp * pp * c) == 0 and seq_length % (2 * c) == 0]:
                dp = npus // (tp * pp * cp)
                for ep in [e for e in _divisors(dp) if config.is_moe and config.num_experts % e == 0] or [1]:
                    degrees = dict(dp=dp, tp=tp, pp=pp, cp=cp, ep=ep)
                    if any(degrees[k] != v for k, v in fixed.items()):
                        continue
                    for b in (1, 2, 4):
                        if global_batch % (dp * b):
                            continue
                        m = global_batch // (dp * b)
                        if pp > 1 and m < pp:
                            continue
                        for recompute, zero, offset in product(("none", "full"), (False, True) if dp > 1 else (False,),
                                                               pipeline_offsets(config.num_layers, pp)):
                            layout = Layout(dp, tp, pp, cp, ep, tp > 1, b, m, 1, recompute, zero, implementation,
                                            offset)
                            try:
                                parallel = parallel_config(layout)
                                if implementation.runnable:
                                    parallel.check_training(config)
                                else:
                                    parallel.check_model(config)
                            except ConfigError:
                                continue
                            yield layout


def plan_training(config: ModelConfig, npus: int, seq_length: int, global_batch: int,
                  lora: LoraConfig | None = None, fixed: dict[str, int] | None = None,
                  hw: Hardware = ATLAS_800T_A2) -> list[Plan]:
    """Every legal mindport layout, fitting ones first, each group by predicted tokens/s per NPU
    (``lora``: LoRA fine-tuning with this ``pet_config``)."""
    plans = []
    for layout in candidate_layouts(config, npus, seq_length, global_batch, fixed):
        plans.append(evaluate(config, layout, seq_length, lora, hw))
    plans.sort(key=lambda p: (not p.fits, -p.cost["tokens_per_s_per_npu"]))
    return plans


def default_global_batch(npus: int, seq_length: int) -> int:
    """About 4M tokens a step (Llama-2's batch), at least one sequence per NPU."""
    return max(npus, 2**22 // seq_length)


# ------------------------------------------------------------------------------------------- inference
def plan_inference(config: ModelConfig, npus: int, seq_length: int, hw: Hardware = ATLAS_800T_A2,
                   tps: tuple[int, ...] | None = None, batch: int | None = None) -> list[dict]:
    """Per tensor-parallel degree (replicas = npus / tp): weights and KV cache per rank, the largest
    batch of ``seq_length``-token contexts that fits, decode tokens/s at batch 1 and at that batch
    (or at ``batch``, a serving config's, which then must fit)."""
    from mindport.train.flops import matmul_params
    from mindport.train.memory import memory_report

    rows = []
    for tp in tps or [t for t in (1, 2, 4, 8) if npus % t == 0]:
        parallel = ParallelConfig(model_parallel=tp)
        try:
            parallel.check_model(config)
        except ConfigError:
            continue
        weights = memory_report(config, parallel, 1, seq_length, AMP_LEVEL)["bytes"]["parameters"]
        per_token = kv_bytes_per_token(config, tp)
        free = MEMORY_BUDGET * hw.hbm_bytes - weights
        largest = max(0, int(free // (per_token * seq_length)))
        served = batch or max(largest, 1)
        one = decode_step(config, tp, 1, seq_length, weights, hw)
        full = decode_step(config, tp, served, seq_length, weights, hw)
        replicas = npus // tp
        cached = (batch or largest) * seq_length * per_token
        rows.append({
            "layout": f"tp{tp} x {replicas} replica(s)", "parallel_config": parallel.to_dict(),
            "fits": largest >= (batch or 1), "weights_gib": weights / GIB,
            "kv_cache_gib": cached / GIB, "memory_gib": (weights + cached) / GIB,
            "max_batch": largest, "max_tokens_in_cache": int(max(free, 0) // per_token),
            "decode_tokens_per_s": {"batch_1": one["tokens_per_s"], f"batch_{served}": full["tokens_per_s"]},
            "tokens_per_s_per_npu": full["tokens_per_s"] * replicas / npus,
            "mfu": full["tokens_per_s"] * 2 * matmul_params(config) / (tp * hw.peak_flops),
        })
    rows.sort(key=lambda r: (not r["fits"], -r["tokens_per_s_per_npu"]))
    return rows


# ------------------------------------------------------------------------------------------ calibration
LLAMA2_70B_SHAPED = os.path.join(os.path.dirname(__file__), "llama2-70b-shaped.json")


@dataclass(frozen=True)
class PublishedRun:
    name: str
    model: str  # preset or config.json
    layout: Layout
    seq_length: int
    published: float  # tokens/s per NPU (training) or decode tokens/s (inference)
    source: str


CALIBRATION = (
    PublishedRun("TeleChat2-115B fine-tune (mindformers, Atlas 800T A2)", "telechat2-115b",
                 Layout(dp=1, tp=8, pp=8, sequence_parallel=True, micro_batch=1, micro_batches=8, interleave=3,
                        recompute="selective", implementation=MINDFORMERS), 8192, 158.0,
                 "mindformers research/telechat2/README.md, finetune_telechat_115b.yaml"),
    PublishedRun("Mixtral-8x7B pretrain 32K (MindSpeed-LLM 1.0.RC3, Atlas 900 A2 PoDc)", "mixtral-8x7b",
                 Layout(dp=1, tp=8, pp=4, cp=2, sequence_parallel=True, micro_batch=1, micro_batches=128,
                        implementation=MINDSPEED), 32768, 706.0,
                 "MindSpeed-LLM 1.0.RC3 examples/mcore/mixtral/pretrain_mixtral_8x7b_ptd.sh"),
    PublishedRun("Llama2-70B-shaped pretrain (MindSpeed-LLM 1.0.RC3, Atlas 900 A2 PoDc)", LLAMA2_70B_SHAPED,
                 Layout(dp=1, tp=8, pp=4, sequence_parallel=True, micro_batch=1, micro_batches=1024, interleave=4,
                        implementation=MINDSPEED), 4096, 439.0, "MindSpeed-LLM 1.0.RC3 README"),
)
INFERENCE_CALIBRATION = PublishedRun("TeleChat2-115B decode, TP8, batch 1 (mindformers)", "telechat2-115b",
                                     Layout(tp=8), 4096, 26.5, "mindformers research/telechat2/README.md")


def calibrate(hw: Hardware = ATLAS_800T_A2) -> list[dict]:
    """Predicted vs published for the four runs; for training also the best layout mindport itself
    can run on the same NPUs, sequence length and global batch."""
    rows = []
    for run in CALIBRATION:
        config = load_model(run.model)
        cost = train_step(config, run.layout, run.seq_length, hw)
        global_batch = run.layout.dp * run.layout.micro_batches * run.layout.micro_batch
        best = next(iter(plan_training(config, run.layout.npus, run.seq_length, global_batch, hw=hw)), None)
        rows.append({"run": run.name, "layout": run.layout.describe() + " (not runnable by mindport)",
                     "published": run.published, "predicted": cost["tokens_per_s_per_npu"],
                     "ratio": cost["tokens_per_s_per_npu"] / run.published, "mfu": cost["mfu"],
                     "mindport_layout": best.layout.describe() if best else None,
                     "mindport_predicted": best.cost["tokens_per_s_per_npu"] if best and best.fits else 0.0,
                     "source": run.source})
    run = INFERENCE_CALIBRATION
    config = load_model(run.model)
    row = plan_inference(config, run.layout.tp, run.seq_length, hw, tps=(run.layout.tp,))[0]
    predicted = row["decode_tokens_per_s"]["batch_1"]
    rows.append({"run": run.name, "layout": row["layout"], "published": run.published, "predicted": predicted,
                 "ratio": predicted / run.published, "mfu": None, "mindport_layout": row["layout"],
                 "mindport_predicted": predicted, "source": run.source})
    return rows


# ------------------------------------------------------------------------------------------ run YAML
def run_yaml(model_spec: str, plan: Plan, seq_length: int, npus: int, out_path: str,
             lora: LoraConfig | None = None) -> str:
    """A run config (mindformers' layout, ``mindport train`` reads it) for ``plan``: the preset key
    when ``model_spec`` is a preset, ``load_checkpoint: model_spec`` when it is a directory; with
    ``lora`` its ``pet_config`` and a ``load_checkpoint`` (the base to adapt; a placeholder path
    beside a preset)."""
    import yaml

    layout = plan.layout
    nodes = -(-npus // ATLAS_800T_A2.npus_per_node)
    per_node = min(npus, ATLAS_800T_A2.npus_per_node)
    is_preset = not os.path.exists(model_spec)
    launch = (f'scripts/msrun_launcher.sh "mindport train --config {out_path}" {npus}' if nodes == 1 else
              f'scripts/msrun_launcher.sh "mindport train --config {out_path}" \\\n#       {npus} {per_node} '
              f'NODE0_IP 8118 $NODE_RANK output/msrun_log False 7200')
    task = "LoRA fine-tuning" if lora else "training"
    header = [
        f"# {task} written by `mindport plan`: {nodes} Atlas 800T A2 node(s) x {per_node} NPUs = {npus} ranks.",
        f"# Launch{' on every node (NODE_RANK 0..' + str(nodes - 1) + ')' if nodes > 1 else ''}:",
        f"#   {launch}",
        predicted_line(plan),
        "# UNEXECUTED at this size: no Ascend NPU was available.",
    ]
    doc: dict = {"seed": 1234, "output_dir": "./output/run"}
    doc["run_mode"] = "train" if is_preset and not lora else "finetune"
    if not is_preset or lora:
        doc["load_checkpoint"] = f"/path/to/{model_spec}" if is_preset else os.path.abspath(model_spec)
    if is_preset or lora:
        doc["model"] = {"model_config": {"preset": model_spec} if is_preset else {}}
    if lora:
        doc["model"]["model_config"]["pet_config"] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in lora.to_dict().items()}
    parallel = parallel_config(layout).to_dict()
    doc["parallel_config"] = {k: parallel[k] for k in ("data_parallel", "model_parallel", "pipeline_stage",
                                                       "micro_batch_num", "use_seq_parallel", "expert_parallel",
                                                       "context_parallel", "optimizer_shard")}
    if layout.offset:
        doc["parallel_config"]["offset"] = list(layout.offset)
    doc["recompute_config"] = {"recompute": layout.recompute == "full"}
    doc["runner_config"] = {"batch_size": layout.micro_batch, "seq_length": seq_length, "amp_level": AMP_LEVEL,
                            "loss_scale_type": "dynamic"}
    if layout.pp == 1 and layout.micro_batches > 1:
        doc["runner_config"]["gradient_accumulation_steps"] = layout.micro_batches
    doc["train_dataset"] = {"data_dir": "/path/to/prepared_data"}
    return "\n".join(header) + "\n" + yaml.safe_dump(doc, sort_keys=False)


# ------------------------------------------------------------------------------------------ text output
def _model_line(config: ModelConfig) -> str:
    kind = f"MoE {config.num_experts}x top-{config.moe_top_k}" if config.is_moe else "dense"
    return (f"{config.family}, {config.num_parameters() / 1e9:.1f}B parameters ({kind}), {config.num_layers} layers, "
            f"hidden {config.hidden_size}")


def format_training(config: ModelConfig, npus: int, seq_length: int, global_batch: int, mode: str,
                    plans: list[Plan], total: int) -> str:
    budget = MEMORY_BUDGET * ATLAS_800T_A2.hbm_bytes / GIB
    lines = [f"model: {_model_line(config)}",
             f"{npus} NPUs ({ATLAS_800T_A2.name}, {ATLAS_800T_A2.chip}), mode {mode}, seq {seq_length}, global batch "
             f"{global_batch} sequences, amp {AMP_LEVEL}; {total} legal mindport layouts; memory budget "
             f"{budget:.1f} GiB per NPU",
             f"{'#':>3} {'layout':<40} {'tok/s/NPU':>9} {'MFU':>6} {'GiB':>6} {'param/grad/opt/act GiB':>23} "
             f"{'step s':>8} {'compute/comm/bubble/opt s':>27} fits"]
    for i, plan in enumerate(plans, 1):
        b, c = plan.memory["bytes"], plan.cost
        split = "/".join(f"{b[k] / GIB:.1f}" for k in ("parameters", "gradients", "optimizer", "activations"))
        times = "/".join(f"{c[k]:.2f}" for k in ("compute", "communication", "bubble", "optimizer"))
        lines.append(f"{i:>3} {plan.layout.describe():<40} {c['tokens_per_s_per_npu']:>9.0f} {100 * c['mfu']:>5.1f}% "
                     f"{b['total'] / GIB:>6.1f} {split:>23} {c['step']:>8.2f} {times:>27} "
                     f"{'yes' if plan.fits else 'NO'}")
    return "\n".join(lines)


def format_inference(config: ModelConfig, npus: int, seq_length: int, rows: list[dict]) -> str:
    lines = [f"model: {_model_line(config)}",
             f"{npus} NPUs, decoding with {seq_length}-token contexts, fp16/bf16 weights and KV cache; budget "
             f"{MEMORY_BUDGET * ATLAS_800T_A2.hbm_bytes / GIB:.1f} GiB per NPU",
             f"{'layout':<22} {'weights GiB':>11} {'max batch':>9} {'batch':>6} {'KV GiB':>7} {'decode tok/s b=1':>16} "
             f"{'tok/s at batch':>14} {'tok/s/NPU':>9} fits"]
    for r in rows:
        (_, one), (served, rate) = list(r["decode_tokens_per_s"].items())[0], list(r["decode_tokens_per_s"].items())[-1]
        lines.append(f"{r['layout']:<22} {r['weights_gib']:>11.1f} {r['max_batch']:>9} {served[6:]:>6} "
                     f"{r['kv_cache_gib']:>7.1f} {one:>16.1f} {rate:>14.0f} {r['tokens_per_s_per_npu']:>9.0f} "
                     f"{'yes' if r['fits'] else 'NO'}")
    return "\n".join(lines)


def format_calibration(rows: list[dict]) -> str:
    lines = [f"{'run':<70} {'published':>9} {'predicted':>9} {'ratio':>6}  mindport's own best layout"]
    for r in rows:
        lines.append(f"{r['run']:<70} {r['published']:>9.1f} {r['predicted']:>9.1f} {r['ratio']:>6.2f}  "
                     f"{r['mindport_predicted']:.1f} ({r['mindport_layout']})")
        lines.append(f"    layout: {r['layout']}")
    return "\n".join(lines)
