"""Benchmarks: ``python -m mpipar.bench SUBCOMMAND --help``.

Each subcommand lives in its own module of this package, exposing
``add_arguments(parser)`` and ``main(args) -> int``. Results are medians over repeats and are
always printed beside a baseline measured in the same run.
"""

# subcommand -> (module, one-line help); modules are imported only when chosen.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "collectives": ("mpipar.bench.collectives", "collective algorithms beside MPI's native (run under mpiexec)"),
    "tune": ("mpipar.bench.tune", "measure every algorithm per size and save the table used by algorithm='auto'"),
    "calibrate": ("mpipar.bench.calibrate", "measure alpha/beta/gamma of this machine and save a network profile"),
    "train": ("mpipar.bench.train", "single-process training throughput, beside PyTorch eager when installed"),
    "parallel": ("mpipar.bench.parallel", "step time, overlap, bubble and memory per parallel layout"),
    "precision": ("mpipar.bench.precision", "fp32 beside bf16 and fp16 mixed precision: bytes, step time, memory, loss"),
    "ps": ("mpipar.bench.ps", "parameter-server training with a slowed worker: sync, async, ssp:S beside all-reduce (run under mpiexec)"),
    "training-techniques": ("mpipar.bench.techniques", "precision, compression and ps in one run, each beside its baseline (run under mpiexec -n 3)"),
    "gpu": ("mpipar.bench.gpu", "one GPU: matmul TFLOP/s, GPT-2 small tokens/s and MFU beside torch, transfers, host syncs"),
    "compression": ("mpipar.bench.compression", "gradient compression schemes beside uncompressed at dp = the world: bytes, step time, residual memory, val loss (run under mpiexec)"),
}
