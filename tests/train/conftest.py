"""Shared tiny training setup: a sentencepiece tokenizer and packed data from the embedded
corpus, and a 2-layer TeleChat2 config, all small enough that a train step compiles in seconds."""
from __future__ import annotations

import os

import pytest

from testkit.train import SEQ, VOCAB


@pytest.fixture(scope="session")
def corpus():
    from mindport.corpus import pydoc_topics

    return pydoc_topics()[:12]


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory, corpus):
    from mindport.tokenizer import train_sentencepiece

    out = str(tmp_path_factory.mktemp("tok"))
    train_sentencepiece(corpus, VOCAB, out)
    return out


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, tok_dir, corpus):
    from mindport.tokenizer import Tokenizer
    from mindport.train.data import prepare

    out = os.path.join(str(tmp_path_factory.mktemp("data")), "packed")
    prepare(corpus, Tokenizer.load(tok_dir), out, SEQ)
    return out


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory):
    """Packed SFT data (prompts ignored, several sequences per row, padding), written directly."""
    from testkit import sft_data

    tokens, labels, segments, _ = sft_data.pack(sft_data.synthetic_sequences(48, VOCAB, 4, 24), SEQ)
    return sft_data.write(os.path.join(str(tmp_path_factory.mktemp("sft")), "packed"), tokens, VOCAB, labels,
                          segments)
