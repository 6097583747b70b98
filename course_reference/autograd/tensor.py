"""A tensor-level reverse-mode automatic differentiation engine on NumPy.

Every operation is written as a forward computation and, right beside it, the closure that
computes its vector-Jacobian product (its "backward"). ``Tensor.backward`` walks the recorded
graph in reverse topological order, iteratively, so a chain of a hundred thousand operations
needs no recursion.

The design follows the tape-free, define-by-run style of PyTorch's autograd
(Paszke et al., *Automatic differentiation in PyTorch*, 2017): the graph is the set of
``Tensor`` objects reachable through ``_parents``, built as the program runs, and freed by the
first ``backward()`` unless ``retain_graph=True``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Union

import numpy as np

DEFAULT_DTYPE = np.float32

_grad_enabled = True


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Run a block without recording the graph (evaluation, optimizer updates)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled() -> bool:
    return _grad_enabled


ArrayLike = Union["Tensor", np.ndarray, float, int, Sequence[Any]]
Backward = Callable[[np.ndarray], Sequence[np.ndarray | None]]


def _to_array(data: Any, dtype: Any = None) -> np.ndarray:
    """Convert ``data`` to an ndarray; floating data defaults to float32, as in PyTorch."""
    if isinstance(data, Tensor):
        data = data.data
    array = np.asarray(data, dtype=dtype)
    if dtype is None and array.dtype.kind == "f" and array.dtype != DEFAULT_DTYPE:
        array = array.astype(DEFAULT_DTYPE)
    return array


def unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``grad`` down to ``shape``: the gradient of NumPy broadcasting.

    Broadcasting copies an operand along new leading axes and along axes of size 1, so each
    copy's gradient must be added back into the one element it came from.
    """
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(
        extra + i for i, size in enumerate(shape) if size == 1 and grad.shape[extra + i] != 1
    )
    summed = grad.sum(axis=axes, keepdims=True) if axes else grad
    return summed.reshape(shape)


def broadcast_shape(op: str, *shapes: tuple[int, ...]) -> tuple[int, ...]:
    """The shape NumPy broadcasting gives, or a ValueError that names the op and the shapes."""
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        listed = " and ".join(str(tuple(s)) for s in shapes)
        raise ValueError(
            f"{op}: shapes {listed} cannot be broadcast together (trailing dimensions must be "
            "equal or 1)"
        ) from None


