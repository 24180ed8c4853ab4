"""Token streams: the default corpus every CPython ships, UTF-8 text files, token files.

The default corpus is ``pydoc_data.topics.topics`` (the text behind ``help("if")`` etc.,
about 466 KB of English with code): present wherever Python is, so training needs no
download. Text is tokenised as UTF-8 bytes, so the vocabulary is 256 and a loss in nats per
token divided by ln 2 is bits per byte.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

VOCAB_SIZE = 256  # byte tokens
# The largest vocabulary a token file may imply: 2^24 rows (GPT-2 has 50257; a 2^24 x 768
# float32 embedding is already 48 GiB). A larger id is a corrupt or foreign file, not a model.
MAX_VOCAB_SIZE = 1 << 24


def default_corpus_text() -> str:
    """The pydoc help topics joined in sorted-key order (deterministic across runs)."""
    from pydoc_data.topics import topics  # noqa: PLC0415  (only when the default is used)

    return "".join(topics[k] for k in sorted(topics))


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as uint8 tokens 0..255."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode(tokens: Any) -> str:
    """Byte tokens back to text; bytes that do not form valid UTF-8 become U+FFFD."""
    arr = np.asarray(tokens).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError("decode expects byte tokens in 0..255")
    return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def load_tokens(path: str | None) -> np.ndarray:
    """A 1-D integer token array.

    - ``None``: the default corpus (see module docstring), uint8;
    - ``*.npy``: a 1-D integer array, memory-mapped (``allow_pickle=False``);
    - ``*.bin``: raw uint16 tokens (nanoGPT's format), memory-mapped;
    - anything else: a UTF-8 text file, tokenised as bytes.
    """
    if path is None:
        return encode(default_corpus_text())
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a directory, not a data file (give a UTF-8 text "
                                f"file, a .npy token array or a .bin of uint16 tokens)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path!r} (give a UTF-8 text file, "
                                f"a .npy token array or a .bin of uint16 tokens)")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path!r} is not a readable .npy token array: {e}") from e
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"{path!r}: expected a 1-D integer token array, got "
                             f"{tokens.dtype} with shape {tokens.shape}")
    elif ext == ".bin":
        if os.path.getsize(path) % 2:
            raise ValueError(f"{path!r}: a .bin token file holds uint16, but its size is odd")
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
    else:
        with open(path, "rb") as f:
            raw = f.read()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path!r} is not UTF-8 text ({e}); token files must end in "
                             f".npy or .bin") from e
        tokens = np.frombuffer(raw, dtype=np.uint8)
    if tokens.size < 2:
        raise ValueError(f"{path!r} holds {tokens.size} tokens; at least 2 are needed")
    return tokens


def vocab_size_of(tokens: np.ndarray) -> int:
    """The vocabulary a token stream needs: the 256 bytes, or more for ids beyond 255.
    ValueError for negative ids or one beyond ``MAX_VOCAB_SIZE``."""
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0:
        raise ValueError(f"holds a negative token id ({lo})")
    if hi >= MAX_VOCAB_SIZE:
        raise ValueError(f"token id {hi:,} implies a vocabulary of {hi + 1:,} rows, beyond the "
                         f"limit of {MAX_VOCAB_SIZE:,} (2^24)")
    return max(VOCAB_SIZE, hi + 1)


def split_train_val(tokens: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): the first ``1 - val_fraction`` of the stream and the rest (views)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    n_val = max(1, int(round(len(tokens) * val_fraction)))
    return tokens[:-n_val], tokens[-n_val:]
