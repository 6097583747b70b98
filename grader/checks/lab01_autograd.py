"""Checks for Lab 1 (autograd engine), called by the lab's public and hidden tests.

Every check runs the student's object and the reference on the same seeded inputs and compares
both with PyTorch: the expected value is torch in float64, and the tolerance is derived from how
far torch and the reference, in float32, land from it (``float_tolerance``).

Op checks (q2, q4) differentiate the student's graph with a traversal of their own, through the
``_parents`` and ``_backward`` fields of the lab's scaffold, so that a bug in the student's
``backward()`` (q3) does not cost points on the ops, and q3 is checked on hand-made nodes so that
a bug in an op does not cost points on the engine.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from course_reference import autograd as ref
from course_runtime.opcheck import chain_of_scales
from course_runtime.testing import assert_close, describe, float_tolerance, require, time_limit
from course_runtime.timing import measure_interleaved, pinned_threads
from course_runtime.training import step_matches_torch, torch_losses, train_step_runner
from grader.checks import check_ratio, forbid, on_one_cpu, run_there

# The submission runs in a process of its own, these checks in the grader's (grader/isolated.py):
# every function below also takes the proxies of a submission's objects.
ISOLATED = True

FORBIDDEN = [
    "torch.autograd.backward", "torch.autograd.grad", "torch.Tensor.backward",
    "course_reference.autograd.tensor._make", "course_reference.autograd.tensor.backward",
    "course_reference.autograd.tensor.topological_order",
    "course_reference.autograd.functional._make",
    "course_reference.autograd.optim.Adam.step", "course_reference.autograd.optim.SGD.step",
]
REASON = ("Lab 1 asks you to write reverse mode yourself, on NumPy; torch.autograd and "
          "course_reference.autograd are what your engine is compared against, not parts of it")


def engine_guard(namespace: dict[str, Any] | None = None) -> Any:
    """Block torch.autograd and the reference engine while student code runs."""
    return forbid(FORBIDDEN, REASON, namespace)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

def _values(rng: np.random.Generator, shape: tuple[int, ...], domain: str) -> np.ndarray:
    if domain == "positive":
        x = rng.uniform(0.5, 2.0, shape)
    elif domain == "nonzero":
        x = rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
    elif domain == "wide":
        x = rng.standard_normal(shape) * 30.0
    elif domain == "ties":  # a few small integers: maxima are shared, the tie rule matters
        x = rng.integers(-1, 2, shape)
    else:
        x = rng.standard_normal(shape)
    return np.asarray(x, dtype=np.float32)


def broadcast_pair(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Two shapes that broadcast: a random result shape, with dimensions dropped from the front
    of one operand and set to 1 in either (the corners: scalars, size-1 axes on both sides)."""
    ndim = int(rng.integers(0, 4))
    result = tuple(int(d) for d in rng.integers(1, 5, ndim))

    def operand() -> tuple[int, ...]:
        drop = int(rng.integers(0, ndim + 1))
        dims = list(result[drop:])
        for i in range(len(dims)):
            if rng.random() < 0.35:
                dims[i] = 1
        return tuple(dims)

    return operand(), operand()


@dataclass
class OpCase:
    """One op applied to some inputs, written for our Tensor API and for torch's."""

    name: str
    shapes: Sequence[tuple[int, ...]]
    ours: Callable[..., Any]
    torch_fn: Callable[..., Any]
    domains: Sequence[str] = field(default_factory=lambda: ["normal"])
    # The reference engine's version, where it is not the same code as ``ours`` (free functions).
    reference: Callable[..., Any] | None = None
    scale: float = 1.0

    def inputs(self, rng: np.random.Generator) -> list[np.ndarray]:
        domains = list(self.domains) * len(self.shapes)
        return [_values(rng, s, d) * np.float32(self.scale) for s, d in zip(self.shapes, domains)]


def _binary(name: str, a: tuple[int, ...], b: tuple[int, ...], op: Callable[[Any, Any], Any],
            domains: Sequence[str] = ("normal", "normal")) -> OpCase:
    return OpCase(f"{name} {a} and {b}", [a, b], op, op, domains)


