"""Published Megatron-LM training runs, transcribed with their sources: what the simulator
and the planner are checked against.

    from mpipar.sim.published import RUNS, run
    r = run("narayanan21-t1-1008B")
    r.spec            # TrainSpec: model, batch, layout, precision, recompute
    r.gpus            # 3072
    r.measured        # {"tflops_per_gpu": 163, "percent_of_peak": 52, "aggregate_pflops": 502.0}
    r.inferred        # {"micro_batch": "not printed; ...", ...}: what the paper does not print

Sources (A100 peak at 16-bit precision: 312 TFLOP/s, Narayanan et al. section 5 and
Korthikanti et al. footnote 5; ``A100_PEAK_FLOPS``):

* Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
  Megatron-LM", SC21, arXiv:2104.04473 (v5). Table 1 (weak scaling, 1.7B to 1T parameters on
  32 to 3072 A100s): heads, hidden size, layers, tp, pp, GPUs, batch size, achieved TFLOP/s
  per GPU, percentage of peak, aggregate PFLOP/s. Section 5.1: "we use the interleaved
  pipeline schedule with the scatter/gather optimization enabled", vocabulary 51,200,
  sequence length 2048, FLOPs by eq. 3, which "assumes activation recomputation"; section 1:
  "using mixed precision". Table 2 (PTD-P rows; the ZeRO-3 rows are left out, mpipar has no
  ZeRO-3): the GPT-3 175B (96 layers, 96 heads, hidden 12288: section 5.3.2) and the 530B
  model of Table 1, model-parallel size, batch size, GPUs, micro-batch size 1, TFLOP/s per
  GPU and the paper's training-time estimate for 300B tokens (eq. 4, not a measurement).
  Read from a text copy of the paper (a markdown conversion of arXiv 2104.04473v5).
* Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
  MLSys 2023, arXiv:2205.05198. Table 3 (22B, 175B, 530B, 1T: heads, hidden, layers, tp 8,
  pp 1/8/35/64, GPUs 8/64/280/512, global batch 4/64/280/512, micro-batch), Table 5
  (iteration time in seconds with full recompute and with "present work" = selective
  recompute + sequence parallelism, MFU and HFU of the latter); A100 80GB, mixed precision,
  s = 2048, V = 51200, no data parallelism, interleaving with 3 stages for 175B and 530B;
  the abstract: 530B on 2240 A100s (dp 8), MFU 54.2% vs 42.1% with full recompute. The PDF
  was not reachable here: Tables 3 and 5 are taken from a third-party transcription (reading
  notes that copy both tables and the set-up), whose MFU/HFU column is also the Megatron-LM
  README's table of May 2022 (NVIDIA/Megatron-LM commit 841f789); the iteration times are
  cross-checked by the paper's own FLOP formulas reproducing its MFU and HFU columns
  (tests/sim/test_published.py).

What the papers do not print is marked in ``inferred`` with the reason; numbers that could
not be found are left out (``docs/results/published.md`` lists them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mpipar.sim.spec import TrainSpec

A100_PEAK_FLOPS = 312e12        # 16-bit tensor-core peak, Narayanan et al. 2021 section 5
SEQ, VOCAB = 2048, 51200        # every run here (Narayanan section 5.1; Korthikanti Table 3 text)

NARAYANAN = ("Narayanan et al. 2021, Efficient Large-Scale Language Model Training on GPU "
             "Clusters Using Megatron-LM, SC21, arXiv:2104.04473")
KORTHIKANTI = ("Korthikanti et al. 2022, Reducing Activation Recomputation in Large "
               "Transformer Models, MLSys 2023, arXiv:2205.05198")


@dataclass(frozen=True)
class PublishedRun:
    name: str
    source: str                          # paper, table and columns the numbers come from
    spec: TrainSpec
    gpus: int
    measured: dict[str, float]           # as printed
    parameters_billion: float | None = None   # the paper's "parameters" column, as printed
    inferred: dict[str, str] = field(default_factory=dict)   # field -> why this value

    @property
    def iteration_s(self) -> float | None:
        """Seconds per optimiser step: printed (Korthikanti Table 5), or derived from the
        printed TFLOP/s per GPU with the paper's eq. 3 (Narayanan), None otherwise."""
        if "iteration_s" in self.measured:
            return self.measured["iteration_s"]
        tf = self.measured.get("tflops_per_gpu")
        if tf is None:
            return None
        return narayanan_eq3_flops(self.spec) / (tf * 1e12 * self.gpus)


