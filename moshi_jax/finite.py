"""Finite-value checks for weights and outputs: NaN / inf never pass silently, and the error names the tensor.

    check_finite(params, "Mimi weights from tokenizer.safetensors")   # pytree or {name: array}
    check_array(wav, "decoded audio")                                # one array

Used when weights are loaded (Mimi, LM), before they are exported, and on computed outputs before they
are written.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


class NonFiniteError(ValueError):
    """An array holds NaN or inf values (the message names it and counts them)."""


def path_name(path) -> str:
    """A jax tree path as 'a/b/0' (dict keys, attribute names, sequence indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _named_leaves(tree: Any) -> Iterable[tuple[str, Any]]:
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return ((path_name(p), v) for p, v in leaves)


def count_nonfinite(x: Any) -> int:
    """Number of NaN / inf entries of a float array (0 for integer arrays)."""
    a = np.asarray(x)
    if a.dtype.kind in "biu":
        return 0
    try:
        finite = np.isfinite(a)  # ml_dtypes floats (bfloat16, float8) register isfinite too
    except TypeError:
        finite = np.isfinite(a.astype(np.float32))
    return int(a.size - np.count_nonzero(finite))


def check_array(x: Any, what: str) -> None:
    """Raise NonFiniteError when `x` has a NaN or inf entry."""
    n = count_nonfinite(x)
    if n:
        size = int(np.asarray(x).size)
        raise NonFiniteError(f"{what}: {n} of {size} values are NaN or inf")


def check_finite(tree: Any, what: str) -> None:
    """Raise NonFiniteError naming every (up to 5) tensor of `tree` (a pytree, or an iterable of
    (name, array) pairs) that has NaN or inf values."""
    pairs = tree if isinstance(tree, list | tuple) and tree and isinstance(tree[0], tuple) else _named_leaves(tree)
    bad = []
    for name, value in pairs:
        n = count_nonfinite(value)
        if n:
            bad.append(f"{name} ({n} of {int(np.asarray(value).size)} values)")
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteError(f"{what}: non-finite (NaN/inf) values in {', '.join(bad[:5])}{more}")
