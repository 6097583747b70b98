"""ZeRO stages 1, 2 and 3 over any ``nn.Module``, with AdamW on each rank's shard.

Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models"
(SC 2020), section 5. Data parallelism keeps a full copy of the parameters, the gradients and the
optimizer state on every rank; ZeRO keeps one copy in all, split across the N ranks:

* stage 1 shards the optimizer state. After the backward, gradients are reduce-scattered (each
  rank receives the sum of its own shard only), each rank updates its shard, and the updated
  shards are all-gathered back into every rank's parameters: 2Ψ of traffic, as in DDP.
* stage 2 also shards the gradients: each unit's gradients are reduce-scattered as soon as the
  backward has produced them, and the full gradients are dropped.
* stage 3 also shards the parameters: a unit's parameters are all-gathered just before its
  forward, freed after it, gathered again when the backward reaches it, and freed once its
  gradients are reduced: 3Ψ of traffic (the FSDP paper, Zhao et al. 2023, calls this FULL_SHARD).

The parameters are grouped into **units**: at stage 3, one per module that owns parameters
directly (a ``Linear`` is a unit; a ``Sequential`` of them is not), so that only one module's
parameters need be gathered at a time; at stages 1 and 2, where the parameters stay whole, one
unit for the whole model (the fewest collectives). Each unit is one flat buffer, padded to a
multiple of N so that every rank's shard has the same size (``reduce_scatter`` and
``all_gather`` need equal chunks); rank r owns elements ``[r S, (r + 1) S)`` with S = padded / N.
The parameters are views into the flat buffer, so gathering into the buffer updates them, and in
stage 3 freeing the buffer's storage frees them (the views keep their shapes; the memory goes).

Optionally (``offload=True``, ZeRO-Offload, Ren et al. 2021) the fp32 shard and its AdamW state
live in CPU memory and the update runs on the CPU; only gradients and parameters cross over.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from course_runtime.distributed import comm


def padded_numel(numel: int, world_size: int) -> int:
    """The smallest multiple of ``world_size`` that holds ``numel`` elements."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    return -(-numel // world_size) * world_size


def shard_bounds(numel: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, end)`` of ``rank``'s shard of a flat buffer of ``numel`` elements, padded."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of size {world_size}")
    size = padded_numel(numel, world_size) // world_size
    return rank * size, (rank + 1) * size


@dataclass
class _Unit:
    """The parameters of one module, as one padded flat buffer, and this rank's shard of it."""

    name: str
    params: list[nn.Parameter]
    numel: int
    padded: int
    start: int
    end: int
    full: torch.Tensor                       # the gathered parameters (padded)
    shard: nn.Parameter                      # the fp32 master shard that AdamW updates
    grad_shard: torch.Tensor | None = None   # the averaged gradient of this shard
    ready: int = 0                           # parameters whose gradient the backward has made
    gathered: bool = True
    offsets: list[int] = field(default_factory=list)

    def views(self) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        for p, offset in zip(self.params, self.offsets):
            yield p, self.full[offset:offset + p.numel()].view(p.shape)