def op_cases(group: str, rng: np.random.Generator | None = None) -> list[OpCase]:
    """Fixed cases of one group (public), or random shapes for it when ``rng`` is given (hidden)."""
    if group == "elementwise":
        pairs = ([((3, 1, 4), (5, 1)), ((2, 3), (3,)), ((4, 1), (1, 4)), ((), (2,))] if rng is None
                 else [broadcast_pair(rng) for _ in range(4)])
        cases = []
        for (a, b), (name, op, domains) in zip(pairs * 2, [
                ("add", lambda x, y: x + y, ("normal", "normal")),
                ("sub", lambda x, y: x - y, ("normal", "normal")),
                ("mul", lambda x, y: x * y, ("normal", "normal")),
                ("div", lambda x, y: x / y, ("normal", "nonzero")),
                ("mul then add", lambda x, y: x * y + x, ("normal", "normal")),
                ("pow", lambda x, y: x ** 3 - (y ** 0.5) * 2.0, ("normal", "positive")),
                ("neg and scalars", lambda x, y: 2.0 - (-x) * 3.0 + y / 4.0, ("normal", "normal")),
                ("reused input", lambda x, y: x * x / (y * y + 1.0), ("normal", "normal"))]):
            cases.append(_binary(name, a, b, op, domains))
        return cases
    if group == "unary":
        shape = (3, 4) if rng is None else tuple(int(d) for d in rng.integers(1, 6, 2))
        return [
            OpCase(f"exp {shape}", [shape], lambda x: x.exp(), torch.exp),
            OpCase(f"log {shape}", [shape], lambda x: x.log(), torch.log, ["positive"]),
            OpCase(f"relu {shape}", [shape], lambda x: x.relu(), torch.relu),
            OpCase(f"tanh {shape}", [shape], lambda x: x.tanh(), torch.tanh, ["wide"]),
            OpCase(f"sigmoid {shape}", [shape], lambda x: x.sigmoid(), torch.sigmoid, ["wide"]),
        ] + ([] if rng is None else [
            # Exact zeros: torch's relu passes no gradient at 0.
            OpCase(f"relu {shape} with zeros", [shape], lambda x: x.relu(), torch.relu,
                   ["ties"]),
        ])
    if group == "reductions":
        shape = (2, 3, 4) if rng is None else tuple(int(d) for d in rng.integers(1, 5, 3))
        axis = 1 if rng is None else int(rng.integers(0, 3))
        return [
            OpCase(f"sum {shape}", [shape], lambda x: x.sum(), lambda x: x.sum()),
            OpCase(f"sum {shape} axis={axis} keepdims", [shape],
                   lambda x: x.sum(axis=axis, keepdims=True),
                   lambda x: x.sum(dim=axis, keepdim=True)),
            OpCase(f"sum {shape} axis=(0, 2)", [shape], lambda x: x.sum(axis=(0, 2)),
                   lambda x: x.sum(dim=(0, 2))),
            OpCase(f"mean {shape} axis={axis}", [shape], lambda x: x.mean(axis=axis),
                   lambda x: x.mean(dim=axis)),
            OpCase(f"mean {shape}", [shape], lambda x: x.mean(), lambda x: x.mean()),
            OpCase(f"max {shape} axis={axis}", [shape], lambda x: x.max(axis=axis),
                   lambda x: x.amax(dim=axis)),
            OpCase(f"max {shape} axis=-1 keepdims", [shape],
                   lambda x: x.max(axis=-1, keepdims=True),
                   lambda x: x.amax(dim=-1, keepdim=True)),
        ] + ([] if rng is None else [
            # Ties: torch gives each of k tied maxima 1/k of the gradient.
            OpCase(f"max {shape} axis={axis} with ties", [shape], lambda x: x.max(axis=axis),
                   lambda x: x.amax(dim=axis), ["ties"]),
            OpCase(f"max {shape} with ties", [shape], lambda x: x.max() * 1.0,
                   lambda x: x.amax() * 1.0, ["ties"]),
            # A 0-d tensor: no axis to reduce, one element to count.
            OpCase("mean of a 0-d tensor", [()], lambda x: x.mean() * 3.0,
                   lambda x: x.mean() * 3.0),
            OpCase("sum of a 0-d tensor", [()], lambda x: x.sum() * 3.0, lambda x: x.sum() * 3.0),
        ])
    if group == "matmul":
        if rng is None:
            m, k, n, b = 4, 3, 5, 2
        else:
            m, k, n, b = (int(v) for v in rng.integers(1, 7, 4))
        return [
            _binary("matmul", (m, k), (k, n), lambda x, y: x @ y),
            _binary("batched matmul", (b, m, k), (b, k, n), lambda x, y: x @ y),
            _binary("batched matmul, broadcast", (b, m, k), (k, n), lambda x, y: x @ y),
            _binary("matmul in a chain", (m, k), (k, m), lambda x, y: (x @ y) @ x),
        ]
    if group == "shape":
        r, c = (3, 4) if rng is None else (int(v) for v in rng.integers(2, 6, 2))
        return [
            OpCase(f"reshape ({r}, {c}) -> ({c}, {r})", [(r, c)], lambda x: x.reshape(c, r) * 1.0,
                   lambda x: x.reshape(c, r) * 1.0),
            OpCase(f"reshape ({r}, {c}) -> (-1,)", [(r, c)], lambda x: x.reshape(-1),
                   lambda x: x.reshape(-1)),
            OpCase(f"transpose ({r}, {c}, 2)", [(r, c, 2)], lambda x: x.transpose(2, 0, 1),
                   lambda x: x.permute(2, 0, 1)),
            OpCase(f".T of ({r}, {c})", [(r, c)], lambda x: x.T, lambda x: x.T),
            OpCase(f"slice ({r}, {c})[1:, ::2]", [(r, c)], lambda x: x[1:, ::2],
                   lambda x: x[1:, ::2]),
            OpCase(f"integer index ({r}, {c})[1]", [(r, c)], lambda x: x[1], lambda x: x[1]),
            OpCase(f"repeated rows ({r}, {c})[[0, 1, 0]]", [(r, c)], lambda x: x[[0, 1, 0]],
                   lambda x: x[[0, 1, 0]]),
        ]
    raise ValueError(f"unknown op group {group!r}")


