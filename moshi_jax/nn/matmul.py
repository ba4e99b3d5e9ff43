"""Two-operand einsum with float32 accumulation for low-precision operands, forward and backward.

    y = einsum("btd,df->btf", x, w)      # x, w bfloat16 -> y bfloat16 (accumulated in float32)

Float32 operands: exactly `jnp.einsum`. bfloat16 / float16 operands: the product is accumulated in float32
and rounded once to the operand dtype, which is what a PyTorch bf16 matmul does. The point is the backward
pass: JAX's own transpose of a `preferred_element_type=float32` dot feeds the two gradient matmuls a float32
cotangent, i.e. mixed float32 x bf16 dots, which XLA:CPU runs at float32 speed (and a plain bf16 -> bf16 dot
is slower still there). The custom VJP keeps both gradient matmuls bf16 x bf16 -> float32, about twice the
float32 matmul rate on a CPU with AVX512-BF16 and the native path on TPU / GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moshi_jax.nn import backend

Array = jax.Array


def einsum(spec: str, x: Array, w: Array, out_dtype=None) -> Array:
    """`jnp.einsum(spec, x, w)`; for one low-precision dtype, float32 accumulation in forward and backward.
    `out_dtype` (e.g. float32 for logits): the result's dtype, instead of the operands' (saves a rounding)."""
    if x.dtype != w.dtype or jnp.dtype(x.dtype).itemsize > 2:
        y = jnp.einsum(spec, x, w)
    elif (grads := _grad_specs(spec)) is None:  # ellipsis or an index summed on its own: plain einsum/autodiff
        y = jnp.einsum(spec, x, w)
    else:
        return _lowp_einsum(spec, grads, jnp.dtype(out_dtype or x.dtype), x, w)
    return y if out_dtype is None else y.astype(out_dtype)


@functools.cache
def _grad_specs(spec: str) -> tuple[str, str] | None:
    """"ab,bc->ac" -> ("ac,bc->ab", "ab,ac->bc"): the einsums giving dx and dw from (g, w) and (x, g).

    Valid when every index of an operand appears in the other operand or in the output (einsum is bilinear,
    so d/dx is the einsum of g with w onto x's indices); None otherwise."""
    if "..." in spec or "->" not in spec:
        return None
    lhs, out = spec.replace(" ", "").split("->")
    parts = lhs.split(",")
    if len(parts) != 2:
        return None
    a, b = parts
    if any(len(set(s)) != len(s) for s in (a, b, out)):
        return None
    if not set(a) <= set(b) | set(out) or not set(b) <= set(a) | set(out):
        return None
    return f"{out},{b}->{a}", f"{a},{out}->{b}"


def _dot_f32(spec: str, a: Array, b: Array) -> Array:
    """einsum with float32 accumulation and result, as XLA:CPU's matmul kernels want it: batch indices (in
    both operands and the output) in front (there is no low-precision -> float32 kernel for a batched dot
    with batch dims elsewhere), and `a` laid out [batch, free, contracted]."""
    lhs, out = spec.split("->")
    sa, sb = lhs.split(",")
    batch = "".join(c for c in sa if c in sb and c in out)
    contract = "".join(c for c in sa if c in sb and c not in out)
    ra = batch + "".join(c for c in sa if c not in batch + contract) + contract
    rb = batch + "".join(c for c in sb if c not in batch)
    ro = batch + "".join(c for c in out if c not in batch)
    if (ra, rb, ro) == (sa, sb, out) or (not batch and ro == out and ra == sa):
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    if ra != sa:
        a = _transposed(a, [sa.index(c) for c in ra], contract_moved=not sa.endswith(contract))
    if rb != sb:
        b = jnp.transpose(b, [sb.index(c) for c in rb])
    y = jnp.einsum(f"{ra},{rb}->{ro}", a, b, preferred_element_type=jnp.float32)
    return y if ro == out else jnp.transpose(y, [ro.index(c) for c in out])


def _transposed(a: Array, perm: list[int], contract_moved: bool) -> Array:
    """`jnp.transpose(a, perm)`, materialised on CPU (`backend.choices().materialize_transposes`) when it
    moves the contracted axes: XLA:CPU would
    otherwise fold the transpose into the dot's operand layout, and its kernels run a left operand with the
    contracted axes outermost (a weight gradient: tokens contracted) at half speed. A gather with indices XLA
    cannot see through writes the transposed copy (cheap: activations, not weights)."""
    a = jnp.transpose(a, perm)
    if not contract_moved or not backend.choices().materialize_transposes:
        return a
    rows = jax.lax.optimization_barrier(jnp.arange(a.shape[0], dtype=jnp.int32))
    return jnp.take(a, rows, axis=0, mode="clip")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _lowp_einsum(spec: str, grads: tuple[str, str], out_dtype, x: Array, w: Array) -> Array:
    return _dot_f32(spec, x, w).astype(out_dtype)


def _lowp_fwd(spec, grads, out_dtype, x, w):
    return _lowp_einsum(spec, grads, out_dtype, x, w), (x, w)


def _lowp_bwd(spec, grads, out_dtype, res, g):
    x, w = res
    g = g.astype(x.dtype)
    dx = _dot_f32(grads[0], g, w).astype(x.dtype)
    dw = _dot_f32(grads[1], x, g).astype(w.dtype)
    return dx, dw


_lowp_einsum.defvjp(_lowp_fwd, _lowp_bwd)