class Tensor:
    """An n-dimensional array that remembers how it was computed.

    ``data`` is a NumPy array; ``grad`` (an array of the same shape, or None) is filled in by
    ``backward()`` on leaf tensors that require grad, and accumulates across calls.
    """

    __slots__ = ("data", "grad", "requires_grad", "_parents", "_backward", "_op", "_freed",
                 "_retain_grad", "name")
    # Make ``ndarray * Tensor`` dispatch to ``Tensor.__rmul__`` instead of NumPy's broadcasting.
    __array_priority__ = 1000

    def __init__(self, data: ArrayLike, requires_grad: bool = False, dtype: Any = None,
                 name: str | None = None):
        self.data = _to_array(data, dtype)
        if requires_grad and self.data.dtype.kind != "f":
            raise TypeError(
                f"only floating-point tensors can require grad, got dtype {self.data.dtype} "
                f"(shape {self.data.shape}); convert with .astype(np.float32)"
            )
        self.grad: np.ndarray | None = None
        self.requires_grad = requires_grad
        self._parents: tuple[Tensor, ...] = ()
        self._backward: Backward | None = None
        self._op = ""
        self._freed = False
        self._retain_grad = False
        self.name = name

    # -- basic properties ----------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def is_leaf(self) -> bool:
        return not self._parents and not self._freed

    @property
    def op(self) -> str:
        """The name of the operation that produced this tensor ("" for a leaf)."""
        return self._op

    @property
    def parents(self) -> tuple[Tensor, ...]:
        return self._parents

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        op = f", op={self._op}" if self._op else ""
        return f"Tensor({np.array2string(self.data, precision=4, threshold=20)}{grad}{op})"

    def __len__(self) -> int:
        return len(self.data)

    def numpy(self) -> np.ndarray:
        return self.data

    def item(self) -> float:
        return self.data.item()

    def detach(self) -> Tensor:
        return Tensor(self.data, dtype=self.data.dtype)

    def retain_grad(self) -> Tensor:
        """Keep ``.grad`` on this non-leaf tensor after ``backward()`` (for inspection)."""
        self._retain_grad = True
        return self

    def zero_grad(self) -> None:
        self.grad = None

    # -- graph construction ----------------------------------------------------------------
    def _coerce(self, other: ArrayLike, op: str) -> Tensor:
        """Turn the other operand of a binary op into a Tensor of a compatible dtype."""
        if isinstance(other, Tensor):
            if other.dtype != self.dtype and self.dtype.kind == "f" and other.dtype.kind == "f":
                raise TypeError(
                    f"{op}: dtype mismatch, {self.dtype} {self.shape} vs {other.dtype} "
                    f"{other.shape}; convert one side with .astype(...)"
                )
            return other
        dtype = self.dtype if self.dtype.kind == "f" else None
        return Tensor(np.asarray(other, dtype=dtype))

    def astype(self, dtype: Any) -> Tensor:
        source_dtype = self.dtype

        def backward(grad: np.ndarray) -> tuple[np.ndarray]:
            return (grad.astype(source_dtype),)

        return _make(self.data.astype(dtype), (self,), backward, "astype")

    # -- elementwise binary ops ------------------------------------------------------------
    def __add__(self, other: ArrayLike) -> Tensor:
        other = self._coerce(other, "add")
        broadcast_shape("add", self.shape, other.shape)
        a_shape, b_shape = self.shape, other.shape

        def backward(grad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return unbroadcast(grad, a_shape), unbroadcast(grad, b_shape)

        return _make(self.data + other.data, (self, other), backward, "add")

    def __sub__(self, other: ArrayLike) -> Tensor:
        other = self._coerce(other, "sub")
        broadcast_shape("sub", self.shape, other.shape)
        a_shape, b_shape = self.shape, other.shape

        def backward(grad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return unbroadcast(grad, a_shape), unbroadcast(-grad, b_shape)

        return _make(self.data - other.data, (self, other), backward, "sub")

    def __mul__(self, other: ArrayLike) -> Tensor:
        other = self._coerce(other, "mul")
        broadcast_shape("mul", self.shape, other.shape)
        a, b = self.data, other.data

        def backward(grad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return unbroadcast(grad * b, a.shape), unbroadcast(grad * a, b.shape)

        return _make(a * b, (self, other), backward, "mul")

    def __truediv__(self, other: ArrayLike) -> Tensor:
        other = self._coerce(other, "div")
        broadcast_shape("div", self.shape, other.shape)
        a, b = self.data, other.data

        def backward(grad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            grad_a = grad / b
            return unbroadcast(grad_a, a.shape), unbroadcast(-grad_a * a / b, b.shape)

        return _make(a / b, (self, other), backward, "div")

    def __pow__(self, exponent: ArrayLike) -> Tensor:
        if isinstance(exponent, (int, float)):
            a, p = self.data, exponent

            def backward_scalar(grad: np.ndarray) -> tuple[np.ndarray]:
                return (grad * (p * a ** (p - 1)),)

            return _make(a ** p, (self,), backward_scalar, "pow")
        other = self._coerce(exponent, "pow")
        broadcast_shape("pow", self.shape, other.shape)
        a, b = self.data, other.data
        out = a ** b

        def backward(grad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            grad_a = grad * b * a ** (b - 1)
            with np.errstate(divide="ignore", invalid="ignore"):
                grad_b = grad * out * np.log(a)
            return unbroadcast(grad_a, a.shape), unbroadcast(grad_b, b.shape)

        return _make(out, (self, other), backward, "pow")

    def __neg__(self) -> Tensor:
        def backward(grad: np.ndarray) -> tuple[np.ndarray]:
            return (-grad,)

        return _make(-self.data, (self,), backward, "neg")

    def __radd__(self, other: ArrayLike) -> Tensor:
        return self._coerce(other, "add") + self

    def __rsub__(self, other: ArrayLike) -> Tensor:
        return self._coerce(other, "sub") - self

    def __rmul__(self, other: ArrayLike) -> Tensor:
        return self._coerce(other, "mul") * self

    def __rtruediv__(self, other: ArrayLike) -> Tensor:
        return self._coerce(other, "div") / self

    def __rpow__(self, other: ArrayLike) -> Tensor:
        return self._coerce(other, "pow") ** self

    # -- matrix product --------------------------------------------------------------------
    def __matmul__(self, other: ArrayLike) -> Tensor:
        other = self._coerce(other, "matmul")
        a, b = self.data, other.data
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError(f"matmul: both operands need at least 1 dimension, got shapes "
                             f"{a.shape} @ {b.shape}")
        if a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
            inner_b = b.shape[-2 if b.ndim > 1 else 0]
            raise ValueError(f"matmul: inner dimensions differ, {a.shape} @ {b.shape} "
                             f"({a.shape[-1]} != {inner_b})")
        if a.ndim > 2 or b.ndim > 2:
            broadcast_shape("matmul (batch dimensions)", a.shape[:-2], b.shape[:-2])

        def backward(grad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            # Promote 1-D operands to matrices so one rule covers every case.
            a2 = a[None, :] if a.ndim == 1 else a
            b2 = b[:, None] if b.ndim == 1 else b
            g = grad
            if a.ndim == 1:
                g = np.expand_dims(g, -2)
            if b.ndim == 1:
                g = np.expand_dims(g, -1)
            grad_a = g @ np.swapaxes(b2, -1, -2)
            grad_b = np.swapaxes(a2, -1, -2) @ g
            if a.ndim == 1:
                grad_a = grad_a.squeeze(-2)
            if b.ndim == 1:
                grad_b = grad_b.squeeze(-1)
            return unbroadcast(grad_a, a.shape), unbroadcast(grad_b, b.shape)

        return _make(a @ b, (self, other), backward, "matmul")

    def __rmatmul__(self, other: ArrayLike) -> Tensor:
        return self._coerce(other, "matmul") @ self

    # -- reductions ------------------------------------------------------------------------
    def sum(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Tensor:
        shape = self.shape
        axes = _normalize_axes("sum", axis, self.ndim)

        def backward(grad: np.ndarray) -> tuple[np.ndarray]:
            if not keepdims:
                grad = np.expand_dims(grad, axes)
            return (np.broadcast_to(grad, shape),)

        return _make(self.data.sum(axis=axes, keepdims=keepdims), (self,), backward, "sum")

    def mean(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Tensor:
        axes = _normalize_axes("mean", axis, self.ndim)
        count = int(np.prod([self.shape[i] for i in axes])) if axes else 1
        shape = self.shape

        def backward(grad: np.ndarray) -> tuple[np.ndarray]:
            if not keepdims:
                grad = np.expand_dims(grad, axes)
            return (np.broadcast_to(grad / count, shape),)

        out = self.data.mean(axis=axes, keepdims=keepdims)
        return _make(np.asarray(out, dtype=self.dtype), (self,), backward, "mean")

    def max(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Tensor:
        """Maximum over ``axis``; ties share the gradient equally (as ``torch.amax`` does)."""
        if self.size == 0:
            raise ValueError(f"max: cannot reduce an empty tensor of shape {self.shape}")
        axes = _normalize_axes("max", axis, self.ndim)
        x = self.data
        out_keep = x.max(axis=axes, keepdims=True)

        def backward(grad: np.ndarray) -> tuple[np.ndarray]:
            if not keepdims:
                grad = np.expand_dims(grad, axes)
            mask = x == out_keep
            return (mask * (grad / mask.sum(axis=axes, keepdims=True)),)

        out = out_keep if keepdims else out_keep.squeeze(axis=axes)
        return _make(out, (self,), backward, "max")

    # -- shape ops -------------------------------------------------------------------------
    def reshape(self, *shape: int | tuple[int, ...]) -> Tensor:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        source = self.shape
        try:
            out = self.data.reshape(shape)
        except ValueError:
            raise ValueError(f"reshape: cannot reshape {source} ({self.size} elements) into "
                             f"{tuple(shape)}") from None

        def backward(grad: np.ndarray) -> tuple[np.ndarray]:
            return (grad.reshape(source),)

        return _make(out, (self,), backward, "reshape")

    def transpose(self, *axes: int) -> Tensor:
        """Permute axes (all reversed by default, like ``ndarray.transpose``)."""
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        perm = tuple(range(self.ndim))[::-1] if not axes else tuple(a % self.ndim for a in axes)
        if sorted(perm) != list(range(self.ndim)):
            raise ValueError(f"transpose: {axes} is not a permutation of the axes of a tensor of "
                             f"shape {self.shape}")
        inverse = tuple(np.argsort(perm))

        def backward(grad: np.ndarray) -> tuple[np.ndarray]:
            return (grad.transpose(inverse),)

        return _make(self.data.transpose(perm), (self,), backward, "transpose")

    @property
    def T(self) -> Tensor:  # noqa: N802 - the NumPy name
        return self.transpose()

    def __getitem__(self, index: Any) -> Tensor:
        if isinstance(index, Tensor):
            index = index.data
        shape, dtype = self.shape, self.dtype
        try:
            out = self.data[index]
        except IndexError as error:
            raise IndexError(f"getitem: {error} (tensor of shape {shape})") from None
        advanced = _uses_advanced_indexing(index)

        def backward(grad: np.ndarray) -> tuple[np.ndarray]:
            full = np.zeros(shape, dtype=dtype)
            if advanced:
                np.add.at(full, index, grad)  # repeated indices must add up
            else:
                full[index] = grad
            return (full,)

        return _make(np.array(out, copy=advanced or np.ndim(out) == 0), (self,), backward,
                     "getitem")

    # -- elementwise unary ops -------------------------------------------------------------
    def exp(self) -> Tensor:
        out = np.exp(self.data)

        def backward(grad: np.ndarray) -> tuple[np.ndarray]:
            return (grad * out,)

        return _make(out, (self,), backward, "exp")

    def log(self) -> Tensor:
        x = self.data

        def backward(grad: np.ndarray) -> tuple[np.ndarray]:
            return (grad / x,)

        return _make(np.log(x), (self,), backward, "log")

    def relu(self) -> Tensor:
        x = self.data

        def backward(grad: np.ndarray) -> tuple[np.ndarray]:
            return (np.where(x > 0, grad, 0).astype(grad.dtype, copy=False),)

        return _make(np.maximum(x, 0), (self,), backward, "relu")

    def tanh(self) -> Tensor:
        out = np.tanh(self.data)

        def backward(grad: np.ndarray) -> tuple[np.ndarray]:
            return (grad * (1 - out * out),)

        return _make(out, (self,), backward, "tanh")

    def sigmoid(self) -> Tensor:
        # 0.5 * (1 + tanh(x / 2)) never overflows, unlike 1 / (1 + exp(-x)).
        out = (0.5 * (1 + np.tanh(0.5 * self.data))).astype(self.dtype, copy=False)

        def backward(grad: np.ndarray) -> tuple[np.ndarray]:
            return (grad * out * (1 - out),)

        return _make(out, (self,), backward, "sigmoid")

    # -- reverse mode ----------------------------------------------------------------------
    def backward(self, grad: ArrayLike | None = None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf that requires grad."""
        backward(self, grad, retain_graph=retain_graph)


def _normalize_axes(op: str, axis: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    for a in axes:
        if not -ndim <= a < max(ndim, 1):
            raise ValueError(f"{op}: axis {a} is out of range for a tensor with {ndim} dimensions")
    return tuple(sorted(a % ndim for a in axes)) if ndim else ()


def _uses_advanced_indexing(index: Any) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, (list, np.ndarray)) for p in parts)


def _make(data: np.ndarray, parents: tuple[Tensor, ...], backward_fn: Backward,
          op: str) -> Tensor:
    """Wrap an op's result; record the graph edge only when some input needs a gradient."""
    out = Tensor.__new__(Tensor)
    out.data = data
    out.grad = None
    out.name = None
    out._freed = False
    out._retain_grad = False
    out._op = op
    if _grad_enabled and any(p.requires_grad for p in parents):
        out.requires_grad = True
        out._parents = parents
        out._backward = backward_fn
    else:
        out.requires_grad = False
        out._parents = ()
        out._backward = None
    return out


def topological_order(root: Tensor) -> list[Tensor]:
    """Every tensor that ``root`` depends on and that requires grad, inputs before outputs.

    An explicit stack replaces recursion, so depth is bounded by memory, not by Python's
    recursion limit. A node is emitted only after all of its parents (post-order DFS).
    """
    order: list[Tensor] = []
    visited: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(root, False)]
    while stack:
        node, parents_done = stack.pop()
        if parents_done:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        for parent in node._parents:
            if parent.requires_grad and id(parent) not in visited:
                stack.append((parent, False))
    return order


def backward(root: Tensor, grad: ArrayLike | None = None, retain_graph: bool = False) -> None:
    """Reverse-mode differentiation of ``root`` with respect to every leaf it depends on."""
    if not root.requires_grad:
        raise RuntimeError(
            f"backward: this tensor (shape {root.shape}) does not require grad; none of the "
            "tensors it was computed from has requires_grad=True (or it was computed under "
            "no_grad())"
        )
    if grad is None:
        if root.size != 1:
            raise RuntimeError(
                f"backward: a gradient can be created implicitly only for a scalar output, but "
                f"this tensor has shape {root.shape}; pass backward(grad) with a gradient of "
                "that shape"
            )
        seed = np.ones_like(root.data)
    else:
        seed = _to_array(grad, dtype=root.dtype)
        if seed.shape != root.shape:
            raise ValueError(f"backward: gradient of shape {seed.shape} given for a tensor of "
                             f"shape {root.shape}")

    order = topological_order(root)
    grads: dict[int, np.ndarray] = {id(root): seed}
    for node in reversed(order):
        g = grads.pop(id(node), None)
        if g is None:
            continue
        if node._freed:
            raise RuntimeError(
                f"backward: trying to backward through the graph a second time (at a "
                f"'{node._op}' of shape {node.shape}); its saved values were freed by the first "
                "backward(). Call backward(retain_graph=True) the first time to keep them."
            )
        if not node._parents or node._retain_grad:
            # A copy: a gradient array may be shared by several inputs (add passes it through).
            node.grad = np.array(g, copy=True) if node.grad is None else node.grad + g
        if not node._parents:
            continue
        parent_grads = node._backward(g)
        for parent, parent_grad in zip(node._parents, parent_grads):
            if parent_grad is None or not parent.requires_grad:
                continue
            if parent_grad.shape != parent.shape:
                raise RuntimeError(
                    f"backward of {node._op}: produced a gradient of shape {parent_grad.shape} "
                    f"for an input of shape {parent.shape}"
                )
            key = id(parent)
            previous = grads.get(key)
            grads[key] = parent_grad if previous is None else previous + parent_grad
        if not retain_graph:
            node._backward = None
            node._parents = ()
            node._freed = True