# --------------------------------------------------------------------------------------------
# Graph traversal of the student's nodes (independent of their backward())
# --------------------------------------------------------------------------------------------

def _parents_of(node: Any) -> tuple[Any, ...]:
    return tuple(getattr(node, "_parents", ()) or ())


def vector_jacobian(out: Any, seed: np.ndarray, inputs: Sequence[Any]) -> list[np.ndarray | None]:
    """d(sum(out * seed))/d(input) for each input, walking ``_parents``/``_backward`` ourselves."""
    order, seen, stack = [], set(), [(out, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
        elif id(node) not in seen:
            seen.add(id(node))
            stack.append((node, True))
            stack.extend((p, False) for p in _parents_of(node) if id(p) not in seen)
    grads: dict[int, np.ndarray] = {id(out): seed}
    for node in reversed(order):
        g = grads.get(id(node))
        parents = _parents_of(node)
        if g is None or not parents:
            continue
        op = getattr(node, "_op", "?") or "?"
        if getattr(node, "_backward", None) is None:
            raise AssertionError(f"the '{op}' node has parents but no _backward function")
        parent_grads = node._backward(g)
        if parent_grads is None or len(parent_grads) != len(parents):
            got = "None" if parent_grads is None else f"{len(parent_grads)} gradients"
            raise AssertionError(f"backward of '{op}' returned {got} for {len(parents)} inputs")
        for parent, pg in zip(parents, parent_grads):
            if pg is None:
                continue
            pg = np.asarray(pg)
            if pg.shape != np.shape(parent.data):
                raise AssertionError(
                    f"backward of '{op}' returned a gradient of shape {pg.shape} for an input of "
                    f"shape {np.shape(parent.data)} (a broadcast gradient not reduced?)")
            grads[id(parent)] = pg if id(parent) not in grads else grads[id(parent)] + pg
    return [grads.get(id(x)) for x in inputs]


# --------------------------------------------------------------------------------------------
# q1: broadcasting
# --------------------------------------------------------------------------------------------

def check_broadcast_shape(broadcast_shape: Any, seed: int, cases: int) -> None:
    require(broadcast_shape=broadcast_shape)
    rng = np.random.default_rng(seed)
    for _ in range(cases):
        a, b = broadcast_pair(rng)
        with time_limit(10, f"broadcast_shape('add', {a}, {b})"):
            got = broadcast_shape("add", a, b)
        expected = tuple(np.broadcast_shapes(a, b))
        if got is None or tuple(got) != expected:
            raise AssertionError(
                f"broadcast_shape('add', {a}, {b}): expected {expected}, got {got}")
    for a, b in [((2, 3), (4,)), ((3, 1, 5), (2, 5, 5)), ((2,), (3,))]:
        try:
            with time_limit(10, f"broadcast_shape('mul', {a}, {b})"):
                broadcast_shape("mul", a, b)
        except ValueError as error:
            message = str(error)
            if "mul" not in message or str(a) not in message or str(b) not in message:
                raise AssertionError(
                    f"broadcast_shape('mul', {a}, {b}) raised ValueError({message!r}); the "
                    f"message should name the op ('mul') and both shapes {a} and {b}") from None
        else:
            raise AssertionError(f"broadcast_shape('mul', {a}, {b}) should raise ValueError: "
                                 "these shapes cannot be broadcast together")


def check_unbroadcast(unbroadcast: Any, seed: int, cases: int) -> None:
    require(unbroadcast=unbroadcast)
    rng = np.random.default_rng(seed)
    for _ in range(cases):
        a, b = broadcast_pair(rng)
        out_shape = tuple(np.broadcast_shapes(a, b))
        grad = _values(rng, out_shape, "normal")
        for shape in (a, b):
            expected = torch.from_numpy(grad.astype(np.float64)).sum_to_size(shape).numpy()
            with time_limit(10, f"unbroadcast(grad of shape {out_shape}, {shape})"):
                got = unbroadcast(grad, shape)
            assert_close(got, expected, what=f"unbroadcast(grad of shape {out_shape}, {shape})",
                         atol=float_tolerance(expected, ref.unbroadcast(grad, shape)))
    # An empty batch: a size-1 axis broadcast to size 0 sums to zeros of size 1.
    for out_shape, shape in [((0, 3), (1, 3)), ((2, 0), (2, 1)), ((0, 2), (2,))]:
        grad = np.zeros(out_shape, dtype=np.float32)
        expected = np.zeros(shape, dtype=np.float32)
        with time_limit(10, f"unbroadcast(grad of shape {out_shape}, {shape})"):
            got = unbroadcast(grad, shape)
        assert_close(got, expected, what=f"unbroadcast(grad of shape {out_shape}, {shape}) "
                     "(an empty batch)", atol=0.0)


# --------------------------------------------------------------------------------------------
# q2 and q4: ops, forward and backward
# --------------------------------------------------------------------------------------------

def check_structure(Tensor: Any) -> None:
    """The student's Tensor is their own class, holding NumPy arrays."""
    require(Tensor=Tensor)
    if isinstance(Tensor, type) and (issubclass(Tensor, ref.Tensor) or
                                     issubclass(Tensor, torch.Tensor)):
        raise AssertionError("Tensor must be your own class, not (a subclass of) "
                             "course_reference.autograd.Tensor or torch.Tensor")
    x = Tensor(np.ones((2, 2), dtype=np.float32), requires_grad=True)
    if not isinstance(x.data, np.ndarray):
        raise AssertionError(f"Tensor(...).data should be a NumPy array, got {type(x.data)}")


def _torch_run(case: OpCase, inputs: list[np.ndarray], seed_grad: np.ndarray | None,
               dtype: torch.dtype) -> tuple[np.ndarray, list[np.ndarray]]:
    ts = [torch.tensor(x, dtype=dtype, requires_grad=True) for x in inputs]
    out = case.torch_fn(*ts)
    if seed_grad is None:
        return out.detach().numpy(), []
    out.backward(torch.tensor(seed_grad, dtype=dtype))
    return out.detach().numpy(), [t.grad.numpy() if t.grad is not None else np.zeros(t.shape)
                                  for t in ts]


def _reference_run(case: OpCase, inputs: list[np.ndarray], seed_grad: np.ndarray
                   ) -> tuple[np.ndarray, list[np.ndarray]]:
    xs = [ref.Tensor(x, requires_grad=True) for x in inputs]
    out = (case.reference or case.ours)(*xs)
    out.backward(seed_grad.astype(np.float32))
    return out.data, [x.grad if x.grad is not None else np.zeros(x.shape) for x in xs]


def check_op_case(Tensor: Any, case: OpCase, rng: np.random.Generator,
                  namespace: dict[str, Any] | None = None) -> None:
    inputs = case.inputs(rng)
    expected_out, _ = _torch_run(case, inputs, None, torch.float64)
    seed_grad = _values(rng, expected_out.shape, "normal")
    expected_out, expected_grads = _torch_run(case, inputs, seed_grad, torch.float64)
    torch32_out, torch32_grads = _torch_run(case, inputs, seed_grad, torch.float32)
    ref_out, ref_grads = _reference_run(case, inputs, seed_grad)

    with engine_guard(namespace), time_limit(30, case.name):
        xs = [Tensor(x.copy(), requires_grad=True) for x in inputs]
        out = case.ours(*xs)
        if out is None or not hasattr(out, "data"):
            raise AssertionError(f"{case.name}: expected a Tensor, got {out!r} (is the op still "
                                 "`...`?)")
        assert_close(out.data, expected_out, what=f"{case.name}: forward value",
                     atol=float_tolerance(expected_out, torch32_out, ref_out))
        grads = vector_jacobian(out, seed_grad, xs)
    for i, (got, expected) in enumerate(zip(grads, expected_grads)):
        what = f"{case.name}: gradient of input {i} (shape {inputs[i].shape})"
        if got is None:
            raise AssertionError(f"{what}: no gradient reached this input; is it among the "
                                 "node's parents?")
        assert_close(got, expected, what=what,
                     atol=float_tolerance(expected, torch32_grads[i], ref_grads[i]))


def check_ops(Tensor: Any, group: str, seed: int | None, rounds: int = 1,
              namespace: dict[str, Any] | None = None) -> None:
    """Public: ``seed=None`` runs the group's fixed cases. Hidden: ``rounds`` random draws."""
    check_structure(Tensor)
    if seed is None:
        rng = np.random.default_rng(0)
        for case in op_cases(group):
            check_op_case(Tensor, case, rng, namespace)
        return
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        for case in op_cases(group, rng):
            check_op_case(Tensor, case, rng, namespace)


def check_softmax_ops(Tensor: Any, log_softmax: Any, cross_entropy: Any, seed: int,
                      scale: float, rounds: int = 1, namespace: dict[str, Any] | None = None
                      ) -> None:
    """log_softmax and cross_entropy against torch, on logits of magnitude about ``scale``.

    With ``scale`` in the thousands, ``exp`` overflows float32 unless the maximum is subtracted.
    """
    require(Tensor=Tensor, log_softmax=log_softmax, cross_entropy=cross_entropy)
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        n, c = (int(v) for v in rng.integers(2, 9, 2))
        axis = int(rng.integers(0, 2))
        labels = rng.integers(0, c, n)
        cases = [
            OpCase(f"log_softmax of ({n}, {c}) logits of size ~{scale:g}, axis={axis}", [(n, c)],
                   lambda x, axis=axis: log_softmax(x, axis=axis),
                   lambda x, axis=axis: torch.log_softmax(x, dim=axis),
                   reference=lambda x, axis=axis: ref.log_softmax(x, axis=axis), scale=scale),
            OpCase(f"cross_entropy of ({n}, {c}) logits of size ~{scale:g}", [(n, c)],
                   lambda x, labels=labels: cross_entropy(x, labels),
                   lambda x, labels=labels: torch.nn.functional.cross_entropy(
                       x, torch.from_numpy(labels)),
                   reference=lambda x, labels=labels: ref.cross_entropy(x, labels), scale=scale),
        ]
        for case in cases:
            check_op_case(Tensor, case, rng, namespace)


# --------------------------------------------------------------------------------------------
# q3: the engine (topological order and backward), on hand-made nodes
# --------------------------------------------------------------------------------------------

class _Nodes:
    """Builds graphs from the student's own ``make_node`` with backward rules fixed here, so the
    engine is checked independently of the student's ops."""

    def __init__(self, Tensor: Any, make_node: Any):
        self.Tensor, self.make_node = Tensor, make_node

    def leaf(self, value: Any) -> Any:
        return self.Tensor(np.asarray(value, dtype=np.float32), requires_grad=True)

    def scale(self, x: Any, c: float) -> Any:
        return self.make_node(x.data * c, (x,), lambda g: (g * c,), "scale")

    def add(self, x: Any, y: Any) -> Any:
        return self.make_node(x.data + y.data, (x, y), lambda g: (g, g), "add")

    def mul(self, x: Any, y: Any) -> Any:
        xd, yd = x.data, y.data
        return self.make_node(xd * yd, (x, y), lambda g: (g * yd, g * xd), "mul")

    def total(self, x: Any) -> Any:
        shape = x.data.shape
        return self.make_node(np.asarray(x.data.sum(), dtype=np.float32), (x,),
                              lambda g: (np.broadcast_to(g, shape).copy(),), "sum")


def _grad_of(x: Any, what: str) -> np.ndarray:
    if getattr(x, "grad", None) is None:
        raise AssertionError(f"{what}: .grad is None after backward()")
    return np.asarray(x.grad)


def _check_order(topological_order: Any, root: Any, expected_nodes: int, what: str) -> None:
    with time_limit(60, f"topological_order on {what}"):
        order = topological_order(root)
    if order is None:
        raise AssertionError(f"topological_order({what}) returned None")
    order = list(order)
    position = {id(node): i for i, node in enumerate(order)}
    if len(position) != len(order):
        raise AssertionError(f"topological_order({what}): a node appears more than once")
    if len(order) != expected_nodes:
        raise AssertionError(f"topological_order({what}): expected {expected_nodes} nodes, got "
                             f"{len(order)}")
    if order[-1] is not root and order[0] is not root:
        raise AssertionError(f"topological_order({what}): the root should come last (or first, "
                             "if you return the order already reversed)")
    reverse = order[0] is root and len(order) > 1
    for node in order:
        for parent in _parents_of(node):
            if id(parent) not in position:
                raise AssertionError(f"topological_order({what}): a parent of a "
                                     f"'{node._op}' node is missing")
            before = position[id(parent)] < position[id(node)]
            if before == reverse:
                raise AssertionError(
                    f"topological_order({what}): a '{node._op}' node comes before one of its "
                    "inputs; every node must come after all the nodes it was computed from")


def check_engine_basics(Tensor: Any, make_node: Any, topological_order: Any, backward: Any,
                        namespace: dict[str, Any] | None = None) -> None:
    """A diamond (a value used twice) and a small chain, their order and their gradients."""
    require(Tensor=Tensor, make_node=make_node, topological_order=topological_order,
            backward=backward)
    nodes = _Nodes(Tensor, make_node)
    with engine_guard(namespace):
        x = nodes.leaf([1.0, -2.0, 3.0])
        a = nodes.scale(x, 2.0)           # a = 2x
        b = nodes.mul(a, x)               # b = 2x^2 (x used twice)
        c = nodes.add(b, a)               # c = 2x^2 + 2x (a used twice)
        root = nodes.total(c)
        _check_order(topological_order, root, 5, "a diamond-shaped graph")
        with time_limit(30, "backward on a diamond-shaped graph"):
            backward(root)
        assert_close(_grad_of(x, "diamond"), 4 * x.data + 2,
                     what="diamond: d/dx sum(2x*x + 2x) = 4x + 2", atol=1e-5)


def check_engine_hidden(Tensor: Any, make_node: Any, topological_order: Any, backward: Any,
                        seed: int, chain_length: int = 100_000,
                        namespace: dict[str, Any] | None = None) -> None:
    """Deep chains, reuse, accumulation across calls, random DAGs and bad calls."""
    require(Tensor=Tensor, make_node=make_node, topological_order=topological_order,
            backward=backward)
    nodes = _Nodes(Tensor, make_node)
    rng = np.random.default_rng(seed)
    guard = lambda: engine_guard(namespace)  # noqa: E731 - student code runs only inside it

    # A chain deeper than Python's recursion limit.
    with guard():
        x = nodes.leaf([1.5])
        with time_limit(120, f"building a chain of {chain_length:,} nodes with make_node"):
            root = run_there(chain_of_scales, make_node, x, chain_length, 1.0)
        with time_limit(120, f"backward through a chain of {chain_length:,} nodes"):
            try:
                backward(root)
            except RecursionError:
                raise AssertionError(
                    f"backward through a chain of {chain_length:,} nodes hit Python's recursion "
                    "limit: walk the graph with an explicit stack instead of recursion") from None
    assert_close(_grad_of(x, "deep chain"), [1.0], what=f"{chain_length:,}-node chain",
                 atol=1e-6)

    # Gradients accumulate across backward() calls on fresh graphs.
    with guard(), time_limit(30, "two backward() calls"):
        x = nodes.leaf([2.0, 3.0])
        backward(nodes.total(nodes.scale(x, 3.0)))
        backward(nodes.total(nodes.scale(x, 4.0)))
    assert_close(_grad_of(x, "accumulation"), [7.0, 7.0],
                 what="two backward() calls (3x then 4x) should accumulate 7 into x.grad "
                      "(was the gradient overwritten?)", atol=1e-5)

    # A constant (requires_grad=False) among the inputs: it gets no gradient, as in torch.
    with guard(), time_limit(30, "backward with a constant input"):
        x = nodes.leaf([2.0, 3.0])
        c = Tensor(np.asarray([5.0, 7.0], dtype=np.float32))
        backward(nodes.total(nodes.mul(x, c)))
    if getattr(c, "grad", None) is not None:
        raise AssertionError(f"a tensor created with requires_grad=False got .grad = {c.grad!r} "
                             "from backward(): only tensors that require grad get one")
    assert_close(_grad_of(x, "constant input"), [5.0, 7.0],
                 what="d/dx sum(x * c) with c a constant", atol=1e-5)

    # Random DAGs with heavy reuse, checked against torch.
    for trial in range(3):
        _check_random_dag(nodes, backward, rng, trial, guard)

    # Non-scalar outputs need an explicit gradient.
    with guard(), time_limit(30, "backward on a non-scalar output"):
        try:
            backward(nodes.scale(nodes.leaf([1.0, 2.0]), 2.0))
        except Exception:  # noqa: BLE001 - any clear error is accepted
            pass
        else:
            raise AssertionError("backward() on a non-scalar output of shape (2,) without a "
                                 "gradient should raise an error, not guess one")
        x = nodes.leaf([1.0, 2.0])
        backward(nodes.scale(x, 2.0), np.array([1.0, 10.0], dtype=np.float32))
    assert_close(_grad_of(x, "explicit grad"), [2.0, 20.0],
                 what="backward(v, grad=[1, 10]) for v = 2x", atol=1e-5)


def _check_random_dag(nodes: _Nodes, backward: Any, rng: np.random.Generator, trial: int,
                      guard: Callable[[], Any]) -> None:
    size = 4
    leaves_np = [rng.standard_normal(size).astype(np.float32) for _ in range(3)]
    ours = [nodes.leaf(v) for v in leaves_np]
    theirs = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in leaves_np]
    pool_ours, pool_theirs = list(ours), list(theirs)
    steps = [(int(rng.integers(0, 3)), *(int(k) for k in rng.integers(0, 3 + n, 2)),
              float(rng.uniform(-1.5, 1.5))) for n in range(int(rng.integers(8, 16)))]
    for kind, i, j, c in steps:
        pool_theirs.append(pool_theirs[i] * c if kind == 0 else
                           pool_theirs[i] + pool_theirs[j] if kind == 1 else
                           pool_theirs[i] * pool_theirs[j])
    # Sum several late nodes so that many paths meet at the root.
    troot = (pool_theirs[-1] + pool_theirs[-2] + pool_theirs[-3]).sum()
    troot.backward()
    with guard(), time_limit(30, f"backward on random graph {trial}"):
        for kind, i, j, c in steps:
            pool_ours.append(nodes.scale(pool_ours[i], c) if kind == 0 else
                             nodes.add(pool_ours[i], pool_ours[j]) if kind == 1 else
                             nodes.mul(pool_ours[i], pool_ours[j]))
        root = nodes.total(nodes.add(nodes.add(pool_ours[-1], pool_ours[-2]), pool_ours[-3]))
        backward(root)
    for n, (x, t) in enumerate(zip(ours, theirs)):
        expected = t.grad.numpy() if t.grad is not None else np.zeros(size)
        got = x.grad if x.grad is not None else np.zeros(size)
        assert_close(got, expected, what=f"random graph {trial}: gradient of leaf {n}",
                     atol=1e-4 * (1 + np.abs(expected)))


# --------------------------------------------------------------------------------------------
# q5: Adam
# --------------------------------------------------------------------------------------------

def check_adam(Tensor: Any, Adam: Any, seed: int, steps: int,
               namespace: dict[str, Any] | None = None) -> None:
    """``steps`` updates with fixed random gradients, against ``torch.optim.Adam``; with a seed
    other than 0, also a parameter whose gradients are so small that ``eps`` decides its update,
    and one that never gets a gradient (``torch.optim.Adam`` leaves it alone)."""
    require(Tensor=Tensor, Adam=Adam)
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (4,)] if seed == 0 else [tuple(int(d) for d in rng.integers(1, 6, 2)), (5,)]
    lr, betas, eps = 0.01, (0.9, 0.999), 1e-8
    if seed != 0:  # edge cases: gradients so small that eps matters, and a parameter with none
        shapes += [(3,), (2,)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(steps)]
    if seed != 0:
        for g in grads:
            g[-2] *= np.float32(1e-9)
            g[-1] = None

    tparams = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in init]
    topt = torch.optim.Adam(tparams, lr=lr, betas=betas, eps=eps)
    rparams = [ref.Tensor(v, requires_grad=True) for v in init]
    ropt = ref.Adam(rparams, lr=lr, betas=betas, eps=eps)
    with engine_guard(namespace), time_limit(30, "creating your Adam"):
        params = [Tensor(v.copy(), requires_grad=True) for v in init]
        opt = Adam(params, lr=lr, betas=betas, eps=eps)
    for step, g in enumerate(grads, start=1):
        for p, tp, rp, gi in zip(params, tparams, rparams, g):
            p.grad = None if gi is None else gi.copy()
            tp.grad = None if gi is None else torch.tensor(gi, dtype=torch.float64)
            rp.grad = None if gi is None else gi.copy()
        with engine_guard(namespace), time_limit(10, f"Adam step {step}"):
            opt.step()
        ropt.step()
        topt.step()
        for k, (p, tp, rp) in enumerate(zip(params, tparams, rparams)):
            expected = tp.detach().numpy()
            assert_close(p.data, expected,
                         what=f"Adam: parameter {k} (shape {expected.shape}) after step {step}",
                         atol=float_tolerance(expected, rp.data) + 1e-6)


