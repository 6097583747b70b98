"""Data-parallel training on forked ranks: the MLP workload, a harness that trains any sharded
optimizer on it and records what each rank holds and sends, and plain single-process AdamW to
compare with.

A sharded optimizer here is any class built as ``cls(model, lr=..., weight_decay=...)`` on every
rank of a process group, that keeps its ``torch.optim.AdamW`` over the rank's shard as
``self.optimizer`` and is driven like DDP plus an optimizer in one: ``loss.backward();
opt.step(); opt.zero_grad()``. Each rank trains on its slice of a global batch; averaging the
gradients over the ranks must then give exactly what one process gets on the whole batch
(the loss is a mean, and every slice has the same size). That is why single-process AdamW is the
oracle of every stage of ZeRO, and why the bytes each rank sends (counted by
``course_runtime.distributed.comm``) can be held against the ZeRO paper's 2Ψ or 3Ψ.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..testing import assert_close
from . import comm
from .launcher import LaunchTimeout, WorkerError, launch

# The timing workload: about 530,000 parameters, batch 32 per rank.
SIZES = (256, 512, 512, 256, 10)
BATCH = 32
# The correctness workload: a few steps of a small MLP, 4 samples per rank.
LR, WEIGHT_DECAY, STEPS, SLICE = 1e-2, 0.1, 3, 4

Guard = Callable[[], contextlib.AbstractContextManager[Any]]


def mlp(sizes: Sequence[int] = SIZES, seed: int = 0) -> nn.Sequential:
    """A tanh MLP with the given widths; the same seed gives the same weights on every rank."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for m, n in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(m, n), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def num_params(sizes: Sequence[int]) -> int:
    """Ψ of ``mlp(sizes)``: every weight and bias."""
    return sum(m * n + n for m, n in zip(sizes[:-1], sizes[1:]))


