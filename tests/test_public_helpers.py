"""The runtime helpers that public tests use can fail: they pass the reference and catch a
planted mistake."""

from __future__ import annotations

import pytest

from course_reference import autograd as ref
from course_runtime.opcheck import check_op
from course_runtime.training import step_matches_torch


def test_check_op_passes_the_reference_and_catches_a_wrong_gradient():
    check_op(ref.Tensor, "mul", lambda x, y: x * y, lambda x, y: x * y, [(3, 1, 4), (5, 1)])
    check_op(ref.Tensor, "max with ties", lambda x: x.max(axis=1), lambda x: x.amax(dim=1),
             [(4, 6)], ["ties"])

    def doubled_grad_exp(x):
        out = x.exp()
        backward = out._backward
        out._backward = lambda g: tuple(2 * d for d in backward(g))
        return out

    with pytest.raises(AssertionError, match="gradient of input 0"):
        check_op(ref.Tensor, "exp", doubled_grad_exp, lambda x: x.exp(), [(3,)])
    with pytest.raises(AssertionError, match="forward value"):
        check_op(ref.Tensor, "exp", lambda x: x.exp() * 1.001, lambda x: x.exp(), [(3,)])


def test_step_matches_torch_passes_the_reference_and_catches_a_broken_update():
    step_matches_torch(ref.Tensor, ref.MLP, ref.SGD, ref.cross_entropy)

    class HalfStepSGD(ref.SGD):
        def step(self):
            for p in self.params:
                p.data -= 0.5 * self.lr * p.grad

    with pytest.raises(AssertionError, match="after the SGD update"):
        step_matches_torch(ref.Tensor, ref.MLP, HalfStepSGD, ref.cross_entropy)

    def wrong_loss(logits, targets):
        return ref.cross_entropy(logits * 1.5, targets)

    with pytest.raises(AssertionError, match="your loss"):
        step_matches_torch(ref.Tensor, ref.MLP, ref.SGD, wrong_loss)
