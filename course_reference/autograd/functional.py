"""Numerically stable softmax, log-softmax and cross-entropy, each one op with its own backward.

Writing them as single ops (rather than composing exp, sum and log) is both the stable choice,
the maximum is subtracted before ``exp``, and the fast one: one node in the graph instead of six.
"""

from __future__ import annotations

import numpy as np

from .tensor import Tensor, _make, _normalize_axes


def _log_softmax_array(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """log(softmax(x)) along ``axis``, computed as ``x - max - log(sum(exp(x - max)))``."""
    (axis,) = _normalize_axes("log_softmax", axis, x.ndim)
    out = _log_softmax_array(x.data, axis)

    def backward(grad: np.ndarray) -> tuple[np.ndarray]:
        return (grad - np.exp(out) * grad.sum(axis=axis, keepdims=True),)

    return _make(out, (x,), backward, "log_softmax")


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    (axis,) = _normalize_axes("softmax", axis, x.ndim)
    out = np.exp(_log_softmax_array(x.data, axis))

    def backward(grad: np.ndarray) -> tuple[np.ndarray]:
        return (out * (grad - (grad * out).sum(axis=axis, keepdims=True)),)

    return _make(out, (x,), backward, "softmax")


def cross_entropy(logits: Tensor, targets: Tensor | np.ndarray) -> Tensor:
    """Mean negative log-likelihood of integer class ``targets`` under ``softmax(logits)``.

    ``logits`` has shape (N, C) and ``targets`` shape (N,) with values in [0, C).
    """
    labels = np.asarray(targets.data if isinstance(targets, Tensor) else targets)
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy: logits must have shape (N, C), got {logits.shape}")
    n, c = logits.shape
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise ValueError(f"cross_entropy: targets must be integers of shape ({n},), got "
                         f"{labels.dtype} {labels.shape} for logits {logits.shape}")
    if n and (labels.min() < 0 or labels.max() >= c):
        bad = labels.min() if labels.min() < 0 else labels.max()
        raise IndexError(f"cross_entropy: target {bad} is out of range for {c} classes")
    log_probs = _log_softmax_array(logits.data, 1)
    rows = np.arange(n)
    loss = -log_probs[rows, labels].mean()

    def backward(grad: np.ndarray) -> tuple[np.ndarray]:
        d = np.exp(log_probs)
        d[rows, labels] -= 1
        return (d * (grad / n),)

    return _make(np.asarray(loss, dtype=logits.dtype), (logits,), backward, "cross_entropy")
