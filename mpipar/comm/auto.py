"""``algorithm="auto"``: pick an algorithm per collective and message size.

    from mpipar.comm.auto import choose
    choose("allreduce", nbytes=4 << 20, p=8)          # e.g. "ring"

Where the choice comes from, first found wins:
1. a tuned table measured on this machine by ``python -m mpipar.bench tune``: the ``table``
   argument (a dict or a path), else ``$MPIPAR_TUNE_TABLE``, else
   ``~/.cache/mpipar/tune-<host>-<p>.json`` (``default_table_path``); it is used only when
   its ``ranks`` equals p (a sub-group of another size falls through to 2);
2. the cost model (``cost_model.py``) with the default profile (``mpipar/comm/profiles/local.json``,
   measured on the development machine): the algorithm with the least predicted time.

Table format (JSON), one file per host and world size::

    {"format": "mpipar-tune/1", "host": "vm", "ranks": 8, "date": "2026-11-23T03:00:00Z",
     "dtype": "float32", "source": "python -m mpipar.bench tune ...",
     "collectives": {
        "allreduce": [
           {"bytes": 4096,    "best": "rhd",  "time_us": {"native": 41.0, "ring": 80.2, "rhd": 30.1}},
           {"bytes": 4194304, "best": "ring", "time_us": {"native": 900.0, "ring": 850.3, ...}}],
        "allgather": [...]}}

An entry's ``best`` is used when present, else the least ``time_us``. Lookup takes the
entry whose size is nearest in log2 (a tie goes to the larger size). An algorithm the
running code does not have falls back to ``native``. Entries have no other keys, and
collectives are those of ``algorithms.COLLECTIVES``: ``load_table`` raises ValueError, naming
the file, for a table of any other shape.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

from mpipar.comm import cost_model
from mpipar.comm.algorithms import COLLECTIVES, algorithm_names
from mpipar.comm.network import Profile, load_profile

TABLE_FORMAT = "mpipar-tune/1"
ENV_TABLE = "MPIPAR_TUNE_TABLE"
ENTRY_KEYS = ("bytes", "best", "time_us")


def default_table_path(p: int, host: str | None = None) -> Path:
    """Where ``bench tune`` saves, and ``auto`` looks for, the table of ``p`` ranks."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "mpipar" / f"tune-{host or platform.node()}-{p}.json"


def load_table(path: str | Path) -> dict[str, Any]:
    """Read and check a tuned table. A table that is not one (not JSON, the wrong shape, a
    size that is not a number ...) raises one ValueError naming ``path`` and what is wrong,
    so that ``auto`` with a corrupt ``$MPIPAR_TUNE_TABLE`` fails clearly before any collective."""
    try:
        table = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a {TABLE_FORMAT} table: not JSON ({e})") from None
    if not isinstance(table, dict):
        raise ValueError(f"{path}: not a {TABLE_FORMAT} table: a JSON {type(table).__name__}, "
                         "not an object")
    if table.get("format") != TABLE_FORMAT:
        raise ValueError(f"{path}: not a {TABLE_FORMAT} table (format={table.get('format')!r})")
    _check_table(table, path)
    return table


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_table(table: dict[str, Any], path: str | Path) -> None:
    """Everything ``lookup`` and ``choose`` read, in the shapes they read it."""
    if "ranks" in table:
        try:
            int(table["ranks"])
        except (TypeError, ValueError):
            raise ValueError(f"{path}: 'ranks' must be a number of ranks, got {table['ranks']!r}") from None
    collectives = table.get("collectives", {})
    if not isinstance(collectives, dict):
        raise ValueError(f"{path}: 'collectives' must map collective names to lists of entries, "
                         f"got a JSON {type(collectives).__name__}")
    for coll, entries in collectives.items():
        if coll not in COLLECTIVES:
            raise ValueError(f"{path}: unknown collective {coll!r} (known: {', '.join(COLLECTIVES)})")
        if not isinstance(entries, list):
            raise ValueError(f"{path}: {coll} must be a list of entries, got a JSON {type(entries).__name__}")
        for e in entries:
            if not isinstance(e, dict):
                raise ValueError(f"{path}: {coll} entry {e!r} is not an object")
            unknown = [k for k in e if k not in ENTRY_KEYS]
            if unknown:
                raise ValueError(f"{path}: {coll} entry {e} has unknown keys {unknown} "
                                 f"(an entry has {', '.join(ENTRY_KEYS)})")
            if "bytes" not in e or not (e.get("best") or e.get("time_us")):
                raise ValueError(f"{path}: {coll} entry {e} needs 'bytes' and 'best' or 'time_us'")
            if not _number(e["bytes"]) or e["bytes"] < 0:
                raise ValueError(f"{path}: {coll} entry {e}: 'bytes' must be a size in bytes, "
                                 f"got {e['bytes']!r}")
            if e.get("best") is not None and not isinstance(e["best"], str):
                raise ValueError(f"{path}: {coll} entry {e}: 'best' must be an algorithm name, "
                                 f"got {e['best']!r}")
            times = e.get("time_us")
            if times is not None and not (isinstance(times, dict)
                                          and all(_number(v) for v in times.values())):
                raise ValueError(f"{path}: {coll} entry {e}: 'time_us' must map algorithm names "
                                 f"to microseconds, got {times!r}")