# --------------------------------------------------------------------------------------------
# q6: training on digits
# --------------------------------------------------------------------------------------------

def digits_accuracy(Tensor: Any, model: Any, X: np.ndarray, y: np.ndarray) -> float:
    logits = model(Tensor(X))
    predictions = np.asarray(logits.data).argmax(axis=1)
    return float((predictions == y).mean())


def check_digits_model(Tensor: Any, model: Any, threshold: float,
                       namespace: dict[str, Any] | None = None) -> None:
    """The student's trained model, evaluated here on the held-out split."""
    require(Tensor=Tensor, model=model)
    from course_runtime.data import load_digits_split

    _, X_test, _, y_test = load_digits_split()
    parameters = model.parameters() if hasattr(model, "parameters") else []
    if not parameters or not all(isinstance(getattr(p, "data", None), np.ndarray)
                                 for p in parameters):
        raise AssertionError("model.parameters() should list your Tensors (holding NumPy arrays)")
    with engine_guard(namespace), time_limit(60, "evaluating the model on the test split"):
        accuracy = digits_accuracy(Tensor, model, X_test, y_test)
    if accuracy < threshold:
        raise AssertionError(f"test accuracy {accuracy:.3f} is below {threshold:.2f} on the "
                             f"{len(y_test)} held-out digits: train longer or tune the step size")


