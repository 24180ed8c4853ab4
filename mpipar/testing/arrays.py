"""What the layer tests share: walking a cache for the arrays it holds."""

from __future__ import annotations

from typing import Any, Iterator


def arrays_in(obj: Any) -> Iterator[Any]:
    """Every array (anything with a shape and a dtype) in ``obj``, through nested lists and
    tuples (a layer's cache), in order."""
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from arrays_in(o)
    elif hasattr(obj, "shape") and hasattr(obj, "dtype"):
        yield obj