def save_table(table: dict[str, Any], path: str | Path) -> None:
    """Write a tuned table (``bench tune`` calls this); entries are sorted by size."""
    table = dict(table)
    table["format"] = TABLE_FORMAT
    for entries in table.get("collectives", {}).values():
        entries.sort(key=lambda e: e["bytes"])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(table, indent=1) + "\n")


def lookup(table: dict[str, Any], collective: str, nbytes: int) -> str | None:
    """The table's algorithm for the size nearest ``nbytes`` (log scale), or None."""
    entries = table.get("collectives", {}).get(collective)
    if not entries:
        return None
    x = math.log2(max(nbytes, 1))
    entry = min(entries, key=lambda e: (abs(math.log2(max(e["bytes"], 1)) - x), -e["bytes"]))
    if entry.get("best"):
        return str(entry["best"])
    times = entry["time_us"]
    return min(times, key=times.get)


@functools.lru_cache(maxsize=64)
def table_for(p: int) -> dict[str, Any] | None:
    """The tuned table ``auto`` uses for ``p`` ranks by default: ``$MPIPAR_TUNE_TABLE``, else
    ``default_table_path(p)``; None where that file does not exist. Read once per process
    (a corrupt table raises ValueError every time it is asked for): call it before the first
    collective to turn a bad table into a clean error there."""
    path = os.environ.get(ENV_TABLE) or default_table_path(p)
    if not Path(path).exists():
        return None
    return load_table(path)


@functools.lru_cache(maxsize=1)
def _default_profile() -> Profile:
    return load_profile(None)


def model_choice(collective: str, nbytes: int, p: int, profile: Any = None) -> str:
    """The algorithm the cost model predicts fastest (``native`` where nothing is costed);
    ``profile``: a Profile, a name or a path (None: the default profile)."""
    if profile is None:
        return _model_choice_default(collective, int(nbytes), p)
    if isinstance(profile, (str, Path)):
        profile = load_profile(profile)
    return _model_choice(collective, nbytes, p, profile)


@functools.lru_cache(maxsize=4096)
def _model_choice_default(collective: str, nbytes: int, p: int) -> str:
    return _model_choice(collective, nbytes, p, _default_profile())


def _model_choice(collective: str, nbytes: int, p: int, prof: Any) -> str:
    candidates = [a for a in cost_model.algorithms_for(collective)
                  if a != "hier" or (prof.ranks_per_node or 1) > 1]
    if not candidates:
        return "native"
    net = cost_model.Net.from_profile(prof)
    return min(candidates, key=lambda a: cost_model.predict(a, collective, p, nbytes, net=net))


def choose(collective: str, nbytes: int, p: int, table: Any = None) -> str:
    """Algorithm name for ``collective`` of ``nbytes`` over ``p`` ranks (see the module doc)."""
    if table is None:
        return _choose_default(collective, int(nbytes), p)
    return _choose(collective, nbytes, p, table)


@functools.lru_cache(maxsize=8192)
def _choose_default(collective: str, nbytes: int, p: int) -> str:
    # auto sits on every collective's path: the answer for the default table (read once per
    # process) depends only on these three, so it is computed once (a lookup costs ~50 us)
    return _choose(collective, nbytes, p, None)


def _choose(collective: str, nbytes: int, p: int, table: Any) -> str:
    if p <= 1:
        return "native"
    if isinstance(table, (str, Path)):
        table = load_table(table)
    if table is None:
        table = table_for(p)
    name = None
    if table is not None and int(table.get("ranks", p)) == p:
        name = lookup(table, collective, nbytes)
    if name is None:
        name = model_choice(collective, int(nbytes), p)
    return name if name in algorithm_names() else "native"