def narayanan_eq3_flops(spec: TrainSpec) -> float:
    """FLOPs of one step by Narayanan et al. 2021 eq. 3, with activation recomputation:
    ``96 B s l h^2 (1 + s/(6h) + V/(16 l h))``."""
    B, s, l, h, V = spec.global_batch, spec.block_size, spec.n_layer, spec.n_embd, spec.vocab_size
    return 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))


def _spec(layers: int, hidden: int, heads: int, batch: int, tp: int, pp: int, gpus: int,
          **kw: Any) -> TrainSpec:
    if gpus % (tp * pp):
        raise ValueError(f"{gpus} GPUs are not a multiple of tp {tp} x pp {pp}")
    kw.setdefault("micro_batch", 1)
    kw.setdefault("precision", "fp16")
    return TrainSpec(n_layer=layers, n_embd=hidden, n_head=heads, block_size=SEQ,
                     vocab_size=VOCAB, global_batch=batch, dp=gpus // (tp * pp), tp=tp, pp=pp,
                     **kw)


_T1_INFERRED = {
    "micro_batch": "not printed in Table 1; 1, as in Table 2's PTD-P runs of the same system, "
                   "and every pipelined row's micro-batch count is then a multiple of pp, which "
                   "the interleaved schedule needs (section 2.2.2)",
    "precision": "section 1 says mixed precision, not which 16-bit type; fp16 assumed (the "
                 "paper's A100 peak is the 16-bit tensor-core peak either way)",
    "recompute": "full: section 5.1, eq. 3 'assumes activation recomputation'",
    "virtual_stages": "section 5.1 uses the interleaved schedule; the chunks per rank are not "
                      "printed, so left at 1 (non-interleaved) rather than guessed",
}

# Narayanan et al. 2021, Table 1: (parameters billion, heads, hidden, layers, tp, pp, GPUs,
# batch, achieved TFLOP/s per GPU, % of theoretical peak, achieved aggregate PFLOP/s)
_TABLE1 = [
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137, 44, 4.4),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 138, 44, 8.8),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142, 46, 18.2),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135, 43, 34.6),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138, 44, 70.8),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140, 45, 143.8),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148, 47, 227.1),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155, 50, 297.4),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163, 52, 410.2),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163, 52, 502.0),
]

# Narayanan et al. 2021, Table 2, PTD-P rows: (parameters billion, layers, heads, hidden,
# tp, pp [model-parallel size 96 = 8 x 12, 280 = 8 x 35], batch, GPUs, micro-batch,
# TFLOP/s per GPU, training days for 300B tokens [eq. 4 estimate])
_TABLE2 = [
    (174.6, 96, 96, 12288, 8, 12, 1536, 384, 1, 153, 84),
    (174.6, 96, 96, 12288, 8, 12, 1536, 768, 1, 149, 43),
    (174.6, 96, 96, 12288, 8, 12, 1536, 1536, 1, 141, 23),
    (529.6, 105, 128, 20480, 8, 35, 2240, 560, 1, 171, 156),
    (529.6, 105, 128, 20480, 8, 35, 2240, 1120, 1, 167, 80),
    (529.6, 105, 128, 20480, 8, 35, 2240, 2240, 1, 159, 42),
]
_T2_INFERRED = {
    "tp, pp": "Table 2 prints the model-parallel size (96, 280); the split is Table 1's for "
              "530B (8 x 35) and tp 8 (one DGX A100 node, section 3.2 takeaway 1) for 175B",
    "precision": _T1_INFERRED["precision"],
    "recompute": _T1_INFERRED["recompute"],
    "virtual_stages": "section 5 runs the interleaved schedule; chunks per rank not printed, "
                      "left at 1",
}

# Korthikanti et al. 2022, Table 3: (name, heads, hidden, layers, tp, pp, GPUs, global batch,
# micro-batch, interleaving stages or None) and Table 5: (full-recompute iteration s,
# present-work iteration s, MFU %, HFU %)
_TABLE3 = [
    ("22B", 64, 6144, 48, 8, 1, 8, 4, 4, None),
    ("175B", 96, 12288, 96, 8, 8, 64, 64, 1, 3),
    ("530B", 128, 20480, 105, 8, 35, 280, 280, 1, 3),
    ("1T", 160, 25600, 128, 8, 64, 512, 512, 1, None),
]
_TABLE5 = {"22B": (1.42, 1.10, 41.5, 43.7), "175B": (18.13, 13.75, 51.4, 52.8),
           "530B": (49.05, 37.83, 56.0, 57.0), "1T": (94.42, 71.49, 56.3, 57.0)}
