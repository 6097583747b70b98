"""The MoE layer against a token-by-token loop and a plain top-k mixture, and expert parallelism
on 2 processes against the single-process layer: outputs and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from course_reference.systems.moe import capacity_for, expert_parallel_moe, moe_layer, top_k_gate
from course_runtime.distributed import comm, launch

C, H, E = 6, 10, 4


def _weights():
    torch.manual_seed(0)
    return (torch.randn(C, E, dtype=torch.float64), torch.randn(E, C, H, dtype=torch.float64) / 3,
            torch.randn(E, H, C, dtype=torch.float64) / 3)


def _expert(x, w1, w2, e):
    return F.gelu(x @ w1[e]) @ w2[e]


def test_without_capacity_limits_it_is_the_plain_top_k_mixture():
    gate, w1, w2 = _weights()
    x = torch.randn(20, C, dtype=torch.float64)
    out, routing = moe_layer(x, gate, w1, w2, k=2, capacity_factor=100.0)
    assert routing.kept.all()
    probs = torch.softmax(x @ gate, -1)
    expected = torch.zeros_like(x)
    for t in range(len(x)):
        for e in probs[t].argsort(descending=True)[:2]:
            expected[t] += probs[t, e] * _expert(x[t], w1, w2, e)
    torch.testing.assert_close(out, expected)


def test_capacity_drops_the_latest_tokens_and_only_those():
    gate, w1, w2 = _weights()
    x = torch.randn(40, C, dtype=torch.float64)
    capacity = capacity_for(40, E, 1, 0.5)
    routing = top_k_gate(x, gate, 1, capacity)
    for e in range(E):
        chosen = (routing.expert[:, 0] == e).nonzero().flatten()
        assert routing.kept[chosen, 0].tolist() == [i < capacity for i in range(len(chosen))]
        assert routing.slot[chosen[:capacity], 0].tolist() == list(range(min(capacity,
                                                                                 len(chosen))))
    out, routing = moe_layer(x, gate, w1, w2, k=1, capacity_factor=0.5)
    for t in range(len(x)):
        e = routing.expert[t, 0]
        expected = routing.weight[t, 0] * _expert(x[t], w1, w2, e) if routing.kept[t, 0] else 0
        torch.testing.assert_close(out[t], expected + torch.zeros(C, dtype=torch.float64))


def _expert_parallel(rank, world_size, xs, capacity_factor):
    gate, w1, w2 = _weights()
    local = slice(rank * E // world_size, (rank + 1) * E // world_size)
    gate = gate.clone().requires_grad_()
    w1_local, w2_local = w1[local].clone().requires_grad_(), w2[local].clone().requires_grad_()
    x = xs[rank].clone().requires_grad_()
    with comm.counting() as counted:
        out, _ = expert_parallel_moe(x, gate, w1_local, w2_local, 2, capacity_factor)
        out.square().sum().backward()
    return out.detach(), gate.grad, w1_local.grad, w2_local.grad, dict(counted.calls), x.grad


@pytest.mark.parametrize("capacity_factor", [0.75, 4.0])
def test_expert_parallel_matches_the_single_process_layer(capacity_factor):
    gate, w1, w2 = _weights()
    xs = torch.randn(2, 16, C, dtype=torch.float64)
    gate_r, w1_r, w2_r = (t.clone().requires_grad_() for t in (gate, w1, w2))
    xs_r = xs.clone().requires_grad_()
    refs = [moe_layer(x, gate_r, w1_r, w2_r, 2, capacity_factor)[0] for x in xs_r]
    sum(r.square().sum() for r in refs).backward()
    results = launch(_expert_parallel, 2, xs, capacity_factor, timeout=60)
    for rank, (out, _, w1_grad, w2_grad, calls, x_grad) in enumerate(results):
        local = slice(rank * 2, rank * 2 + 2)
        torch.testing.assert_close(out, refs[rank].detach())
        torch.testing.assert_close(x_grad, xs_r.grad[rank])
        torch.testing.assert_close(w1_grad, w1_r.grad[local])   # experts see both ranks' tokens
        torch.testing.assert_close(w2_grad, w2_r.grad[local])
        assert calls == {"all_to_all": 4}                       # 2 forward, 2 backward
    # the gate is replicated: its gradient is the data-parallel sum of the ranks' gradients
    torch.testing.assert_close(results[0][1] + results[1][1], gate_r.grad)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"got \(5, 3\) and \(4, 2\)"):
        top_k_gate(torch.randn(5, 3), torch.randn(4, 2), 1, 2)
    with pytest.raises(ValueError, match="k = 3 must be between 1 and the 2 experts"):
        top_k_gate(torch.randn(5, 4), torch.randn(4, 2), 3, 2)
