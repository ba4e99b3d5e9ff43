"""Per-backend kernel choices: the CPU-only tricks in one place, decided at trace time.

    from moshi_jax.nn import backend
    backend.choices().ring_attention      # "prefix" on CPU, "whole" on GPU / TPU

XLA:CPU needs a few layouts and formulations that are pointless (or costly) on accelerators:

- `materialize_transposes` (nn/matmul.py): a transposed operand that moves the contracted axes is written out
  by a gather, because XLA:CPU's matmul kernels run a left operand with the contracted axes outermost at half
  speed. GPU / TPU fold the transpose into the dot for free.
- `ring_attention` (nn/kv_cache.py, one layer's KV ring): "prefix" reads only the ring prefix that can hold
  keys yet (a `lax.switch` over static sizes): a CPU has no spare bandwidth for empty slots. "whole" attends
  over the whole ring with the mask (no conditional; once the ring is full, the steady state, both read the
  same bytes). (XLA:CPU runs either as a dot on float32 copies of the bf16 operands: one layer's K and V ring
  in float32 is the largest temporary of the compiled step, 2/L of the KV state.)
- `ring_write` (nn/kv_cache.py `write`): "update_slices" writes each new slot with an in-place
  `dynamic_update_slice` (a loop over items); XLA:CPU has no bf16 scatter and ran it on a float32 copy of the
  whole ring, converted there and back, every step. "scatter": one scatter (native on GPU / TPU).

With "update_slices" the CPU memory analysis of the compiled engine step went from 3x to about 1 + 2/L times a
session's state per extra session (L layers; tests/engine/test_engine_memory.py); on GPU / TPU the portable
path leaves no ring-sized temporary at all.

Every choice has a portable path ("whole" / "scatter" / no materialisation) that tests compare it to
(tests/nn/test_backend.py). `override(...)` forces a set of choices for code traced inside it (tests,
benchmarks comparing both ways); jitted functions traced before keep what they were traced with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

import jax

ENV_VAR = "MOSHI_JAX_KERNELS"  # "cpu" | "portable": force one set of choices whatever the backend


@dataclasses.dataclass(frozen=True)
class Choices:
    materialize_transposes: bool
    ring_attention: str  # "prefix" | "whole"
    ring_write: str  # "update_slices" | "scatter"
    strided_conv: str  # "polyphase" | "direct"


CPU = Choices(materialize_transposes=True, ring_attention="prefix", ring_write="update_slices",
              strided_conv="polyphase")
PORTABLE = Choices(materialize_transposes=False, ring_attention="whole", ring_write="scatter",
                   strided_conv="direct")
NAMED = {"cpu": CPU, "portable": PORTABLE}

_forced: list[Choices] = []


def choices(platform: str | None = None) -> Choices:
    """The choices for `platform` (default: `jax.default_backend()`), unless forced by `override` or the
    MOSHI_JAX_KERNELS environment variable."""
    if _forced:
        return _forced[-1]
    env = os.environ.get(ENV_VAR)
    if env:
        if env not in NAMED:
            raise ValueError(f"{ENV_VAR}={env!r}: expected one of {sorted(NAMED)}")
        return NAMED[env]
    return CPU if (platform or jax.default_backend()) == "cpu" else PORTABLE


@contextlib.contextmanager
def override(which: str | Choices) -> Iterator[Choices]:
    """Force a set of choices ("cpu", "portable" or a `Choices`) for everything traced inside the block."""
    c = NAMED[which] if isinstance(which, str) else which
    _forced.append(c)
    try:
        yield c
    finally:
        _forced.pop()
