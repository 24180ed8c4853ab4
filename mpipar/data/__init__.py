"""Data: byte-level tokens from an embedded corpus or a file, and a sharded batch sampler.

::

    from mpipar.data import load_tokens, split_train_val, BatchSampler
    tokens = load_tokens(None)                 # CPython's pydoc help topics, bytes 0..255
    train, val = split_train_val(tokens)       # last 10% is validation
    sampler = BatchSampler(train, batch_size=32, block_size=128, seed=0)
    x, y = sampler.batch(step=7, dp_rank=1, dp_size=4)   # rows 8..15 of global batch 7
"""

from mpipar.data.corpus import (MAX_VOCAB_SIZE, VOCAB_SIZE, decode, default_corpus_text, encode,
                                load_tokens, split_train_val, vocab_size_of)
from mpipar.data.sampler import BatchSampler

__all__ = ["MAX_VOCAB_SIZE", "VOCAB_SIZE", "BatchSampler", "decode", "default_corpus_text",
           "encode", "load_tokens", "split_train_val", "vocab_size_of"]
