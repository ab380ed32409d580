"""The decoder-only causal LM every family builds: embed -> N x DecoderLayer -> norm -> head."""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from mindport import dispatch
from mindport.config import ConfigError, ModelConfig
from mindport.constants import IGNORE_INDEX
from mindport.parallel import state
from mindport.parallel.comm import collectives
from mindport.parallel.layers import VocabParallelEmbedding, VocabParallelHead, vocab_rows
from mindport.parallel.pipeline import stage_layers
from mindport.parallel.state import ParallelGroups
from mindport.transformer.attention import MASK_VALUE
from mindport.transformer.block import DecoderLayer
from mindport.transformer.layers import RMSNorm, as_array, as_tensor
from mindport.transformer.loss import CausalLMLoss
from mindport.transformer.moe import DROPPED, FRACTION, PROBABILITY, TOKENS, Z_LOSS
from mindport.transformer.rope import logn_scale, rope_tables

dispatch.configure_runtime()


def check_token_ids(input_ids, labels, vocab_size: int) -> None:
    """One-line errors, on the host before any graph runs, for an id outside [0, vocab_size) in
    ``input_ids`` (B, S), and for ``labels`` not shaped like ``input_ids`` or holding an id that is
    neither ``IGNORE_INDEX`` nor in range (numpy arrays, lists or Tensors)."""
    ids = as_array(input_ids)
    named = [("input_ids", ids, (ids < 0) | (ids >= vocab_size))]
    if labels is not None:
        target = as_array(labels)
        if target.shape != ids.shape:
            raise ValueError(f"labels: shape {target.shape}: expected the shape of input_ids {ids.shape}")
        named.append(("labels", target, ((target < 0) & (target != IGNORE_INDEX)) | (target >= vocab_size)))
    for name, values, bad in named:
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            allowed = f"{IGNORE_INDEX} (ignored) or " if name == "labels" else ""
            raise ValueError(f"{name}: id {int(values[where])} at position {where}: expected {allowed}"
                             f"0 <= id < vocab_size = {vocab_size}")