_K_INFERRED = {
    "precision": "'mixed precision' (Table 3 set-up); fp16 assumed, as for Megatron-LM's runs "
                 "of the time (bf16 changes no byte count here)",
    "virtual_stages (1T)": "Table 3's text names interleaving for 175B and 530B only; 1 for 1T",
}


def _narayanan_table1() -> list[PublishedRun]:
    out = []
    for (P, heads, h, l, tp, pp, n, B, tf, pct, agg) in _TABLE1:
        spec = _spec(l, h, heads, B, tp, pp, n, recompute="full")
        out.append(PublishedRun(
            f"narayanan21-t1-{P:g}B", f"{NARAYANAN}, Table 1 (all columns), section 5.1", spec,
            n, {"tflops_per_gpu": tf, "percent_of_peak": pct, "aggregate_pflops": agg}, P,
            dict(_T1_INFERRED)))
    return out


def _narayanan_table2() -> list[PublishedRun]:
    out = []
    for (P, l, heads, h, tp, pp, B, n, b, tf, days) in _TABLE2:
        spec = _spec(l, h, heads, B, tp, pp, n, micro_batch=b, recompute="full")
        out.append(PublishedRun(
            f"narayanan21-t2-{P:g}B-{n}gpu",
            f"{NARAYANAN}, Table 2 (PTD Parallelism rows); architecture of 175B: section 5.3.2",
            spec, n, {"tflops_per_gpu": tf, "training_days_300B_tokens_estimated": days}, P,
            dict(_T2_INFERRED)))
    return out


def _korthikanti() -> list[PublishedRun]:
    out = []
    for (name, heads, h, l, tp, pp, n, B, b, v) in _TABLE3:
        full_s, present_s, mfu, hfu = _TABLE5[name]
        common = dict(micro_batch=b, virtual_stages=v or 1)
        src = f"{KORTHIKANTI}, Table 3 (configuration) and Table 5"
        out.append(PublishedRun(
            f"korthikanti22-{name}-full-recompute", f"{src}, row 'Full recompute'",
            _spec(l, h, heads, B, tp, pp, n, recompute="full", **common), n,
            {"iteration_s": full_s}, None, dict(_K_INFERRED)))
        out.append(PublishedRun(
            f"korthikanti22-{name}-selective-sp", f"{src}, rows 'Present work', MFU, HFU",
            _spec(l, h, heads, B, tp, pp, n, recompute="selective", sequence_parallel=True,
                  **common), n,
            {"iteration_s": present_s, "mfu_percent": mfu, "hfu_percent": hfu}, None,
            dict(_K_INFERRED)))
    # the abstract: the 530B model with 8-way data parallelism (2240 GPUs); global batch and
    # iteration time are not given there, so the batch is inferred and no time is stored
    inferred = dict(_K_INFERRED)
    inferred["global_batch"] = ("not printed with these MFUs; 8 x Table 3's 280 (the same 280 "
                                "sequences per pipeline) assumed")
    for recompute, sp, mfu in (("full", False, 42.1), ("selective", True, 54.2)):
        out.append(PublishedRun(
            f"korthikanti22-530B-2240gpu-{'selective-sp' if sp else 'full-recompute'}",
            f"{KORTHIKANTI}, abstract (530B on 2240 A100s)",
            _spec(105, 20480, 128, 2240, 8, 35, 2240, recompute=recompute,
                  sequence_parallel=sp, virtual_stages=3), 2240, {"mfu_percent": mfu}, None,
            inferred))
    return out


RUNS: list[PublishedRun] = _narayanan_table1() + _narayanan_table2() + _korthikanti()


def run(name: str) -> PublishedRun:
    """The run called ``name`` (``RUNS``); KeyError naming the known ones otherwise."""
    for r in RUNS:
        if r.name == name:
            return r
    raise KeyError(f"no published run {name!r}; known: {', '.join(r.name for r in RUNS)}")
