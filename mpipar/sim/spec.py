"""What a simulated training step is of: a GPT, a batch and a layout (``TrainSpec``).

    spec = TrainSpec(n_layer=128, n_embd=25600, n_head=160, block_size=2048, vocab_size=51200,
                     global_batch=512, micro_batch=1, dp=1, tp=8, pp=64,
                     precision="fp16", recompute="selective", sequence_parallel=True)
    spec.micro_batches        # 512 micro-batches per optimiser step on each pipeline
    spec.gpus                 # 512

The same knobs as the trainer's ``Layout`` (dp, tp, pp, schedule, zero, bucket_mb,
allreduce) plus those the simulator has before the trainer (``precision``, ``recompute``,
``sequence_parallel``, ``virtual_stages``): the trainer's later flags must mean exactly these.

* ``global_batch``: sequences per optimiser step over all data-parallel ranks;
  ``micro_batch``: sequences per micro-batch on one data-parallel rank; so each pipeline
  runs ``global_batch / (dp * micro_batch)`` micro-batches per step (gradient accumulation
  when pp = 1).
* ``precision``: ``fp32``; or ``bf16`` / ``fp16`` (mixed precision: matmul inputs,
  activations and gradients in 16 bits, fp32 master weights and optimiser state).
* ``recompute``: ``none``; ``selective`` (attention scores and softmax recomputed in backward,
  Korthikanti et al. 2022); ``full`` (each block's forward rerun from its input).
* ``virtual_stages`` v > 1 with ``schedule="1f1b"``: interleaved 1F1B, v model chunks per
  pipeline rank (Narayanan et al. 2021).
* ``dropout`` (the model's, as ``GPTConfig.dropout``: masks are cached only when > 0) and
  ``stage_layers`` (blocks per pipeline stage, as ``Layout.stage_layers``; None: balanced by
  FLOPs) come last, with defaults, so the fields above keep their positions.
* ``gpt_config`` and ``layout`` are the same step as the trainer's ``GPTConfig`` and
  ``Layout`` (the pipeline's micro-batches are ``micro_batches``, one accumulation step), so
  the memory model sizes what the trainer would build from the trainer's own functions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from mpipar.nn.block import RECOMPUTE as BLOCK_RECOMPUTE
from mpipar.nn.gpt import PRESETS, GPTConfig
# the precisions and their activation and matmul-input dtypes: the trainer's (optim/mixed.py)
from mpipar.optim.mixed import COMPUTE_DTYPE, PRECISIONS  # noqa: F401  (re-exported)
from mpipar.parallel.layout import Layout

RECOMPUTE = tuple(BLOCK_RECOMPUTE)        # the blocks' policies (nn/block.py), by name


# Well-known models: (n_layer, n_embd, n_head, block_size, vocab_size). GPT-2: Radford et al.
# 2019 (Table 2; vocabulary 50,257, context 1,024); GPT-3 175B: Brown et al. 2020, Table 2.1;
# the Megatron-LM models: Korthikanti et al. 2022, Table 3 (sequence 2,048, vocabulary 51,200;
# also in Narayanan et al. 2021, Table 1).
MODEL_FIELDS = ("n_layer", "n_embd", "n_head", "block_size", "vocab_size")
MODELS: dict[str, tuple[int, int, int, int, int]] = {
    # the trainer's own presets (nn/gpt.py), so a prediction can be checked by training
    **{name: tuple(getattr(c, f) for f in MODEL_FIELDS) for name, c in PRESETS.items()},
    "gpt2": (12, 768, 12, 1024, 50257),
    "gpt2-medium": (24, 1024, 16, 1024, 50257),
    "gpt2-large": (36, 1280, 20, 1024, 50257),
    "gpt2-xl": (48, 1600, 25, 1024, 50257),
    "gpt3-175b": (96, 12288, 96, 2048, 50257),
    "megatron-22b": (48, 6144, 64, 2048, 51200),
    "megatron-175b": (96, 12288, 96, 2048, 51200),
    "megatron-530b": (105, 20480, 128, 2048, 51200),
    "megatron-1t": (128, 25600, 160, 2048, 51200),
}


@dataclass(frozen=True)
class TrainSpec:
    # the model (nanoGPT's GPTConfig names)
    n_layer: int
    n_embd: int
    n_head: int
    block_size: int
    vocab_size: int
    # the batch
    global_batch: int
    micro_batch: int = 1
    # the layout
    dp: int = 1
    tp: int = 1
    pp: int = 1
    virtual_stages: int = 1
    schedule: str = "1f1b"
    zero: int = 0
    bucket_mb: float | None = 25.0
    allreduce: str = "native"
    # what the simulator knows before the trainer
    precision: str = "fp32"
    recompute: str = "none"
    sequence_parallel: bool = False
    bias: bool = True
    optimizer: str = "adamw"
    dropout: float = 0.0
    stage_layers: tuple[int, ...] | None = None

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimiser step on one pipeline (``global_batch / (dp * micro_batch)``)."""
        return self.global_batch // (self.dp * self.micro_batch)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.block_size

    @property
    def compute_dtype(self) -> str:
        return COMPUTE_DTYPE[self.precision]

    @property
    def mixed_precision(self) -> bool:
        """16-bit parameters and gradients with fp32 master weights (bf16, fp16)."""
        return self.precision != "fp32"

    @property
    def gpt_config(self) -> GPTConfig:
        """The model as the trainer's ``GPTConfig``."""
        return GPTConfig(vocab_size=self.vocab_size, block_size=self.block_size,
                         n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                         bias=self.bias, dropout=self.dropout)

    @property
    def layout(self) -> Layout:
        """The step as the trainer's ``Layout``: ``micro_batches`` pipeline micro-batches of
        one accumulation step; interleaving, recompute and sequence parallelism are the
        Layout's own fields, so the trainer runs exactly what is simulated."""
        return Layout(dp=self.dp, tp=self.tp, pp=self.pp, micro_batches=self.micro_batches,
                      schedule=self.schedule, stage_layers=self.stage_layers, zero=self.zero,
                      bucket_mb=self.bucket_mb, allreduce=self.allreduce,
                      virtual_stages=self.virtual_stages, recompute=self.recompute,
                      sequence_parallel=self.sequence_parallel)

    def check(self) -> None:
        """Raise ValueError naming the quantity when the spec is not a training step."""
        for name in ("n_layer", "n_embd", "n_head", "block_size", "vocab_size", "global_batch",
                     "micro_batch", "dp", "tp", "pp", "virtual_stages"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute {self.recompute!r} is not one of {', '.join(RECOMPUTE)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout {self.dropout!r} is not in [0, 1)")
        if self.n_embd % self.n_head:
            raise ValueError(f"{self.n_head} heads do not divide width {self.n_embd}")
        per_step = self.dp * self.micro_batch
        if self.global_batch % per_step:
            raise ValueError(f"global batch {self.global_batch} is not a multiple of dp {self.dp} "
                             f"x micro-batch {self.micro_batch} = {per_step}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def with_(self, **changes: Any) -> "TrainSpec":
        return replace(self, **changes)
