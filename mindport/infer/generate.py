"""Autoregressive generation with a preallocated KV cache: one forward over the prompt, then
one token per step. Sampling runs on the host in numpy (it is a few vocab-sized vectors).

Batched prompts of different lengths are left-padded; the attention mask hides the padding
and RoPE positions count real tokens only, so each row decodes as it would alone.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from mindspore import Tensor

from mindport.infer.decoder import CompiledDecoder
from mindport.transformer.attention import MASK_VALUE
from mindport.transformer.layers import as_array


def left_pad(prompts, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) of shape (B, S) from a 2-D array or a list of token lists."""
    if isinstance(prompts, Tensor):
        prompts = prompts.asnumpy()
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        rows = list(prompts)
    elif isinstance(prompts, np.ndarray) and prompts.ndim == 1:
        rows = [prompts]
    else:
        rows = [list(r) for r in prompts]
        if rows and not isinstance(rows[0], (list, np.ndarray)) and np.ndim(rows[0]) == 0:
            rows = [list(prompts)]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("prompt: empty (every prompt needs at least one token)")
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = r
        mask[b, width - len(r):] = 1
    return ids, mask


def apply_repetition_penalty(logits: np.ndarray, history: np.ndarray, history_mask: np.ndarray,
                             penalty: float) -> np.ndarray:
    """HF/CTRL rule: a seen token's logit is divided by ``penalty`` if positive, else multiplied."""
    if penalty == 1.0:
        return logits
    out = logits.copy()
    for b in range(logits.shape[0]):
        seen = np.unique(history[b][history_mask[b] > 0])
        vals = out[b, seen]
        out[b, seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def sample_next(logits: np.ndarray, rng: np.random.Generator, do_sample: bool, temperature: float, top_k: int,
                top_p: float) -> np.ndarray:
    """Next token per row from logits (B, V): greedy, or temperature / top-k / top-p sampling."""
    if not do_sample:
        return logits.argmax(-1)
    scores = logits.astype(np.float64) / max(temperature, 1e-6)
    if top_k and top_k < scores.shape[-1]:
        kth = np.partition(scores, -top_k, axis=-1)[:, -top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, -1)
        keep_sorted = np.cumsum(sorted_p, -1) - sorted_p < top_p  # smallest prefix reaching top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=p) for p in probs])


def _stepper(model, batch: int, total: int, use_cache: bool):
    """``(ids, mask, past) -> last-position logits (B, V)`` as numpy: a compiled static-cache step
    (dense and MoE models), or a full forward without cache."""
    if not use_cache:
        return lambda ids, mask, past: _last(model, model.forward(*model.prepare(ids, mask))[0])
    decoder = model.compiled_decoders.get((batch, total))
    if decoder is None:
        decoder = model.compiled_decoders[(batch, total)] = CompiledDecoder(model, batch, total)

    def step(ids, mask, past):
        ids_t, cos, sin, step_mask, q_scale = model.prepare(ids, mask, past_len=past)
        s = ids.shape[1]
        padded = np.full(step_mask.shape[:3] + (total,), MASK_VALUE, np.float32)
        padded[..., :past + s] = step_mask.asnumpy()
        write = np.zeros((1, 1, total, 1), np.float32)
        write[0, 0, past:past + s, 0] = 1.0
        logits = decoder.step(ids_t, cos, sin, Tensor(padded), Tensor(write), q_scale)
        # slicing on the host: asnumpy() is a view of the step's output, a Tensor slice would launch an op (~0.3 ms)
        return logits.asnumpy()[:, -1].astype(np.float32)

    return step


def _last(model, local_logits) -> np.ndarray:
    return model.full_logits(local_logits[:, -1:])[:, 0].astype("float32").asnumpy()


def generate(model, input_ids, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             attention_mask=None, seed: int | None = None, use_cache: bool = True,
             streamer: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
    """Token ids (B, S + generated) with left-padded prompts; finished rows are filled with pad.

    ``streamer`` is called with the (B,) tokens of every step as they are produced.
    """
    if not repetition_penalty > 0:  # the CTRL rule divides by it; 0 gives NaN probabilities, < 0 flips signs
        raise ValueError(f"repetition_penalty = {repetition_penalty}: expected a positive number (1.0: off)")
    config = model.config
    pad = pad_token_id if pad_token_id is not None else (config.pad_token_id if config.pad_token_id is not None
                                                          else config.eos_token_id or 0)
    ids, mask = left_pad(input_ids, pad)
    if attention_mask is not None:
        mask = as_array(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask: shape {mask.shape}: expected {ids.shape}")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        raise ValueError(f"prompt: token id {int(ids.max() if ids.max() >= config.vocab_size else ids.min())} "
                         f"outside the vocabulary [0, {config.vocab_size})")
    limit = config.max_position_embeddings
    if ids.shape[1] > limit:
        raise ValueError(f"prompt: {ids.shape[1]} tokens, longer than max_position_embeddings = {limit}")
    if config.rope_scaling == "none" and ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"max_new_tokens = {max_new_tokens}: prompt ({ids.shape[1]}) + new tokens exceeds "
                         f"max_position_embeddings = {limit}")
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    if eos_token_id is None and config.eos_token_id is not None:
        eos = {config.eos_token_id}
    rng = np.random.default_rng(seed)
    b = ids.shape[0]
    done = np.zeros(b, dtype=bool)
    out, full_mask = ids, mask
    if model.groups.sequence_parallel:
        raise ValueError("use_seq_parallel: generation decodes one token per step; run it with "
                         "use_seq_parallel: False (tensor parallelism alone)")
    total = ids.shape[1] + max_new_tokens
    step_logits = _stepper(model, b, total, use_cache)
    step_ids, past = ids, 0
    for _ in range(max_new_tokens):
        if use_cache:
            last = step_logits(step_ids, full_mask, past)
            past += step_ids.shape[1]
        else:
            last = step_logits(out, full_mask, 0)
        last = apply_repetition_penalty(last, out, full_mask, repetition_penalty)
        token = np.where(done, pad, sample_next(last, rng, do_sample, temperature, top_k, top_p))
        done |= np.isin(token, list(eos))
        out = np.concatenate([out, token[:, None]], axis=1)
        full_mask = np.concatenate([full_mask, np.ones((b, 1), dtype=full_mask.dtype)], axis=1)
        step_ids = token[:, None]
        if streamer is not None:
            streamer(token)
        if done.all():
            break
    return out