# --------------------------------------------------------------------------------------------
# q7: speed
# --------------------------------------------------------------------------------------------

def check_speed(Tensor: Any, MLP: Any, SGD: Any, cross_entropy: Any, bound: float,
                rounds: int = 15, namespace: dict[str, Any] | None = None) -> float:
    """Median step time of the student's engine over the reference's, measured in one process.

    Returns the ratio; fails when it exceeds ``bound``, when one step of the student's engine
    does not compute PyTorch's loss and update, or when the timed steps themselves do not give
    PyTorch's losses (a step is timed only if its result is checked). Each step is timed here,
    around the call, on one CPU and one thread for both engines, on every grading path alike.
    """
    require(Tensor=Tensor, MLP=MLP, SGD=SGD, cross_entropy=cross_entropy)
    with time_limit(60, "one training step against PyTorch's"):  # only a correct step is timed
        step_matches_torch(Tensor, MLP, SGD, cross_entropy,
                           around_engine=lambda: engine_guard(namespace))
    reference, _ = train_step_runner(ref.Tensor, ref.MLP, ref.SGD, ref.cross_entropy)
    with engine_guard(namespace), time_limit(60, "building your benchmark MLP"):
        student, initial = run_there(train_step_runner, Tensor, MLP, SGD, cross_entropy)
    losses: list[Any] = []

    def timed(run: Callable[[], Any], record: list[Any] | None = None,
              guard: Callable[[], Any] = contextlib.nullcontext) -> Callable[[], float]:
        def step() -> float:
            with guard():  # outside the timed region: only the step itself is timed
                start = time.perf_counter()
                loss = run()
                elapsed = time.perf_counter() - start
            if record is not None:
                record.append(loss)
            return elapsed
        return step

    with on_one_cpu(student), pinned_threads(1), \
            time_limit(240, "timing your training step (784-512-512-10 MLP, batch 256)"):
        times = measure_interleaved({
            "yours": timed(student, losses, guard=lambda: engine_guard(namespace)),
            "reference": timed(reference)}, rounds)
    expected = torch_losses(initial, len(losses))
    got = np.asarray([float(v) if isinstance(v, (int, float, np.floating)) else np.nan
                      for v in losses])
    if not np.allclose(got, expected, rtol=1e-3, atol=1e-4):
        worst = int(np.argmax(np.abs(np.nan_to_num(got - expected, nan=np.inf))))
        raise AssertionError(
            f"the training steps that were timed do not compute PyTorch's: after step "
            f"{worst + 1} of {len(got)} your loss is {got[worst]:.6f}, PyTorch's from the same "
            f"weights {expected[worst]:.6f}; only a correct step's time counts")
    return check_ratio(times["yours"], times["reference"], what="training step",
                       peer_name="the reference", bound=bound,
                       advice="profile it and remove the overhead")


__all__ = [
    "check_adam", "check_broadcast_shape", "check_digits_model", "check_engine_basics",
    "check_engine_hidden", "check_ops", "check_softmax_ops", "check_speed", "check_structure",
    "check_unbroadcast", "describe", "op_cases", "vector_jacobian",
]
