"""Run pytest on every rank, but let only rank 0 write to stdout.

Eight ranks printing the same progress dots and summary make an unreadable log. Ranks other
than 0 keep stderr, where tests/conftest.py reports any failure on that rank (test id, rank
and traceback) before aborting the job, so nothing that matters is hidden.
"""

from __future__ import annotations

import os
import sys

from mpipar.runtime import world_rank


def main() -> int:
    if world_rank() != 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        sys.stdout = open(os.devnull, "w")
    import pytest

    return int(pytest.main(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
