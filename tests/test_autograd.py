"""The reference autograd engine against torch.autograd and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from course_reference.autograd import (
    MLP,
    SGD,
    Adam,
    Tensor,
    backward,
    cross_entropy,
    log_softmax,
    no_grad,
    softmax,
    topological_order,
    unbroadcast,
)
from grader.checks.lab01_autograd import broadcast_pair

F64 = np.float64


def t64(x: np.ndarray) -> Tensor:
    return Tensor(x, requires_grad=True, dtype=F64)


def torch64(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64, requires_grad=True)


# Each op: (ours, theirs, input domains). Written once per library, compared in float64.
UNARY = {
    "exp": (lambda x: x.exp(), torch.exp, "normal"),
    "log": (lambda x: x.log(), torch.log, "positive"),
    "relu": (lambda x: x.relu(), torch.relu, "normal"),
    "tanh": (lambda x: x.tanh(), torch.tanh, "normal"),
    "sigmoid": (lambda x: x.sigmoid(), torch.sigmoid, "normal"),
    "neg": (lambda x: -x, lambda x: -x, "normal"),
    "pow": (lambda x: x ** 3, lambda x: x ** 3, "normal"),
    "sqrt": (lambda x: x ** 0.5, torch.sqrt, "positive"),
}
BINARY = {
    "add": (lambda a, b: a + b, "normal"),
    "sub": (lambda a, b: a - b, "normal"),
    "mul": (lambda a, b: a * b, "normal"),
    "div": (lambda a, b: a / b, "nonzero"),
    "pow": (lambda a, b: a ** b, "positive"),
}


def values(rng: np.random.Generator, shape: tuple[int, ...], domain: str) -> np.ndarray:
    if domain == "positive":
        return rng.uniform(0.5, 2.0, shape)
    if domain == "nonzero":
        return rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
    return rng.standard_normal(shape)


def compare(ours_out: Tensor, theirs_out: torch.Tensor, ours_in: list[Tensor],
            theirs_in: list[torch.Tensor], rng: np.random.Generator) -> None:
    np.testing.assert_allclose(ours_out.data, theirs_out.detach().numpy(), rtol=1e-10, atol=1e-12)
    seed = rng.standard_normal(ours_out.shape)
    ours_out.backward(seed)
    theirs_out.backward(torch.tensor(seed))
    for a, b in zip(ours_in, theirs_in):
        np.testing.assert_allclose(a.grad, b.grad.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_ops_match_torch(name):
    ours, theirs, domain = UNARY[name]
    rng = np.random.default_rng(1)
    x = values(rng, (3, 4), domain)
    a, ta = t64(x), torch64(x)
    compare(ours(a), theirs(ta), [a], [ta], rng)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), name=st.sampled_from(sorted(BINARY)))
def test_broadcasting_binary_ops_match_torch(seed, name):
    op, domain = BINARY[name]
    rng = np.random.default_rng(seed)
    shape_a, shape_b = broadcast_pair(rng)
    x = values(rng, shape_a, "positive" if name == "pow" else "normal")
    y = values(rng, shape_b, domain)
    a, b, ta, tb = t64(x), t64(y), torch64(x), torch64(y)
    compare(op(a, b), op(ta, tb), [a, b], [ta, tb], rng)


REDUCTIONS = [
    (lambda x: x.sum(), lambda x: x.sum()),
    (lambda x: x.sum(axis=1), lambda x: x.sum(dim=1)),
    (lambda x: x.sum(axis=(0, 2), keepdims=True), lambda x: x.sum(dim=(0, 2), keepdim=True)),
    (lambda x: x.mean(axis=-1), lambda x: x.mean(dim=-1)),
    (lambda x: x.mean(), lambda x: x.mean()),
    (lambda x: x.max(axis=0), lambda x: x.amax(dim=0)),
    (lambda x: x.max(axis=(1, 2), keepdims=True), lambda x: x.amax(dim=(1, 2), keepdim=True)),
    (lambda x: x.reshape(4, -1), lambda x: x.reshape(4, -1)),
    (lambda x: x.transpose(2, 0, 1), lambda x: x.permute(2, 0, 1)),
    (lambda x: x.T, lambda x: x.permute(2, 1, 0)),
    (lambda x: x[1:, ::2, -1], lambda x: x[1:, ::2, -1]),
    (lambda x: x[[0, 1, 0]], lambda x: x[[0, 1, 0]]),
    (lambda x: x[np.array([2, 2]), :, np.array([0, 3])],
     lambda x: x[torch.tensor([2, 2]), :, torch.tensor([0, 3])]),
]


@pytest.mark.parametrize("index", range(len(REDUCTIONS)))
def test_reductions_and_shape_ops_match_torch(index):
    ours, theirs = REDUCTIONS[index]
    rng = np.random.default_rng(index)
    x = rng.standard_normal((3, 4, 4))
    a, ta = t64(x), torch64(x)
    compare(ours(a), theirs(ta), [a], [ta], rng)


@pytest.mark.parametrize("shapes", [((4, 3), (3, 5)), ((2, 4, 3), (2, 3, 5)),
                                    ((2, 4, 3), (3, 5)), ((3,), (3, 5)), ((4, 3), (3,)),
                                    ((2, 1, 4, 3), (5, 3, 2))])
def test_matmul_matches_torch(shapes):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(shapes[0]), rng.standard_normal(shapes[1])
    a, b, ta, tb = t64(x), t64(y), torch64(x), torch64(y)
    compare(a @ b, ta @ tb, [a, b], [ta, tb], rng)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_softmax_family_matches_torch(axis):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 7)) * 3
    a, ta = t64(x), torch64(x)
    compare(log_softmax(a, axis), torch.log_softmax(ta, axis), [a], [ta], rng)
    a, ta = t64(x), torch64(x)
    compare(softmax(a, axis), torch.softmax(ta, axis), [a], [ta], rng)


def test_cross_entropy_matches_torch_and_survives_huge_logits():
    rng = np.random.default_rng(4)
    for scale in (1.0, 1e4):
        x = rng.standard_normal((6, 5)) * scale
        labels = rng.integers(0, 5, 6)
        a, ta = t64(x), torch64(x)
        loss = cross_entropy(a, labels)
        tloss = torch.nn.functional.cross_entropy(ta, torch.from_numpy(labels))
        assert np.isfinite(loss.data)
        compare(loss, tloss, [a], [ta], rng)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_random_graphs_with_reuse_match_torch(seed):
    """Random DAGs of broadcasting ops where every intermediate may be reused."""
    rng = np.random.default_rng(seed)
    leaves = [rng.standard_normal(s) for s in [(3, 4), (4,), (3, 1)]]
    ours, theirs = [t64(v) for v in leaves], [torch64(v) for v in leaves]
    pool_o, pool_t = list(ours), list(theirs)
    for _ in range(int(rng.integers(3, 12))):
        i, j = (int(k) for k in rng.integers(0, len(pool_o), 2))
        kind = int(rng.integers(0, 5))
        if kind == 0:
            pool_o.append(pool_o[i] + pool_o[j])
            pool_t.append(pool_t[i] + pool_t[j])
        elif kind == 1:
            pool_o.append(pool_o[i] * pool_o[j])
            pool_t.append(pool_t[i] * pool_t[j])
        elif kind == 2:
            pool_o.append(pool_o[i].tanh())
            pool_t.append(pool_t[i].tanh())
        elif kind == 3:
            pool_o.append(pool_o[i].sigmoid() * 2.0 - pool_o[j])
            pool_t.append(pool_t[i].sigmoid() * 2.0 - pool_t[j])
        else:
            pool_o.append(pool_o[i].sum(axis=-1, keepdims=True) / 3.0)
            pool_t.append(pool_t[i].sum(dim=-1, keepdim=True) / 3.0)
    (pool_o[-1] * pool_o[-2]).sum().backward()
    (pool_t[-1] * pool_t[-2]).sum().backward()
    for a, b in zip(ours, theirs):
        expected = b.grad.numpy() if b.grad is not None else np.zeros(a.shape)
        got = a.grad if a.grad is not None else np.zeros(a.shape)
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-10)


def test_gradcheck_by_finite_differences():
    """Central differences in float64 on a composite function of two inputs."""
    rng = np.random.default_rng(5)
    x0, w0 = rng.standard_normal((4, 3)), rng.standard_normal((3, 2))

    def f(x: Tensor, w: Tensor) -> Tensor:
        h = (x @ w).tanh() * x.sum(axis=1, keepdims=True).sigmoid()
        return log_softmax(h, axis=1).mean() + (w ** 2).sum() / 10

    x, w = t64(x0), t64(w0)
    f(x, w).backward()
    eps = 1e-6
    for tensor, base in ((x, x0), (w, w0)):
        numeric = np.zeros_like(base)
        for index in np.ndindex(base.shape):
            plus, minus = base.copy(), base.copy()
            plus[index] += eps
            minus[index] -= eps
            args_p = (Tensor(plus, dtype=F64), Tensor(w0, dtype=F64)) if tensor is x else \
                (Tensor(x0, dtype=F64), Tensor(plus, dtype=F64))
            args_m = (Tensor(minus, dtype=F64), Tensor(w0, dtype=F64)) if tensor is x else \
                (Tensor(x0, dtype=F64), Tensor(minus, dtype=F64))
            numeric[index] = (f(*args_p).item() - f(*args_m).item()) / (2 * eps)
        np.testing.assert_allclose(tensor.grad, numeric, rtol=1e-6, atol=1e-8)


def test_chain_of_100k_ops_needs_no_recursion():
    x = Tensor([2.0], requires_grad=True)
    y = x
    for _ in range(100_000):
        y = y * 1.0
    y.sum().backward()
    assert x.grad.tolist() == [1.0]
    assert len(topological_order((x * 2.0).sum())) == 3


def test_gradients_accumulate_across_uses_and_calls():
    x = Tensor([1.0, 2.0], requires_grad=True)
    (x * x + x).sum().backward()
    np.testing.assert_allclose(x.grad, [3.0, 5.0])
    (x * 3.0).sum().backward()
    np.testing.assert_allclose(x.grad, [6.0, 8.0])


def test_second_backward_through_freed_graph_is_a_clear_error():
    x = Tensor([1.0, 2.0], requires_grad=True)
    y = (x.exp() * 2.0).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="second time.*retain_graph=True"):
        y.backward()
    z = (x.exp() * 2.0).sum()
    z.backward(retain_graph=True)
    z.backward()
    # 2e^x from the first graph, then 2e^x twice from the retained one.
    np.testing.assert_allclose(x.grad, 6 * np.exp([1.0, 2.0]), rtol=1e-6)


def test_bad_inputs_name_the_op_and_shapes():
    a = Tensor(np.ones((2, 3)), requires_grad=True)
    with pytest.raises(ValueError, match=r"add: shapes \(2, 3\) and \(4,\)"):
        a + Tensor(np.ones(4))
    with pytest.raises(ValueError, match=r"matmul: inner dimensions differ, \(2, 3\) @ \(2, 3\)"):
        a @ Tensor(np.ones((2, 3)))
    with pytest.raises(RuntimeError, match=r"scalar output.*shape \(2, 3\)"):
        (a * 2.0).backward()
    with pytest.raises(ValueError, match=r"gradient of shape \(3,\) given for a tensor of shape"):
        (a * 2.0).backward(np.ones(3))
    with pytest.raises(TypeError, match="dtype mismatch, float32 .* vs float64"):
        a * Tensor(np.ones((2, 3)), dtype=F64)
    with pytest.raises(TypeError, match="only floating-point tensors can require grad"):
        Tensor(np.arange(3), requires_grad=True)
    with pytest.raises(ValueError, match=r"reshape: cannot reshape \(2, 3\)"):
        a.reshape(4, 2)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        a.sum(axis=2)
    with pytest.raises(IndexError, match="cross_entropy: target 7 is out of range for 3 classes"):
        cross_entropy(a.reshape(3, 2).T @ Tensor(np.ones((3, 3))), np.array([0, 7]))
    with pytest.raises(RuntimeError, match="does not require grad"):
        Tensor([1.0]).sum().backward()


def test_no_grad_records_nothing():
    x = Tensor([1.0], requires_grad=True)
    with no_grad():
        y = x * 2.0
    assert not y.requires_grad and y.parents == ()
    assert (x * 2.0).requires_grad


def test_unbroadcast_matches_sum_to_size():
    rng = np.random.default_rng(9)
    for _ in range(50):
        a, b = broadcast_pair(rng)
        grad = rng.standard_normal(np.broadcast_shapes(a, b))
        for shape in (a, b):
            expected = torch.from_numpy(grad).sum_to_size(shape).numpy()
            np.testing.assert_allclose(unbroadcast(grad, shape), expected, rtol=1e-12)


@pytest.mark.parametrize("make", [
    lambda p: (SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
               lambda tp: torch.optim.SGD(tp, lr=0.1, momentum=0.9, weight_decay=0.01)),
    lambda p: (Adam(p, lr=0.01, weight_decay=0.01),
               lambda tp: torch.optim.Adam(tp, lr=0.01, weight_decay=0.01)),
])
def test_optimizers_follow_torch_step_for_step(make):
    rng = np.random.default_rng(6)
    init = [rng.standard_normal((3, 4)), rng.standard_normal(4)]
    params = [Tensor(v, requires_grad=True, dtype=F64) for v in init]
    tparams = [torch64(v) for v in init]
    optimizer, make_torch = make(params)
    toptimizer = make_torch(tparams)
    for _ in range(20):
        grads = [rng.standard_normal(v.shape) for v in init]
        for p, tp, g in zip(params, tparams, grads):
            p.grad, tp.grad = g, torch.tensor(g)
        optimizer.step()
        toptimizer.step()
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_mlp_learns_digits_above_95_percent():
    from course_runtime.data import load_digits_split

    X_train, X_test, y_train, y_test = load_digits_split()
    model = MLP([64, 128, 10], seed=0)
    optimizer = Adam(model.parameters(), lr=0.01)
    rng = np.random.default_rng(0)
    for _ in range(25):
        order = rng.permutation(len(X_train))
        for start in range(0, len(order), 64):
            rows = order[start:start + 64]
            optimizer.zero_grad()
            cross_entropy(model(Tensor(X_train[rows])), y_train[rows]).backward()
            optimizer.step()
    with no_grad():
        accuracy = (model(Tensor(X_test)).data.argmax(axis=1) == y_test).mean()
    assert accuracy >= 0.95, accuracy


def test_backward_function_matches_method():
    x = Tensor([1.0, -1.0], requires_grad=True)
    backward((x.relu() * 4.0).sum())
    np.testing.assert_allclose(x.grad, [4.0, 0.0])
