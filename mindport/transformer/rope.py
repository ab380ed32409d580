"""Rotary position tables: plain RoPE and TeleChat2's dynamic NTK with attention scaling.

Tables are computed on the host in numpy for the positions a forward pass needs, so the
same model graph serves any length. TeleChat2 (``rope_scaling="telechat_ntk"``):

    seq_len = max(total_len, training_seqlen)
    alpha   = max(2 ** ceil(log2(seq_len / base_seqlen) + 1) - 1, 1)
    base'   = base * alpha ** (D / (D - 2))
    mscale  = 1 if seq_len <= training_seqlen else 0.1 * ln(seq_len / training_seqlen) + 1

and mscale multiplies cos and sin. With ``rope_fp16_tables`` the tables are rounded as
the published code does: computed in fp32, cast to fp16, scaled by mscale, fp16 again.

KV-cache decoding follows the published code: tables for the current total length are
recomputed at every step, while keys already in the cache keep the rotation they were
written with.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from mindport.config import ModelConfig


def ntk_scaling(total_len: int, training_seqlen: int, base_seqlen: int) -> tuple[float, float]:
    """TeleChat2's (alpha, mscale) for a sequence whose total length is ``total_len``."""
    seq_len = max(total_len, training_seqlen)
    alpha = max(2 ** math.ceil(math.log2(seq_len / base_seqlen) + 1) - 1, 1)
    ratio = seq_len / training_seqlen
    mscale = 1.0 if ratio <= 1 else 0.1 * math.log(ratio) + 1.0
    return float(alpha), mscale


def rope_tables(config: ModelConfig, total_len: int, num_positions: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape (num_positions, D) in fp32, for a sequence of ``total_len`` tokens (read-only:
    views of a table shared by every call with the same scaling, see :func:`_scaled_tables`)."""
    base, mscale = config.rope_theta, 1.0
    if config.rope_scaling == "telechat_ntk":
        alpha, mscale = ntk_scaling(total_len, config.training_seqlen, config.base_seqlen)
        base = base * alpha ** (config.head_dim / (config.head_dim - 2))
    n = num_positions or total_len
    cos, sin = _scaled_tables(config.head_dim, base, mscale, config.rope_fp16_tables, 1 << (n - 1).bit_length())
    return cos[:n], sin[:n]


@functools.lru_cache(maxsize=16)
def _scaled_tables(d: int, base: float, mscale: float, fp16: bool, num_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """The tables of positions [0, num_positions), computed once per (D, base, mscale, rounding, size):
    a decode step asks for one more position each time (a power-of-two size serves all of them), and
    its cost (cos and sin in float64) was a third of the host's time per token."""
    # Each fp32 step correctly rounded (float64 math, then one rounding), as torch's CPU
    # kernels give; numpy's own float32 pow/cos are up to an ulp off.
    f32, f64 = np.float32, np.float64
    exponent = (np.arange(0, d, 2, dtype=f64) / d).astype(f32)
    inv_freq = (1.0 / (f64(f32(base)) ** exponent.astype(f64)).astype(f32).astype(f64)).astype(f32)
    positions = np.arange(num_positions, dtype=f64)
    freqs = (positions[:, None] * inv_freq.astype(f64)[None, :]).astype(f32)
    angles = np.concatenate([freqs, freqs], axis=-1).astype(f64)  # (S, D): rotate-half layout
    cos, sin = np.cos(angles).astype(f32), np.sin(angles).astype(f32)
    if fp16:
        # fp16 table times a Python-float mscale: fp32 arithmetic, rounded to fp16 (torch's rule)
        cos = (cos.astype(np.float16).astype(f32) * f32(mscale)).astype(np.float16).astype(f32)
        sin = (sin.astype(np.float16).astype(f32) * f32(mscale)).astype(np.float16).astype(f32)
    else:
        cos, sin = (cos * f32(mscale)).astype(f32), (sin * f32(mscale)).astype(f32)
    cos.setflags(write=False)
    sin.setflags(write=False)
    return cos, sin


def logn_scale(config: ModelConfig, positions: np.ndarray) -> np.ndarray:
    """Opt-in logN query scale: ln(p + 1) / ln(training_seqlen) past training_seqlen, else 1."""
    p = positions.astype(np.float64) + 1.0
    scale = np.log(np.maximum(p, 1.0)) / math.log(config.training_seqlen)
    return np.where(p > config.training_seqlen, scale, 1.0).astype(np.float32)