class CausalLM(nn.Cell):
    """``model(input_ids)`` -> logits (B, S, V); ``model(input_ids, labels=labels)`` -> mean loss.

    Host-side inputs (RoPE tables for the true positions, the causal/padding mask) are built
    by :meth:`prepare`; :meth:`forward` is pure tensor work and can be compiled with ``ms.jit``.
    ``groups`` (default: the registered process groups) sets the tensor-parallel split and
    the pipeline stage: a stage builds only its layers (named by their global index), the
    first stage the embedding, the last the final norm, the head and the loss.
    """

    def __init__(self, config: ModelConfig, groups: ParallelGroups | None = None, pipeline_offset=None):
        super().__init__()
        self.config = config
        self.groups = groups = groups or state.current()
        groups.config.check_model(config)
        stage, stages = groups.pp.rank, groups.pp.size
        self.is_first, self.is_last = stage == 0, stage == stages - 1
        offset = groups.config.offset if pipeline_offset is None else pipeline_offset
        self.layer_ids = list(stage_layers(config.num_layers, stages, offset)[stage])
        self.embed = VocabParallelEmbedding(config, groups) if self.is_first else None
        self.layers = nn.CellDict({str(i): DecoderLayer(config, groups) for i in self.layer_ids})
        self.data_comms = [collectives(g) for g in (groups.dp, groups.cp) if g.size > 1]
        if self.is_last:
            self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config)
            self.lm_head = VocabParallelHead(config, groups)
            self.loss_fn = CausalLMLoss(groups, vocab_rows(config, groups)[2])
        self.source_dir: str | None = None  # from_pretrained's directory: save_pretrained carries its files
        self.lora = None  # its LoraConfig once mindport.models.lora.apply_lora attached adapters
        self.quantization = None  # "int8" once mindport.models.quantize.quantize_weights quantized it
        self.compiled_decoders: dict = {}  # (batch, max_len) -> infer.decoder.CompiledDecoder, filled by generate

    def on_other_stage(self, name: str) -> bool:
        """True if parameter ``name`` of the full model lives on another pipeline stage."""
        if self.groups.pp.size == 1:
            return False
        layer = name.split(".")[1] if name.startswith("layers.") else None
        if layer is not None:
            return layer.isdigit() and int(layer) < self.config.num_layers and int(layer) not in self.layer_ids
        if name.startswith("embed."):
            return not self.is_first
        return name.split(".")[0] in ("final_norm", "lm_head") and not self.is_last

    def init_weights(self, seed: int) -> None:
        """Draw every weight matrix from N(0, initializer_range) with a generator seeded by
        (seed, parameter name), as the full tensor, and keep this rank's slice: the model is the same
        under any tensor/expert/pipeline layout (norm weights stay 1, biases 0). Each rank draws the
        full tensors of its own stage's matrices once, at start-up."""
        import zlib

        from mindport.parallel.sharding import global_shape, shard_slices

        tp, ep, config = self.groups.tp, self.groups.ep, self.config
        for name, param in self.parameters_and_names():
            if len(param.shape) < 2:
                continue
            shape = global_shape(name, tuple(param.shape), tp.size, ep.size, config.vocab_size)
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            full = rng.standard_normal(shape, dtype=np.float32) * np.float32(config.initializer_range)
            piece = full[shard_slices(name, shape, tp.rank, tp.size, ep.rank, ep.size, config.vocab_pad_multiple)]
            param.set_data(Tensor(np.ascontiguousarray(piece)).astype(param.dtype))

    # ------------------------------------------------------------------ host side
    def prepare(self, input_ids, attention_mask=None, past_len: int = 0, position_ids=None,
                total_len: int | None = None, segment_ids=None):
        """Token ids plus RoPE tables, additive mask and logN scale for this call.

        attention_mask (B, past_len + S), 1 for real tokens and 0 for (left) padding.
        Positions count real tokens only, so left-padded rows get the positions they would
        have unpadded. ``position_ids`` (B, S) gives the true global positions of the tokens
        instead (context parallelism: a rank holds non-contiguous chunks of a sequence of
        ``total_len`` tokens); the attention core then derives causality from the positions
        and the mask is not used. ``segment_ids`` (B, S): packed sequences (see
        :meth:`segment_inputs`).
        """
        ids = as_array(input_ids)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids: shape {ids.shape}: expected (batch, seq_len) with seq_len >= 1")
        b, s = ids.shape
        if segment_ids is not None:
            if attention_mask is not None or past_len or position_ids is not None:
                raise ValueError("segment_ids: expected without attention_mask, past_len or position_ids")
            cos, sin, mask, positions = self.segment_inputs(as_array(segment_ids), (b, s))
        elif position_ids is not None:
            positions = np.asarray(position_ids)
            total = total_len or int(positions.max()) + 1
            mask = np.zeros((1, 1, 1, 1), np.float32)
        else:
            total = past_len + s
            if attention_mask is None:
                keep = np.ones((b, total), dtype=bool)
            else:
                keep = as_array(attention_mask) != 0
                if keep.shape != (b, total):
                    raise ValueError(f"attention_mask: shape {keep.shape}: expected {(b, total)}")
            positions = np.maximum(np.cumsum(keep, axis=1) - 1, 0)[:, past_len:]  # (B, S)
            causal = np.tril(np.ones((s, total), dtype=bool), k=past_len)  # query i sees keys <= past_len + i
            allowed = causal[None] & keep[:, None, :]
            allowed |= ~allowed.any(-1, keepdims=True)  # an all-padding row attends to itself harmlessly
            mask = np.where(allowed, 0.0, MASK_VALUE).astype(np.float32)[:, None]  # (B, 1, S, total)
        if segment_ids is None:
            cos, sin = rope_tables(self.config, total, int(positions.max()) + 1)
            cos, sin = cos[positions], sin[positions]
        q_scale = None
        if self.config.use_logn_attn:
            q_scale = Tensor(logn_scale(self.config, positions)[:, None, :, None])
        return as_tensor(ids), Tensor(cos[:, None]), Tensor(sin[:, None]), Tensor(mask), q_scale

    def segment_inputs(self, segments: np.ndarray, shape: tuple[int, int]):
        """cos, sin (B, S, D), additive mask (B, 1, S, S) and positions (B, S) of rows packing
        several sequences: ``segments`` (B, S) numbers them 1..k, 0 for padding.

        A token attends to the earlier tokens of its own segment only (block-diagonal causal mask;
        padding attends to padding, harmlessly), its position counts those tokens, and its RoPE
        tables are those of its segment's length (TeleChat2's dynamic NTK and mscale depend on the
        total length), so each sequence is computed exactly as if it were alone.
        """
        if segments.shape != shape:
            raise ValueError(f"segment_ids: shape {segments.shape}: expected the shape of input_ids {shape}")
        same = segments[:, :, None] == segments[:, None, :]  # (B, S, S)
        allowed = same & np.tril(np.ones(shape[1:] * 2, dtype=bool))[None]
        positions = allowed.sum(-1) - 1  # (B, S): earlier tokens of the same segment
        lengths = same.sum(-1)  # (B, S): the length of each token's segment
        cos = np.empty(shape + (self.config.head_dim,), np.float32)
        sin = np.empty_like(cos)
        for length in np.unique(lengths):
            at = lengths == length
            table_cos, table_sin = rope_tables(self.config, int(length))
            cos[at], sin[at] = table_cos[positions[at]], table_sin[positions[at]]
        mask = np.where(allowed, 0.0, MASK_VALUE).astype(np.float32)[:, None]
        return cos, sin, mask, positions

    @staticmethod
    def token_mask(attention_mask=None, segment_ids=None) -> Tensor | None:
        """(B, S) float32, 0 at padding and 1 elsewhere, for the router statistics (transformers'
        ``load_balancing_loss_func`` with an attention mask): padding is where ``attention_mask`` (B, S)
        is 0 or ``segment_ids`` (B, S) is 0. None when neither is given (no padding)."""
        given = segment_ids if segment_ids is not None else attention_mask
        return None if given is None else Tensor((as_array(given) != 0).astype(np.float32))

    # ------------------------------------------------------------------ tensor side
    def forward(self, input_ids: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, q_scale=None,
                caches=None, token_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Logits (B, S, V/tp: this rank's vocabulary shard), the weighted router loss and the
        expert load of this rank's tokens (L, E + 1): per MoE layer, the routing slots of each expert
        (dropped ones included) and, last, the slots dropped over capacity (dense models: 0, 0).
        ``token_mask`` (B, S) (:meth:`token_mask`): the tokens the router loss counts (None: all).

        On a pipeline stage other than the last, returns this stage's hidden states instead of
        logits; on a stage other than the first, ``input_ids`` is the previous stage's output.
        """
        x = self.embed(input_ids) if self.is_first else input_ids
        stats = []
        for k, layer in enumerate(self.layers.values()):
            x, layer_stats = layer(x, cos, sin, mask, q_scale, None if caches is None else caches[k], token_mask)
            if layer_stats is not None:
                stats.append(layer_stats)
        router_loss, load = self.router_loss(stats, token_mask), self.expert_load(stats)
        if not self.is_last:
            return x, router_loss, load
        return self.lm_head(self.final_norm(x)), router_loss, load

    @staticmethod
    def expert_load(stats: list[tuple]) -> Tensor:
        """(L, E + 1) float32 from the MoE layers' stats: slots per expert, then dropped slots (() 0 if dense)."""
        if not stats:
            return ops.zeros((), ms.float32)
        return ops.stack([ops.cat([s[TOKENS], s[DROPPED].astype(ms.float32).reshape(1)]) for s in stats])

    def router_loss(self, stats: list[tuple], token_mask: Tensor | None = None) -> Tensor:
        """Switch/Mixtral load balancing over all MoE layers' routing slots pooled
        (E * sum(mean f * mean P)), plus the router z-loss, weighted by their coefficients.

        With R data/context-parallel ranks, rank r differentiates E * sum(f * P_r) * n_r / N, n_r its
        counted tokens (``token_mask``: all but padding; without one every rank counts 1) of the N of
        all ranks. With ``router_aux_loss_scope`` "global_batch" (default), f is f_global (the routed
        fractions, not differentiable) averaged over the ranks weighted by n_r: summed over ranks this
        is the loss of the whole batch, and so are the summed gradients. With "micro_batch" f is the
        rank's own f_r and n_r = 1: the mean over ranks of each rank's loss of its own tokens.
        """
        if not stats:
            return ops.zeros((), ms.float32)
        f = ops.stack([s[FRACTION] for s in stats]).mean(0)
        p = ops.stack([s[PROBABILITY] for s in stats]).mean(0)
        z = ops.stack([s[Z_LOSS] for s in stats]).mean()
        global_batch = self.config.router_aux_loss_scope == "global_batch"
        counted = token_mask.sum() if token_mask is not None and global_batch else ops.ones((), ms.float32)
        share = ops.ones((), ms.float32)  # this rank's share of the counted tokens
        for comm in self.data_comms:
            total = ops.maximum(comm.all_reduce(ops.stop_gradient(counted)), 1.0)
            if global_batch:
                f = comm.all_reduce(ops.stop_gradient(f * counted)) / total
            share, counted = share * counted / total, total
        balance = self.config.num_experts * (f * p * share).sum()
        return self.config.router_aux_loss_coef * balance + self.config.router_z_loss_coef * z * share

    def loss(self, logits: Tensor, router_loss: Tensor, labels: Tensor) -> Tensor:
        return self.loss_fn(logits, labels) + router_loss

    def loss_from_targets(self, logits: Tensor, router_loss: Tensor, targets: Tensor, count: Tensor | None = None,
                          router_weight: Tensor | float = 1.0) -> Tensor:
        """Loss with targets aligned to the logits (target[t] follows position t); ``count``: the
        global number of counted targets when the batch is split into micro-batches, ``router_weight``
        the micro-batch's share of the router loss (1 / micro-batches)."""
        return self.loss_fn.from_targets(logits, targets, count) + router_loss * router_weight

    def full_logits(self, local_logits: Tensor) -> Tensor:
        """All V logits from this rank's vocabulary shard (identity without tensor parallelism)."""
        return self.lm_head.full_logits(local_logits)

    def construct(self, input_ids, labels=None, attention_mask=None, segment_ids=None):
        check_token_ids(input_ids, labels, self.config.vocab_size)
        ids, cos, sin, mask, q_scale = self.prepare(input_ids, attention_mask, segment_ids=segment_ids)
        logits, router_loss, _ = self.forward(ids, cos, sin, mask, q_scale,
                                              token_mask=self.token_mask(attention_mask, segment_ids))
        if labels is None:
            return self.full_logits(logits)
        return self.loss(logits, router_loss, as_tensor(labels))

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, out_dir: str, overwrite: bool = False, dtype: str | None = None,
                        max_shard_bytes: int | None = None) -> None:
        """Write an HF-format directory (config.json, generation_config.json, safetensors). A model with
        a LoRA adapter refuses: its adapter is saved alone, or merged into its base by file."""
        from mindport.models.weights import DEFAULT_SHARD_BYTES, export_hf
        from mindport.models.registry import family

        if self.lora is not None:
            raise ConfigError(f"{out_dir}: this model carries a LoRA adapter, which an HF model directory cannot "
                              f"hold: save the adapter with mindport.models.lora.save_adapter(model, DIR) (a PEFT "
                              f"adapter directory; `mindport lora export` for a training checkpoint), then "
                              f"`mindport lora merge --base BASE --adapter DIR --dst {out_dir}` for a merged model")

        if self.quantization is not None:
            raise ConfigError(f"{out_dir}: this model's weights are quantized ({self.quantization}) for inference; "
                              f"save the model before quantize_weights (or the directory it was loaded from)")
        export_hf(self, family(self.config.family), out_dir, overwrite, dtype, max_shard_bytes or DEFAULT_SHARD_BYTES)

    def generate(self, input_ids, max_new_tokens: int = 32, **kwargs):
        """Token ids (B, S + new); see :func:`mindport.infer.generate.generate` for the options."""
        from mindport.infer.generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)
