"""Packed rows (several sequences per row, segment ids): each sequence is computed as if alone."""
import numpy as np
import pytest
from mindspore import Tensor

from testkit import sft_data

VOCAB = 128
SEQ = 48  # longer than the tiny presets' training_seqlen (32): one NTK table for the whole row would differ


def _nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per-position -log p(ids[t + 1]) in float64, (L - 1,)."""
    z = logits[:-1].astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -logp[np.arange(len(ids) - 1), ids[1:]]


@pytest.mark.parametrize("preset", ["telechat2-tiny-gqa", "mixtral-tiny"])
def test_packed_row_gives_each_sequence_its_own_losses(preset):
    from mindport import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_preset(preset, vocab_size=VOCAB))
    model.init_weights(0)
    sequences = [(ids, labels) for ids, labels in sft_data.synthetic_sequences(3, VOCAB, 9, 20, seed=1)]
    tokens, labels, segments, places = sft_data.pack(sequences, SEQ)
    assert tokens.shape[0] == 1 and (segments == 0).any()  # one row, with padding at its end

    local_logits = model.forward(*model.prepare(tokens, segment_ids=segments))[0]
    logits = model.full_logits(local_logits).asnumpy()[0]
    weighted, count = 0.0, 0
    for (ids, lab), (_, start) in zip(sequences, places):
        alone = model(np.asarray([ids])).asnumpy()[0]
        ids = np.asarray(ids)
        np.testing.assert_allclose(_nll(logits[start:start + len(ids)], ids), _nll(alone, ids), atol=1e-5, rtol=0)
        supervised = np.asarray(lab[1:]) != -100
        weighted += _nll(alone, ids)[supervised].sum()
        count += supervised.sum()
    # the cross-entropy of the packed row is the mean over the supervised tokens of all its sequences
    loss = float(model.loss_fn(local_logits, Tensor(labels)).asnumpy())
    assert loss == pytest.approx(weighted / count, abs=1e-5)
