"""The decoder-only causal LM every family builds: embed -> N x DecoderLayer -> norm -> head."""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from mindport.config import ModelConfig
from mindport.transformer.block import DecoderLayer
from mindport.transformer.layers import Embedding, RMSNorm, as_tensor, linear
from mindport.transformer.loss import causal_lm_loss
from mindport.transformer.rope import logn_scale, rope_tables

MASK_VALUE = float(np.finfo(np.float32).min)


class CausalLM(nn.Cell):
    """``model(input_ids)`` -> logits (B, S, V); ``model(input_ids, labels=labels)`` -> mean loss.

    Host-side inputs (RoPE tables for the true positions, the causal/padding mask) are built
    by :meth:`prepare`; :meth:`forward` is pure tensor work and can be compiled with ``ms.jit``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = Embedding(config.vocab_size, config.hidden_size, config)
        self.layers = nn.CellList([DecoderLayer(config) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config)
        self.lm_head = linear(config, config.hidden_size, config.vocab_size, False, role="vocab")

    # ------------------------------------------------------------------ host side
    def prepare(self, input_ids, attention_mask=None, past_len: int = 0):
        """Token ids plus RoPE tables, additive mask and logN scale for this call.

        attention_mask (B, past_len + S), 1 for real tokens and 0 for (left) padding.
        Positions count real tokens only, so left-padded rows get the positions they would
        have unpadded.
        """
        ids = np.asarray(input_ids.asnumpy() if isinstance(input_ids, Tensor) else input_ids)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids: shape {ids.shape}: expected (batch, seq_len) with seq_len >= 1")
        b, s = ids.shape
        total = past_len + s
        if attention_mask is None:
            keep = np.ones((b, total), dtype=bool)
        else:
            keep = np.asarray(attention_mask.asnumpy() if isinstance(attention_mask, Tensor) else attention_mask) != 0
            if keep.shape != (b, total):
                raise ValueError(f"attention_mask: shape {keep.shape}: expected {(b, total)}")
        positions = np.maximum(np.cumsum(keep, axis=1) - 1, 0)[:, past_len:]  # (B, S)
        cos, sin = rope_tables(self.config, total, int(positions.max()) + 1)
        causal = np.tril(np.ones((s, total), dtype=bool), k=past_len)  # query i sees keys <= past_len + i
        allowed = causal[None] & keep[:, None, :]
        allowed |= ~allowed.any(-1, keepdims=True)  # an all-padding row attends to itself harmlessly
        mask = np.where(allowed, 0.0, MASK_VALUE).astype(np.float32)[:, None]  # (B, 1, S, total)
        q_scale = None
        if self.config.use_logn_attn:
            q_scale = Tensor(logn_scale(self.config, positions)[:, None, :, None])
        return (as_tensor(ids), Tensor(cos[positions][:, None]), Tensor(sin[positions][:, None]),
                Tensor(mask), q_scale)

    # ------------------------------------------------------------------ tensor side
    def forward(self, input_ids: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, q_scale=None,
                caches=None) -> tuple[Tensor, Tensor]:
        """Logits (B, S, V) and the summed auxiliary router loss (0 for dense models)."""
        x = self.embed(input_ids)
        aux = ops.zeros((), ms.float32)
        for i, layer in enumerate(self.layers):
            x, layer_aux = layer(x, cos, sin, mask, q_scale, None if caches is None else caches[i])
            aux = aux + layer_aux
        return self.lm_head(self.final_norm(x)), aux

    def loss(self, logits: Tensor, aux: Tensor, labels: Tensor) -> Tensor:
        return causal_lm_loss(logits, labels) + self.config.router_aux_loss_coef * aux

    def construct(self, input_ids, labels=None, attention_mask=None):
        ids, cos, sin, mask, q_scale = self.prepare(input_ids, attention_mask)
        logits, aux = self.forward(ids, cos, sin, mask, q_scale)
        if labels is None:
            return logits
        return self.loss(logits, aux, as_tensor(labels))

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, out_dir: str, overwrite: bool = False, dtype: str | None = None,
                        max_shard_bytes: int | None = None) -> None:
        """Write an HF-format directory (config.json, generation_config.json, safetensors)."""
        from mindport.ckpt_tools.weights import DEFAULT_SHARD_BYTES, export_hf
        from mindport.models.registry import family

        export_hf(self, family(self.config.family), out_dir, overwrite, dtype, max_shard_bytes or DEFAULT_SHARD_BYTES)
