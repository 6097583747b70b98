"""One op of a NumPy autograd engine against PyTorch: its value and the gradients its backward
closure returns (Lab 1's public tests).

An op's result is a node whose ``_parents`` are its inputs and whose ``_backward(grad)`` returns
one gradient per parent. One call of ``_backward`` is all a single op needs, so nothing here
walks a graph: that is the engine's own job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .testing import assert_close, float_tolerance, require, time_limit


def op_inputs(rng: np.random.Generator, shapes: Sequence[tuple[int, ...]],
              domains: Sequence[str] | None = None) -> list[np.ndarray]:
    """float32 inputs: ``normal``, ``positive`` (0.5-2), ``nonzero`` (±0.5-2), ``wide`` (σ = 30),
    ``huge`` (σ = 1000, logits that overflow a naive softmax) or ``ties`` (small integers, so
    that maxima repeat)."""
    inputs = []
    for shape, domain in zip(shapes, domains or ["normal"] * len(shapes)):
        if domain == "positive":
            x = rng.uniform(0.5, 2.0, shape)
        elif domain == "nonzero":
            x = rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
        elif domain in ("wide", "huge"):
            x = rng.standard_normal(shape) * (30.0 if domain == "wide" else 1000.0)
        elif domain == "ties":
            x = rng.integers(0, 3, shape)
        else:
            x = rng.standard_normal(shape)
        inputs.append(np.asarray(x, dtype=np.float32))
    return inputs


def _torch_result(theirs: Callable[..., Any], inputs: list[np.ndarray], seed_grad: Any,
                  dtype: Any) -> tuple[np.ndarray, list[np.ndarray]]:
    import torch

    ts = [torch.tensor(x, dtype=dtype, requires_grad=True) for x in inputs]
    out = theirs(*ts)
    if seed_grad is None:
        return out.detach().numpy(), []
    out.backward(torch.tensor(seed_grad, dtype=dtype))
    return out.detach().numpy(), [t.grad.numpy() if t.grad is not None else np.zeros(t.shape)
                                  for t in ts]


def check_op(Tensor: Any, name: str, ours: Callable[..., Any], theirs: Callable[..., Any],
             shapes: Sequence[tuple[int, ...]], domains: Sequence[str] | None = None,
             seed: int = 0) -> None:
    """``ours(*tensors)`` (one op of the engine) against ``theirs(*torch_tensors)`` on seeded
    inputs: the value, then the gradient each input receives from one ``_backward`` call, both
    compared with PyTorch in float64 within a tolerance derived from PyTorch's float32 error."""
    import torch

    require(Tensor=Tensor)
    rng = np.random.default_rng(seed)
    inputs = op_inputs(rng, shapes, domains)
    exact, _ = _torch_result(theirs, inputs, None, torch.float64)
    seed_grad = rng.standard_normal(exact.shape).astype(np.float32)
    exact, exact_grads = _torch_result(theirs, inputs, seed_grad, torch.float64)
    single, single_grads = _torch_result(theirs, inputs, seed_grad, torch.float32)

    xs = [Tensor(x.copy(), requires_grad=True) for x in inputs]
    with time_limit(30, name):
        out = ours(*xs)
    if out is None or not hasattr(out, "data"):
        raise AssertionError(f"{name}: expected a Tensor, got {out!r} (is the op still `...`?)")
    assert_close(out.data, exact, what=f"{name}: forward value",
                 atol=float_tolerance(exact, single))
    parents = tuple(getattr(out, "_parents", ()) or ())
    backward_fn = getattr(out, "_backward", None)
    if backward_fn is None or not parents:
        raise AssertionError(f"{name}: the result records no parents or no backward function "
                             "(did the op call make_node with its inputs?)")
    with time_limit(30, f"the backward of {name}"):
        parent_grads = backward_fn(seed_grad)
    if parent_grads is None or len(parent_grads) != len(parents):
        got = "None" if parent_grads is None else f"{len(parent_grads)} gradients"
        raise AssertionError(f"{name}: backward_fn returned {got} for {len(parents)} parents")
    grads: dict[int, np.ndarray] = {}
    for parent, grad in zip(parents, parent_grads):
        if grad is None:
            continue
        grad = np.asarray(grad)
        if grad.shape != np.shape(parent.data):
            raise AssertionError(f"{name}: backward_fn returned a gradient of shape {grad.shape} "
                                 f"for a parent of shape {np.shape(parent.data)} (a broadcast "
                                 "gradient not reduced with unbroadcast?)")
        grads[id(parent)] = grad + grads[id(parent)] if id(parent) in grads else grad
    for i, x in enumerate(xs):
        what = f"{name}: gradient of input {i} (shape {inputs[i].shape})"
        if id(x) not in grads:
            raise AssertionError(f"{what}: no gradient reached this input; is it among the "
                                 "node's parents?")
        assert_close(grads[id(x)], exact_grads[i], what=what,
                     atol=float_tolerance(exact_grads[i], single_grads[i]))


def chain_of_scales(make_node: Any, leaf: Any, length: int, factor: float) -> Any:
    """``leaf`` scaled by ``factor`` ``length`` times, one node per step made with the engine's
    own ``make_node``, then summed: a graph deeper than Python's recursion limit."""
    node = leaf
    for _ in range(length):
        node = make_node(node.data * factor, (node,), lambda g: (g * factor,), "scale")
    shape = node.data.shape
    return make_node(np.asarray(node.data.sum(), dtype=np.float32), (node,),
                     lambda g: (np.broadcast_to(g, shape).copy(),), "sum")