class ZeroAdamW:
    """AdamW whose state, and at stages 2 and 3 gradients and parameters, are sharded.

    Use it like a DDP-wrapped model and an optimizer in one: build it on every rank of an
    initialised process group (the ranks' parameters are made equal by a broadcast from rank 0),
    then ``loss.backward(); zero.step(); zero.zero_grad()``. Gradients are averaged over ranks.
    Call ``gathered_parameters()`` (on every rank: it communicates) to read the full parameters.
    """

    def __init__(self, module: nn.Module, stage: int, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, group: dist.ProcessGroup | None = None,
                 offload: bool = False):
        if stage not in (1, 2, 3):
            raise ValueError(f"ZeRO stage must be 1, 2 or 3, got {stage!r}")
        if not dist.is_initialized():
            raise RuntimeError("ZeroAdamW needs an initialised process group: run it under "
                               "course_reference.parallel.launch (or init_process_group first)")
        self.module, self.stage, self.group, self.offload = module, stage, group, offload
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.gathered_numel = 0
        self.units = self._build_units(module)
        if not self.units:
            raise ValueError("the module has no parameters that require grad")
        if stage < 3:
            self.gathered_numel = sum(u.padded for u in self.units)
        self.peak_gathered_numel = self.gathered_numel
        self.optimizer = torch.optim.AdamW([u.shard for u in self.units], lr=lr, betas=betas,
                                           eps=eps, weight_decay=weight_decay)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        if stage >= 2:
            for unit in self.units:
                for p in unit.params:
                    self._hooks.append(p.register_post_accumulate_grad_hook(
                        lambda _p, unit=unit: self._grad_ready(unit)))
        if stage == 3:
            for name, sub in module.named_modules():
                unit = self._unit_of.get(name)
                if unit is not None:
                    self._hooks.append(sub.register_forward_pre_hook(
                        lambda _m, _args, unit=unit: self._gather(unit)))
                    self._hooks.append(sub.register_forward_hook(
                        lambda _m, _args, out, unit=unit: self._after_forward(unit, out)))

    # -- building the units -------------------------------------------------------------------

    def _build_units(self, module: nn.Module) -> list[_Unit]:
        groups: list[tuple[str, list[nn.Parameter]]] = []
        seen: set[int] = set()
        for name, sub in module.named_modules():
            params = [p for p in sub.parameters(recurse=False)
                      if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in params)
            for p in params:
                if not p.is_floating_point():
                    raise TypeError(f"parameter of {name or 'the root module'} has dtype "
                                    f"{p.dtype}; ZeRO shards floating-point parameters only")
            if params:
                groups.append((name, params))
        if self.stage < 3 and groups:
            # Stages 1 and 2 keep the parameters whole: one flat buffer for the whole model
            # means one reduce-scatter and one all-gather per step, the fewest collectives.
            groups = [("", [p for _, params in groups for p in params])]
        self._unit_of = {name: self._make_unit(name or "<root>", params)
                         for name, params in groups}
        return list(self._unit_of.values())

    def _make_unit(self, name: str, params: list[nn.Parameter]) -> _Unit:
        dtype, device = params[0].dtype, params[0].device
        for p in params:
            if p.dtype != dtype or p.device != device:
                raise TypeError(f"unit {name}: parameters mix {dtype} on {device} with "
                                f"{p.dtype} on {p.device}")
        numel = sum(p.numel() for p in params)
        padded = padded_numel(numel, self.world_size)
        start, end = shard_bounds(numel, self.world_size, self.rank)
        full = torch.zeros(padded, dtype=dtype, device=device)
        offsets, offset = [], 0
        for p in params:
            offsets.append(offset)
            full[offset:offset + p.numel()] = p.detach().reshape(-1)
            offset += p.numel()
        # Every rank starts from rank 0's parameters, as DDP does.
        comm.broadcast(full, src=0, group=self.group)
        master_device = torch.device("cpu") if self.offload else device
        shard = nn.Parameter(full[start:end].detach().to(master_device, torch.float32,
                                                           copy=True))
        unit = _Unit(name, params, numel, padded, start, end, full, shard, offsets=offsets)
        for p, view in unit.views():
            p.data = view
        if self.stage == 3:
            unit.full.untyped_storage().resize_(0)
            unit.gathered = False
        return unit

    # -- gathering and freeing parameters (stage 3) ---------------------------------------------

    def _gather(self, unit: _Unit) -> None:
        if unit.gathered:
            return
        storage = unit.full.untyped_storage()
        storage.resize_(unit.padded * unit.full.element_size())
        shard = unit.shard.detach().to(unit.full.device, unit.full.dtype)
        comm.all_gather(unit.full, shard, group=self.group)
        unit.gathered = True
        self.gathered_numel += unit.padded
        self.peak_gathered_numel = max(self.peak_gathered_numel, self.gathered_numel)

    def _free(self, unit: _Unit) -> None:
        # The parameters are views of ``full``: resizing its storage to nothing frees them all,
        # and autograd's saved views see the data again once ``_gather`` refills the storage.
        unit.full.untyped_storage().resize_(0)
        if unit.gathered:
            self.gathered_numel -= unit.padded
        unit.gathered = False

    def _after_forward(self, unit: _Unit, output: object) -> None:
        self._free(unit)
        tensors = output if isinstance(output, (tuple, list)) else [output]
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                # When the gradient reaches this module's output, its backward is next: gather.
                t.register_hook(lambda grad, unit=unit: (self._gather(unit), grad)[1])

    # -- reducing gradients -----------------------------------------------------------------

    def _grad_ready(self, unit: _Unit) -> None:
        unit.ready += 1
        if unit.ready == len(unit.params):
            self._reduce(unit)

    def _reduce(self, unit: _Unit) -> None:
        """Reduce-scatter the unit's gradients: this rank gets the average of its shard."""
        flat = torch.zeros(unit.padded, dtype=unit.full.dtype, device=unit.full.device)
        for p, offset in zip(unit.params, unit.offsets):
            if p.grad is not None:
                flat[offset:offset + p.numel()] = p.grad.reshape(-1)
        mine = torch.empty(unit.end - unit.start, dtype=flat.dtype, device=flat.device)
        comm.reduce_scatter(mine, flat, group=self.group)
        mine = mine.to(unit.shard.device, torch.float32).div_(self.world_size)
        unit.grad_shard = mine if unit.grad_shard is None else unit.grad_shard + mine
        unit.ready = 0
        if self.stage >= 2:
            for p in unit.params:
                p.grad = None
        if self.stage == 3:
            self._free(unit)

    # -- the step -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        """Update this rank's shards with AdamW; at stages 1 and 2, all-gather the parameters."""
        for unit in self.units:
            # Stage 1 reduces here; at stages 2 and 3 a unit whose hooks did not all fire (a
            # parameter unused in this forward) is reduced here too, in the same order on every
            # rank.
            if self.stage == 1 or unit.ready:
                self._reduce(unit)
        for unit in self.units:
            unit.shard.grad = unit.grad_shard if unit.grad_shard is not None \
                else torch.zeros_like(unit.shard)
        self.optimizer.step()
        if self.stage < 3:
            for unit in self.units:
                shard = unit.shard.detach().to(unit.full.device, unit.full.dtype)
                comm.all_gather(unit.full, shard, group=self.group)

    def zero_grad(self) -> None:
        for unit in self.units:
            unit.grad_shard = None
            unit.shard.grad = None
            unit.ready = 0
            for p in unit.params:
                p.grad = None

    # -- inspection -------------------------------------------------------------------------

    def optimizer_state_bytes(self) -> int:
        """Bytes of AdamW state this rank holds (momentum and variance of its shards)."""
        return sum(t.numel() * t.element_size() for state in self.optimizer.state.values()
                   for t in state.values() if isinstance(t, torch.Tensor) and t.dim() > 0)

    def gradient_bytes(self) -> int:
        """Bytes of gradients this rank holds right now (full ``.grad``s and reduced shards)."""
        full = sum(p.grad.numel() * p.grad.element_size() for u in self.units for p in u.params
                   if p.grad is not None)
        shards = sum(u.grad_shard.numel() * u.grad_shard.element_size() for u in self.units
                     if u.grad_shard is not None)
        return full + shards

    def parameter_bytes(self) -> int:
        """Bytes of gathered parameters this rank holds right now (freed ones count zero)."""
        return sum(u.full.untyped_storage().nbytes() for u in self.units)

    @property
    def num_params(self) -> int:
        return sum(u.numel for u in self.units)

    @torch.no_grad()
    def gathered_parameters(self) -> list[torch.Tensor]:
        """Every parameter in full, in ``module.parameters()`` order (a collective call)."""
        out: dict[int, torch.Tensor] = {}
        for unit in self.units:
            full = torch.empty(unit.padded, dtype=unit.full.dtype, device=unit.full.device)
            comm.all_gather(full, unit.shard.detach().to(full.device, full.dtype),
                            group=self.group)
            for p, offset in zip(unit.params, unit.offsets):
                out[id(p)] = full[offset:offset + p.numel()].view(p.shape).clone()
        return [out[id(p)] for p in self.module.parameters() if id(p) in out]

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


__all__ = ["ZeroAdamW", "padded_numel", "shard_bounds"]
