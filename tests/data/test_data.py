"""Corpus, token files and the sharded deterministic sampler."""

from __future__ import annotations

import numpy as np
import pytest

from mpipar.data import (VOCAB_SIZE, BatchSampler, decode, default_corpus_text, encode,
                         load_tokens, split_train_val)


def test_default_corpus_is_deterministic_bytes():
    a, b = load_tokens(None), load_tokens(None)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint8 and len(a) > 400_000 and int(a.max()) < VOCAB_SIZE
    assert decode(a[:1000]) == default_corpus_text().encode("utf-8")[:1000].decode("utf-8", "replace")


def test_encode_decode_round_trip_and_replacement():
    text = "héllo ∑ world"
    assert decode(encode(text)) == text
    assert decode(encode(text)[:2]) == "h\ufffd"          # half of a 2-byte character


def test_split_is_last_tenth():
    t = np.arange(1000)
    tr, va = split_train_val(t)
    assert len(va) == 100 and va[0] == 900 and len(tr) == 900
    with pytest.raises(ValueError):
        split_train_val(t, 1.5)


def test_batch_is_deterministic_and_shifted():
    t = load_tokens(None)
    s1, s2 = BatchSampler(t, 8, 32, seed=3), BatchSampler(t, 8, 32, seed=3)
    x1, y1 = s1.batch(5)
    x2, y2 = s2.batch(5)
    assert x1.shape == y1.shape == (8, 32)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(x1[:, 1:], y1[:, :-1])
    assert not np.array_equal(s1.batch(6)[0], x1)                       # steps differ
    assert not np.array_equal(BatchSampler(t, 8, 32, seed=4).batch(5)[0], x1)
    assert not np.array_equal(BatchSampler(t, 8, 32, seed=3, stream=1).batch(5)[0], x1)


@pytest.mark.parametrize("world,n_micro", [(1, 4), (2, 2), (4, 1), (8, 1), (2, 4)])
def test_shards_union_is_global_batch(world, n_micro):
    t = load_tokens(None)
    s = BatchSampler(t, 8, 16, seed=0)
    gx, gy = s.batch(11)
    parts = [s.shard(r, world).batch(11, m, n_micro) for r in range(world) for m in range(n_micro)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), gx)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), gy)
    rows = [s.rows(r, world, m, n_micro) for r in range(world) for m in range(n_micro)]
    covered = np.concatenate([np.arange(8)[r] for r in rows])
    assert sorted(covered.tolist()) == list(range(8))                   # no overlap, no gap


def test_indivisible_batch_is_a_clear_error():
    s = BatchSampler(np.arange(100), 6, 4)
    with pytest.raises(ValueError, match="not divisible"):
        s.shard(0, 4)
    with pytest.raises(ValueError, match="not divisible"):
        s.batch(0, 0, 2, 0, 2)


def test_too_little_data():
    with pytest.raises(ValueError, match="block_size"):
        BatchSampler(np.arange(10), 2, 10)


def test_file_formats(tmp_path):
    toks = np.array([1, 2, 300, 4, 5, 6], dtype=np.uint16)
    np.save(tmp_path / "t.npy", toks)
    toks.tofile(tmp_path / "t.bin")
    (tmp_path / "t.txt").write_text("héllo", encoding="utf-8")
    np.testing.assert_array_equal(load_tokens(str(tmp_path / "t.npy")), toks)
    np.testing.assert_array_equal(load_tokens(str(tmp_path / "t.bin")), toks)
    np.testing.assert_array_equal(load_tokens(str(tmp_path / "t.txt")), encode("héllo"))
    x, y = BatchSampler(load_tokens(str(tmp_path / "t.bin")), 2, 3).batch(0)
    assert x.dtype == np.int64 and x.shape == (2, 3)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokens(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="UTF-8"):
        load_tokens(str(tmp_path / "bad.txt"))
    np.save(tmp_path / "f.npy", np.zeros((2, 2)))
    with pytest.raises(ValueError, match="1-D integer"):
        load_tokens(str(tmp_path / "f.npy"))
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        load_tokens(str(tmp_path / "o.npy"))                            # never unpickles
    (tmp_path / "odd.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="odd"):
        load_tokens(str(tmp_path / "odd.bin"))