def batch_for(rank: int, sizes: Sequence[int] = SIZES, batch: int = BATCH,
              step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s slice of step ``step``'s global batch (inputs, regression targets)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(batch, sizes[0], generator=g), torch.randn(batch, sizes[-1], generator=g)


def global_batches(sizes: Sequence[int], world_size: int, seed: int, steps: int = STEPS,
                   per_rank: int = SLICE) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` global batches of ``world_size * per_rank`` samples; rank r trains on rows
    ``[r * per_rank, (r + 1) * per_rank)`` of each."""
    g = torch.Generator().manual_seed(seed + 1)
    return [(torch.randn(world_size * per_rank, sizes[0], generator=g),
             torch.randn(world_size * per_rank, sizes[-1], generator=g)) for _ in range(steps)]


def train_single_process(sizes: Sequence[int], world_size: int, seed: int, steps: int = STEPS,
                         on_gradients: Callable[[nn.Module], None] | None = None
                         ) -> list[np.ndarray]:
    """Plain ``torch.optim.AdamW`` on the whole of each global batch, in one process: the
    parameters every rank of a correct sharded optimizer ends with. ``on_gradients(model)`` is
    called after each backward, before the update."""
    model = mlp(sizes, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    for x, y in global_batches(sizes, world_size, seed, steps):
        nn.functional.mse_loss(model(x), y).backward()
        if on_gradients is not None:
            on_gradients(model)
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().numpy().copy() for p in model.parameters()]


# -- what a rank holds ----------------------------------------------------------------------------

def storage_bytes(params: Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``params`` (a freed storage holds none)."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in params}
    return sum(storages.values())


def padded_bytes(params: Sequence[torch.Tensor], world_size: int) -> int:
    """Bytes of ``params`` gathered whole as one unit: their elements, padded to a multiple of
    ``world_size``."""
    numel = sum(p.numel() for p in params)
    return -(-numel // world_size) * world_size * params[0].element_size()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's per-parameter tensors (AdamW: momentum and variance; the step
    counter, a scalar, does not count)."""
    return sum(t.numel() * t.element_size() for s in optimizer.state.values()
               for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0)


def _sharded_optimizer(opt: Any, cls: Any) -> torch.optim.Optimizer:
    optimizer = getattr(opt, "optimizer", None)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise AssertionError(f"{cls.__name__} should keep its torch.optim.AdamW over this rank's "
                             "shard as `self.optimizer`")
    return optimizer


def _shard_grads(optimizer: torch.optim.Optimizer) -> np.ndarray:
    grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
             for group in optimizer.param_groups for p in group["params"]]
    return torch.cat(grads).detach().numpy().copy() if grads else np.zeros(0)


def parameters_in_forward(model: nn.Module, x: torch.Tensor,
                          guard: Guard = contextlib.nullcontext) -> list[np.ndarray]:
    """Every parameter of ``model`` as its module's forward sees it, in ``parameters()`` order.

    A ZeRO-3 optimizer frees its parameters between uses, so they are read inside each module's
    forward, after the optimizer's own pre-hooks (registered first) have gathered them; for
    parameters that stay whole this is simply their value.
    """
    captured: dict[int, np.ndarray] = {}

    def capture(module: nn.Module, args: Any) -> None:
        for p in module.parameters(recurse=False):
            # A copy first: .numpy() on the parameter itself would pin its storage.
            captured[id(p)] = p.detach().clone().numpy()

    handles = [m.register_forward_pre_hook(capture) for m in model.modules()]
    try:
        with guard(), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    params = list(model.parameters())
    missing = [i for i, p in enumerate(params)
               if id(p) not in captured or captured[id(p)].shape != tuple(p.shape)]
    if missing:
        raise AssertionError(f"parameters {missing} were not gathered (or had the wrong shape) "
                             "when their module's forward ran")
    return [captured[id(p)] for p in params]


# -- training a sharded optimizer on N ranks --------------------------------------------------

def _train_rank(rank: int, world_size: int, cls: Any, sizes: Sequence[int], seed: int,
                steps: int, guard: Guard) -> dict[str, Any]:
    model = mlp(sizes, seed=seed)
    params = list(model.parameters())
    with guard():
        opt = cls(model, lr=LR, weight_decay=WEIGHT_DECAY)
    optimizer = _sharded_optimizer(opt, cls)
    out: dict[str, Any] = {"traffic": [], "grad_shards": [], "grads_left": [],
                           "after_forward": [], "after_backward": [], "after_step": [],
                           "in_forward": []}
    # While each module's forward runs (a pre-hook registered after the optimizer's own, so it
    # sees what they gathered): the bytes of parameters held, and that module's share of them.
    in_forward: list[tuple[int, int]] = []

    def observe(module: nn.Module, args: Any) -> None:
        own = list(module.parameters(recurse=False))
        if own:
            in_forward.append((storage_bytes(params), padded_bytes(own, world_size)))

    handles = [m.register_forward_pre_hook(observe) for m in model.modules()]
    mine = slice(rank * SLICE, (rank + 1) * SLICE)
    batches = global_batches(sizes, world_size, seed, steps)
    for x, y in batches:
        in_forward.clear()
        with comm.counting() as counted, guard():
            loss = nn.functional.mse_loss(model(x[mine]), y[mine])
            out["after_forward"].append(storage_bytes(params))
            out["in_forward"].append(list(in_forward))
            loss.backward()
            out["after_backward"].append(storage_bytes(params))
            out["grads_left"].append(sum(p.grad is not None for p in params))
            opt.step()
        out["traffic"].append(dict(counted.bytes_sent))
        out["grad_shards"].append(_shard_grads(optimizer))
        out["after_step"].append(storage_bytes(params))
        with guard():
            opt.zero_grad()
    for handle in handles:
        handle.remove()
    out["state_bytes"] = optimizer_state_bytes(optimizer)
    out["params"] = parameters_in_forward(model, batches[0][0][mine], guard)
    return out


Forbidden = tuple[Sequence[str], str]  # dotted paths a check blocks, and why


def _guard(guard: Guard, forbidden: Forbidden | None) -> Guard:
    """``guard``, or with ``forbidden`` the blocking of those paths around each call (for a
    check that calls this where the submission runs, and cannot send a guard of its own)."""
    if forbidden is None:
        return guard
    from ..sandbox import blocking

    paths, reason = list(forbidden[0]), str(forbidden[1])
    return lambda: blocking(paths, reason)


def train_on_ranks(cls: Any, world_size: int, sizes: Sequence[int], seed: int = 0,
                   steps: int = STEPS, guard: Guard = contextlib.nullcontext,
                   timeout: float = 90, forbidden: Forbidden | None = None
                   ) -> list[dict[str, Any]]:
    """Train ``cls`` for ``steps`` steps of ``global_batches`` on ``world_size`` forked ranks,
    each on its slice, and return what each rank recorded, in rank order:

    ``params`` (at the end, as each module's forward sees them), ``traffic`` (bytes sent per
    step, by collective), ``grad_shards`` (the ``.grad`` of the optimizer's parameters after
    each step), ``grads_left`` (parameters still holding a ``.grad`` after each backward),
    ``after_forward`` and ``after_step`` (bytes of parameter storage held then) and
    ``state_bytes`` (the optimizer's state at the end). ``guard()`` wraps every call into
    ``cls`` (or, with ``forbidden``, blocks those paths around it). A rank that fails or hangs
    becomes an ``AssertionError`` that names it.
    """
    label = f"{cls.__name__} (MLP {'-'.join(map(str, sizes))}, N={world_size})"
    guard = _guard(guard, forbidden)
    try:
        return launch(_train_rank, world_size, cls, tuple(sizes), seed, steps, guard,
                      timeout=timeout, group_timeout=30, threads=1)
    except WorkerError as error:
        last = error.remote_traceback.strip().splitlines()[-1]
        raise AssertionError(f"{label} failed on rank {error.rank}: {last}\n"
                             f"{error.remote_traceback}") from None
    except LaunchTimeout as error:
        raise AssertionError(f"{label} did not finish: {error}") from None


def assert_sharded_training(ranks: list[dict[str, Any]], expected_params: list[np.ndarray], *,
                            stage: int, num_params: int, traffic: tuple[float, float],
                            label: str) -> None:
    """What every ZeRO stage promises, on the records of ``train_on_ranks``:

    each rank ends with ``expected_params`` (single-process AdamW), holds 1/N of the AdamW state
    (within 5 %), sends between ``traffic[0]`` and ``traffic[1]`` bytes per step (the paper's
    volume, and that volume with the padding); from stage 2 no full gradient outlives the
    backward, and at stage 3 no gathered parameter outlives the forward, the backward or the
    step, and no more than the running module's unit and one other is whole during the forward.
    """
    world_size = len(ranks)
    low, high = traffic
    passes = 3 if stage == 3 else 2
    for rank, result in enumerate(ranks):
        for i, (got, want) in enumerate(zip(result["params"], expected_params)):
            assert_close(got, want, atol=1e-5, rtol=1e-4,
                         what=f"{label}: rank {rank}, parameter {i} after "
                              f"{len(result['traffic'])} steps (against torch.optim.AdamW on "
                              "the whole batch)")

        unsharded = 2 * num_params * 4
        share = result["state_bytes"] / unsharded
        if abs(share * world_size - 1) > 0.05:
            raise AssertionError(
                f"{label}: rank {rank} holds {result['state_bytes']} bytes of AdamW state, "
                f"{share:.3f} of the unsharded {unsharded}; expected 1/{world_size} within 5 %: "
                "does every rank keep the state of its own shard only?")

        for step, sent_by_op in enumerate(result["traffic"]):
            sent = sum(sent_by_op.values())
            if not low - 1e-6 <= sent <= high + 1e-6:
                raise AssertionError(
                    f"{label}: rank {rank} sent {sent:.0f} bytes in step {step + 1} "
                    f"({dict(sent_by_op)}); ZeRO-{stage} sends {low:.0f} ({passes}Ψ (N-1)/N, "
                    f"Ψ = {num_params} fp32 parameters), up to {high:.0f} with padding. Use "
                    "course_runtime.distributed.comm for every collective, and reduce-scatter "
                    "rather than all-reduce")

        if stage >= 2 and any(result["grads_left"]):
            raise AssertionError(
                f"{label}: after the backward, {max(result['grads_left'])} parameters still "
                "hold a full .grad; ZeRO-2 reduce-scatters each gradient as soon as it is ready "
                "and drops it (set p.grad = None), keeping only this rank's shard")
        if stage == 3:
            for when, held in (("forward", result["after_forward"]),
                               ("backward", result["after_backward"]),
                               ("step", result["after_step"])):
                if any(held):
                    raise AssertionError(
                        f"{label}: rank {rank} still holds {max(held)} bytes of gathered "
                        f"parameters after the {when}; free each unit once its module has run "
                        "(and once its gradients are reduced)")
            for step, observed in enumerate(result["in_forward"]):
                units = [own for _, own in observed]
                for module, (held, own) in enumerate(observed):
                    # This module's unit, and at most one other (a prefetch), may be whole.
                    others = units[:module] + units[module + 1:]
                    allowed = own + max(others, default=0)
                    if held > allowed:
                        raise AssertionError(
                            f"{label}: rank {rank} held {held} bytes of gathered parameters "
                            f"while module {module} ran its forward in step {step + 1}, whose "
                            f"own unit is {own} bytes; ZeRO-3 gathers a unit just before its "
                            "module runs and frees it right after, so that at most one layer "
                            "(and one prefetched) is whole at a time")


def check_public_case(cls: Any, stage: int) -> None:
    """The public test of a ZeRO stage: train ``cls`` on the lab's public MLP at the world size
    its ``expected.json`` names, and hold it to ``assert_sharded_training`` with the traffic
    bounds the reference computed for it."""
    from ..testing import expected

    case = expected("zero")
    sizes, n = case["sizes"], case["world_size"]
    ranks = train_on_ranks(cls, n, sizes)
    assert_sharded_training(ranks, train_single_process(sizes, n, seed=0), stage=stage,
                            num_params=case["num_params"], traffic=case["traffic"][str(stage)],
                            label=f"Zero{stage} (MLP {'-'.join(map(str, sizes))}, N={n})")


# -- timing against PyTorch -------------------------------------------------------------------

SPEED_LR, SPEED_WEIGHT_DECAY = 1e-3, 1e-2
PEERS = {1: "DDP + ZeroRedundancyOptimizer", 2: "DDP + ZeroRedundancyOptimizer",
         3: "FSDP2 fully_shard"}


def step_timer(model: nn.Module, step: Callable[[], None], rank: int,
               sizes: Sequence[int] = SIZES) -> Callable[[], float]:
    """One training step (forward, backward, ``step()``) of ``model`` on the rank's batch,
    timed; every rank starts together, so that one's wait is not the next one's time."""
    x, y = batch_for(rank, sizes)

    def timed() -> float:
        comm.barrier()
        start = time.perf_counter()
        nn.functional.mse_loss(model(x), y).backward()
        step()
        return time.perf_counter() - start

    return timed


def zero_redundancy_timer(rank: int, sizes: Sequence[int] = SIZES
                          ) -> tuple[Callable[[], float], nn.Module, torch.optim.Optimizer]:
    """PyTorch's ZeRO-1: ``DistributedDataParallel`` plus ``ZeroRedundancyOptimizer(AdamW)``
    (gradients all-reduced by DDP, each rank updates its shard, then broadcasts it)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    model = mlp(sizes)
    wrapped = DistributedDataParallel(model)
    optimizer = ZeroRedundancyOptimizer(wrapped.parameters(), optimizer_class=torch.optim.AdamW,
                                        lr=SPEED_LR, weight_decay=SPEED_WEIGHT_DECAY)

    def step() -> None:
        optimizer.step()
        optimizer.zero_grad()

    return step_timer(wrapped, step, rank, sizes), model, optimizer


def fsdp2_timer(rank: int, sizes: Sequence[int] = SIZES) -> Callable[[], float]:
    """PyTorch's ZeRO-3: FSDP2's ``fully_shard`` on every linear layer, then on the model."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = mlp(sizes)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=SPEED_LR,
                                  weight_decay=SPEED_WEIGHT_DECAY)

    def step() -> None:
        optimizer.step()
        optimizer.zero_grad()

    return step_timer(model, step, rank, sizes)


def sharded_timer(cls: Any, rank: int, guard: Guard = contextlib.nullcontext,
                  sizes: Sequence[int] = SIZES) -> tuple[Callable[[], float], nn.Module]:
    """A step of the sharded optimizer ``cls`` on the benchmark's MLP, every call into ``cls``
    inside ``guard()``."""
    model = mlp(sizes)
    with guard():
        opt = cls(model, lr=SPEED_LR, weight_decay=SPEED_WEIGHT_DECAY)

    def step() -> None:
        with guard():
            opt.step()
            opt.zero_grad()

    return step_timer(model, step, rank, sizes), model


def _time_rank(rank: int, world_size: int, classes: dict[int, Any], rounds: int, warmup: int,
               guard: Guard) -> dict[str, Any]:
    timers: dict[str, Callable[[], float]] = {}
    models: dict[str, nn.Module] = {}
    for stage, cls in classes.items():
        timers[f"yours {stage}"], models[f"yours {stage}"] = sharded_timer(cls, rank, guard)
    if any(stage < 3 for stage in classes):
        timers["pytorch 1"], models["pytorch 1"], _ = zero_redundancy_timer(rank)
    if 3 in classes:
        timers["pytorch 3"] = fsdp2_timer(rank)
    times: dict[str, list[float]] = {name: [] for name in timers}
    for i in range(warmup + rounds):
        for name, timer in timers.items():
            elapsed = timer()
            if i >= warmup:
                times[name].append(elapsed)
    # Trained from the same weights on the same batches, ZeRO-1 and ZeRO-2 must hold what
    # ZeroRedundancyOptimizer holds: a fast step only counts when it is also right.
    difference = {}
    for stage in classes:
        if stage < 3:
            difference[stage] = max(float((p - q).detach().abs().max()) for p, q in
                                    zip(models[f"yours {stage}"].parameters(),
                                        models["pytorch 1"].parameters()))
    return {"times": times, "difference": difference}


def time_against_pytorch(classes: dict[int, Any], world_size: int = 2, rounds: int = 10,
                         warmup: int = 2, guard: Guard = contextlib.nullcontext,
                         timeout: float = 300, forbidden: Forbidden | None = None
                         ) -> dict[int, dict[str, Any]]:
    """Time a training step of each ``classes[stage]`` (your ``Zero1``, ``Zero2``, ``Zero3``)
    against PyTorch's own on the benchmark's MLP (``SIZES``, batch ``BATCH`` per rank),
    interleaved round by round in the same forked processes, one thread per rank.

    ZeRO-1 and ZeRO-2 are timed against DDP with ``ZeroRedundancyOptimizer``, ZeRO-3 against
    FSDP2. Returns, per stage: ``yours`` and ``pytorch`` (seconds per round, each round timed on
    its slowest rank), ``peer`` (PyTorch's contender) and, at stages 1-2, ``difference``: the
    largest gap between your parameters and ZeroRedundancyOptimizer's after every timed step.
    """
    label = ", ".join(f"{cls.__name__}" for cls in classes.values())
    guard = _guard(guard, forbidden)
    try:
        results = launch(_time_rank, world_size, dict(classes), rounds, warmup, guard,
                         timeout=timeout, group_timeout=60, threads=1)
    except WorkerError as error:
        last = error.remote_traceback.strip().splitlines()[-1]
        raise AssertionError(f"timing {label} failed on rank {error.rank}: {last}") from None
    except LaunchTimeout as error:
        raise AssertionError(f"timing {label} did not finish: {error}") from None

    def slowest(name: str) -> list[float]:
        return [max(r["times"][name][i] for r in results) for i in range(rounds)]

    table = {}
    for stage in classes:
        peer = "pytorch 3" if stage == 3 else "pytorch 1"
        table[stage] = {"yours": slowest(f"yours {stage}"), "pytorch": slowest(peer),
                        "peer": PEERS[stage],
                        "difference": max(r["difference"][stage] for r in results)
                        if stage < 3 else None}
    return table


def speed_table(classes: dict[int, Any], world_size: int = 2, rounds: int = 5) -> list[dict]:
    """``time_against_pytorch`` as rows for a table: median ms of yours and of PyTorch's, and
    the ratio (below 1: yours is faster)."""
    rows = []
    for stage, t in time_against_pytorch(classes, world_size, rounds).items():
        yours, theirs = float(np.median(t["yours"])), float(np.median(t["pytorch"]))
        rows.append({"stage": f"ZeRO-{stage}", "PyTorch": t["peer"], "world_size": world_size,
                     "yours (ms)": 1e3 * yours, "PyTorch (ms)": 1e3 * theirs,
                     "ratio": yours / theirs, "max |yours - PyTorch|": t["difference"]})
    return rows


__all__ = ["BATCH", "PEERS", "SIZES", "assert_sharded_training", "batch_for",
           "check_public_case", "fsdp2_timer", "global_batches", "mlp", "num_params",
           "optimizer_state_bytes", "parameters_in_forward", "sharded_timer", "speed_table",
           "step_timer", "storage_bytes", "time_against_pytorch", "train_on_ranks",
           "train_single_process", "zero_redundancy_timer"]
