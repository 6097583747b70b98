"""A mixture-of-experts layer with top-k gating and expert capacity, on one process and with
expert parallelism (all-to-all dispatch), after GShard (Lepikhin et al. 2021, section 2).

Each token's gate picks its k best experts. Every expert accepts at most ``capacity`` tokens per
batch (GShard's expert capacity): tokens beyond it are dropped for that expert, so that buffers
have a fixed shape (E, capacity, C) and the all-to-all that moves tokens to the devices holding
their experts has equal splits. With expert parallelism each of N ranks holds E/N experts and
gates its own tokens; one all-to-all sends each expert its tokens and a second brings the outputs
back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812 - the usual name

from course_runtime.distributed import comm


@dataclass
class Routing:
    """Where each of a token's k choices goes: expert, slot in that expert's buffer, gate weight,
    and whether it fitted under the capacity."""

    expert: torch.Tensor      # (T, k) int64
    slot: torch.Tensor        # (T, k) int64
    weight: torch.Tensor      # (T, k) gate probability of that expert
    kept: torch.Tensor        # (T, k) bool

    def tokens_per_expert(self, num_experts: int) -> torch.Tensor:
        """Tokens routed to each expert before the capacity cut (the load the gate asked for)."""
        return torch.bincount(self.expert.reshape(-1), minlength=num_experts)


def capacity_for(tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """Slots per expert: the even share k·T/E, times a slack factor (GShard, Switch)."""
    return max(1, math.ceil(capacity_factor * k * tokens / num_experts))


def top_k_gate(x: torch.Tensor, gate_weight: torch.Tensor, k: int, capacity: int) -> Routing:
    """Route tokens (T, C) with gate logits x @ gate_weight (C, E). First choices are placed
    before second choices, each in token order, so a full expert drops the later tokens."""
    if x.dim() != 2 or gate_weight.shape[0] != x.shape[1]:
        raise ValueError(f"top_k_gate: expected x (T, C) and gate_weight (C, E), got "
                         f"{tuple(x.shape)} and {tuple(gate_weight.shape)}")
    num_experts = gate_weight.shape[1]
    if not 1 <= k <= num_experts:
        raise ValueError(f"top_k_gate: k = {k} must be between 1 and the {num_experts} experts")
    probs = torch.softmax(x @ gate_weight, dim=-1)
    weight, expert = probs.topk(k, dim=-1)
    filled = torch.zeros(num_experts, dtype=torch.long)
    slots, kept = [], []
    for choice in range(k):
        one_hot = F.one_hot(expert[:, choice], num_experts)               # (T, E)
        position = (one_hot.cumsum(0) - 1 + filled) * one_hot
        slot = position.sum(-1)
        slots.append(slot)
        kept.append(slot < capacity)
        filled += one_hot.sum(0)
    return Routing(expert, torch.stack(slots, -1), weight, torch.stack(kept, -1))


def dispatch(x: torch.Tensor, routing: Routing, num_experts: int, capacity: int) -> torch.Tensor:
    """Copy each kept (token, choice) into its expert's buffer: (E, capacity, C), zero padded."""
    buffer = x.new_zeros(num_experts, capacity, x.shape[1])
    token, choice = routing.kept.nonzero(as_tuple=True)
    return buffer.index_put((routing.expert[token, choice], routing.slot[token, choice]),
                            x[token])


def combine(expert_out: torch.Tensor, routing: Routing) -> torch.Tensor:
    """out[t] = Σ over t's kept choices of gate weight × that expert's output for t."""
    T = routing.expert.shape[0]
    out = expert_out.new_zeros(T, expert_out.shape[-1])
    token, choice = routing.kept.nonzero(as_tuple=True)
    picked = expert_out[routing.expert[token, choice], routing.slot[token, choice]]
    return out.index_add(0, token, routing.weight[token, choice, None] * picked)


def experts_forward(buffer: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Every expert's MLP on its own buffer at once: (E, S, C) @ (E, C, H), GELU, @ (E, H, C)."""
    return torch.bmm(F.gelu(torch.bmm(buffer, w1)), w2)


def moe_layer(x: torch.Tensor, gate_weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
              k: int = 2, capacity_factor: float = 1.25) -> tuple[torch.Tensor, Routing]:
    """The whole layer on one process: gate, dispatch, experts, combine."""
    num_experts = gate_weight.shape[1]
    capacity = capacity_for(x.shape[0], num_experts, k, capacity_factor)
    routing = top_k_gate(x, gate_weight, k, capacity)
    buffer = dispatch(x, routing, num_experts, capacity)
    return combine(experts_forward(buffer, w1, w2), routing), routing


class _AllToAll(torch.autograd.Function):
    """all_to_all with equal splits; its adjoint is the same exchange applied to the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = torch.empty_like(x)
        return comm.all_to_all(out, x.contiguous())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = torch.empty_like(grad)
        return comm.all_to_all(out, grad.contiguous())


def expert_parallel_moe(x: torch.Tensor, gate_weight: torch.Tensor, w1_local: torch.Tensor,
                        w2_local: torch.Tensor, k: int = 2, capacity_factor: float = 1.25
                        ) -> tuple[torch.Tensor, Routing]:
    """This rank's tokens (T, C) through an MoE layer whose E experts are spread over the ranks,
    E/N each (``w1_local``: (E/N, C, H)); the gate is replicated. Same result as ``moe_layer``
    on this rank's tokens with all the experts."""
    n = dist.get_world_size()
    local_experts = w1_local.shape[0]
    num_experts = gate_weight.shape[1]
    if local_experts * n != num_experts:
        raise ValueError(f"expert_parallel_moe: {local_experts} local experts on {n} ranks, but "
                         f"the gate has {num_experts} experts")
    capacity = capacity_for(x.shape[0], num_experts, k, capacity_factor)
    routing = top_k_gate(x, gate_weight, k, capacity)
    buffer = dispatch(x, routing, num_experts, capacity)         # (E, cap, C), experts by rank
    received = _AllToAll.apply(buffer)     # (N sources × E/N local experts, cap, C)
    mine = received.reshape(n, local_experts, capacity, -1).transpose(0, 1)
    out = experts_forward(mine.reshape(local_experts, n * capacity, -1), w1_local, w2_local)
    back = out.reshape(local_experts, n, capacity, -1).transpose(0, 1)
    returned = _AllToAll.apply(back.reshape(num_experts, capacity, -1))
    return combine(returned, routing), routing
