"""What the pipeline lab gives you: the vocabulary of a schedule, a check of its form, the lab's
model, and the harnesses that run a pipeline worker on forked ranks and time it against
``torch.distributed.pipelining``.

A schedule is a list per stage (one stage per rank) of ``Action``s, run in order:

    F(i) / B(i)               forward / backward of microbatch i on this stage
    send_fwd(i) / recv_fwd(i) the activation of microbatch i, to the next stage / from the previous
    send_bwd(i) / recv_bwd(i) the gradient of that activation, to the previous / from the next

With ``chunks = v > 1`` (the interleaved schedule of Narayanan et al., SC 2021, section 2.2)
each rank holds v model chunks: chunk c of rank r is model stage ``c * p + r`` of ``p * v``, and
every action names its chunk.

- ``Action``, ``Schedule``, ``ScheduleError``, ``model_stage``, ``peer_of`` (the rank on the other
  side of a send or receive, and the action it must post to match), ``bubble_formula`` (the idle
  share of a flushed pipeline, (p - 1) / (v m + p - 1));
- ``normalize``, ``structure_problems`` and ``check_structure``: a schedule's *form* (known ops,
  indices in range, every microbatch's F and B once per stage with the sends and receives its
  neighbours need, each action after what it depends on on its own stage). Whether a
  well-formed schedule can finish under blocking sends is not checked here: that is the lab's
  ``find_deadlock``;
- ``make_stage``, ``lab_batch``: the lab's model stages and microbatches, and
  ``unsplit_gradients``, what every schedule must reproduce (the unsplit model in one process);
- ``run_worker``, ``assert_unsplit_gradients``, ``check_worker``: a worker on forked ranks, one
  schedule after another, its gradients held against the unsplit model's;
- ``compare_with_torch`` and ``measured_bubble``: step times and measured bubble of a worker
  against PyTorch's ``Schedule1F1B`` / ``ScheduleGPipe`` on the same stages, in the same
  processes, interleaved, one thread per rank, on the benchmark's MLP stages or on *emulated*
  stages (``emulated_stage``) whose forward holds the "device" for a fixed wall time without
  using a core.

A worker is any function ``worker(rank, world_size, schedule, make_stage, microbatches, targets,
loss_fn)`` that runs ``schedule[rank]`` and returns this rank's gradients, ``{name: grad}`` as in
``make_stage(rank).named_parameters()``. The schedules themselves, the deadlock check, the
simulator and the executor are what the lab asks you to write; they are not here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .distributed import LaunchTimeout, WorkerError, launch
from .testing import assert_close

COMPUTE = ("F", "B")
SENDS = {"send_fwd": "recv_fwd", "send_bwd": "recv_bwd"}
RECVS = {recv: send for send, recv in SENDS.items()}
OPS = (*COMPUTE, *SENDS, *RECVS)


class Action(NamedTuple):
    """One step of a stage's schedule: ``Action("F", 3)`` is the forward of microbatch 3."""

    op: str
    microbatch: int
    chunk: int = 0

    def __str__(self) -> str:
        chunk = f", chunk {self.chunk}" if self.chunk else ""
        return f"{self.op}({self.microbatch}{chunk})"


Schedule = list[list[Action]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Guard = Callable[[], contextlib.AbstractContextManager[Any]]


class ScheduleError(ValueError):
    """A schedule that is malformed, breaks a dependency, or deadlocks; the message says where."""


# ----------------------------------------------------------------------------------------------
# Stages, neighbours, the bubble
# ----------------------------------------------------------------------------------------------

def model_stage(rank: int, chunk: int, num_ranks: int) -> int:
    """Which of the p * v model stages chunk ``chunk`` of rank ``rank`` runs (Megatron's layout)."""
    return chunk * num_ranks + rank


def peer_of(action: Action, rank: int, num_ranks: int) -> tuple[int, Action]:
    """The rank on the other side of a send or receive, and the action it must post to match."""
    stage = model_stage(rank, action.chunk, num_ranks)
    forward = action.op in ("send_fwd", "recv_fwd")
    sending = action.op in SENDS
    other = stage + 1 if forward == sending else stage - 1
    partner = SENDS[action.op] if sending else RECVS[action.op]
    return other % num_ranks, Action(partner, action.microbatch, other // num_ranks)


def bubble_formula(num_stages: int, num_microbatches: int, chunks: int = 1) -> float:
    """The idle fraction of a flushed pipeline with uniform stages: (p - 1) / (v m + p - 1)."""
    return (num_stages - 1) / (chunks * num_microbatches + num_stages - 1)


# ----------------------------------------------------------------------------------------------
# The form of a schedule
# ----------------------------------------------------------------------------------------------

def normalize(schedule: Sequence[Sequence[Any]]) -> Schedule:
    """Turn tuples like ``("F", 3)`` into ``Action``s, rejecting anything else with its place."""
    if not isinstance(schedule, (list, tuple)) or not schedule:
        raise ScheduleError(f"a schedule is a non-empty list (one list of actions per stage), "
                            f"got {type(schedule).__name__}")
    result: Schedule = []
    for s, actions in enumerate(schedule):
        if not isinstance(actions, (list, tuple)):
            raise ScheduleError(f"stage {s}: expected a list of actions, got "
                                f"{type(actions).__name__}")
        stage = []
        for k, a in enumerate(actions):
            if not isinstance(a, (tuple, list)) or len(a) not in (2, 3):
                raise ScheduleError(f"stage {s}, action {k}: expected (op, microbatch) or "
                                    f"(op, microbatch, chunk), got {a!r}")
            if a[0] not in OPS:
                raise ScheduleError(f"stage {s}, action {k}: unknown op {a[0]!r}; the ops are "
                                    f"{', '.join(OPS)}")
            stage.append(Action(str(a[0]), int(a[1]), int(a[2]) if len(a) == 3 else 0))
        result.append(stage)
    return result


# On a stage, what each action needs to have run before it (and B needs its F).
_NEEDS = {"F": "recv_fwd", "send_fwd": "F", "B": "recv_bwd", "send_bwd": "B"}


def structure_problems(schedule: Sequence[Sequence[Any]], num_microbatches: int,
                       chunks: int = 1) -> list[str]:
    """Everything wrong with a schedule's form, most basic first: malformed actions, indices out
    of range, missing or repeated work (every stage runs each microbatch's F and B once, with the
    receives and sends its neighbours post the partners of), and an action placed before what it
    needs on its own stage. Empty when well formed; whether it can *finish* is not checked."""
    try:
        plan = normalize(schedule)
    except ScheduleError as error:
        return [str(error)]
    p, m, v = len(plan), num_microbatches, chunks
    stages = p * v
    problems = []
    for r, actions in enumerate(plan):
        seen: dict[Action, int] = {}
        for k, a in enumerate(actions):
            if not 0 <= a.microbatch < m or not 0 <= a.chunk < v:
                problems.append(f"stage {r}, action {k} {a}: microbatch must be in [0, {m}) and "
                                f"chunk in [0, {v})")
                continue
            if a in seen:
                problems.append(f"stage {r}: {a} appears twice (positions {seen[a]} and {k})")
            seen.setdefault(a, k)
        for c in range(v):
            s = model_stage(r, c, p)
            for i in range(m):
                problems += _microbatch_problems(seen, r, s, stages, i, c)
    return problems


def _microbatch_problems(seen: dict[Action, int], rank: int, stage: int, stages: int,
                         i: int, c: int) -> list[str]:
    """What is missing, extra or out of order for microbatch ``i`` of chunk ``c`` on a rank."""
    problems = []
    expected = ["F", "B"] + (["recv_fwd", "send_bwd"] if stage > 0 else []) + \
               (["send_fwd", "recv_bwd"] if stage < stages - 1 else [])
    for op in expected:
        if Action(op, i, c) not in seen:
            problems.append(f"stage {rank}: {Action(op, i, c)} is missing")
    unexpected = {"recv_fwd", "send_bwd", "send_fwd", "recv_bwd"} - set(expected)
    for op in sorted(unexpected):
        if Action(op, i, c) in seen:
            where = "first" if op in ("recv_fwd", "send_bwd") else "last"
            problems.append(f"stage {rank}: {Action(op, i, c)} at position "
                            f"{seen[Action(op, i, c)]}, but the {where} stage has "
                            f"no neighbour on that side")
    for op, before in [*_NEEDS.items(), ("B", "F")]:
        a, b = Action(op, i, c), Action(before, i, c)
        if a in seen and b in seen and seen[b] > seen[a]:
            problems.append(f"stage {rank}: {a} at position {seen[a]} comes before "
                            f"{b} at position {seen[b]}, which it needs")
    return problems


def invalid(problems: Sequence[str]) -> ScheduleError:
    """The error that lists a schedule's problems (the first eight, and how many more)."""
    shown = list(problems[:8]) + ([f"... and {len(problems) - 8} more"]
                                  if len(problems) > 8 else [])
    return ScheduleError("invalid pipeline schedule:\n  " + "\n  ".join(shown))


def check_structure(schedule: Sequence[Sequence[Any]], num_microbatches: int,
                    chunks: int = 1) -> Schedule:
    """Raise ``ScheduleError`` listing what is wrong with the schedule's form (see
    ``structure_problems``); return it as ``Action``s. A deadlock is not looked for."""
    problems = structure_problems(schedule, num_microbatches, chunks)
    if problems:
        raise invalid(problems)
    return normalize(schedule)


# ----------------------------------------------------------------------------------------------
# The lab's model
# ----------------------------------------------------------------------------------------------

WIDTH = 8


def make_stage(stage: int) -> nn.Module:
    """The lab's model stage s: Linear(8, 8) and tanh, seeded by s (every process builds the
    same one). Activations keep the shape of a microbatch, (rows, 8)."""
    torch.manual_seed(3000 + stage)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh())


def lab_batch(m: int, rows: int = 4, seed: int = 0) -> tuple[list[torch.Tensor],
                                                              list[torch.Tensor]]:
    """m microbatches of ``rows`` rows, and their regression targets."""
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(rows, WIDTH, generator=g) for _ in range(m)],
            [torch.randn(rows, WIDTH, generator=g) for _ in range(m)])


def unsplit_gradients(make_stage: Callable[[int], nn.Module], num_model_stages: int,
                      microbatches: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                      loss_fn: LossFn = nn.functional.mse_loss
                      ) -> tuple[dict[str, torch.Tensor], float]:
    """The unsplit model's gradients and loss on the whole batch, in one process: what every
    pipeline schedule must reproduce (loss = mean over microbatches of each one's loss).
    Gradients are named ``"<stage>.<name>"``, as in ``nn.Sequential`` of all stages."""
    model = nn.Sequential(*[make_stage(s) for s in range(num_model_stages)])
    losses = [loss_fn(model(x), y) for x, y in zip(microbatches, targets)]
    loss = torch.stack(losses).mean()
    loss.backward()
    return ({name: p.grad.detach().clone() for name, p in model.named_parameters()},
            float(loss.detach()))


# ----------------------------------------------------------------------------------------------
# A worker on forked ranks, against the unsplit model
# ----------------------------------------------------------------------------------------------

Case = tuple[str, Sequence[Sequence[Any]], list[torch.Tensor], list[torch.Tensor]]


def _worker_cases(rank: int, world_size: int, worker: Callable[..., Any],
                  cases: list[tuple[str, Schedule, list[torch.Tensor], list[torch.Tensor]]]
                  ) -> list[dict[str, torch.Tensor]]:
    results = []
    for name, schedule, xs, ys in cases:
        grads = worker(rank, world_size, schedule, make_stage, xs, ys, nn.functional.mse_loss)
        try:
            grads = dict(grads)
        except (TypeError, ValueError):
            raise TypeError(f"{name}: pipeline_worker should return this rank's gradients, "
                            f"{{name: grad}} as in stage.named_parameters(); it returned "
                            f"{type(grads).__name__}") from None
        missing = sorted(str(param) for param, g in grads.items() if g is None)
        if missing:
            raise TypeError(f"{name}: the gradients of {missing} are None: did their backward "
                            "run on this rank?")
        results.append({str(param): torch.as_tensor(g).detach().clone()
                        for param, g in grads.items()})
    return results


def run_worker(worker: Callable[..., Any], world_size: int, cases: Sequence[Case],
               guard: Guard = contextlib.nullcontext, timeout: float = 90.0
               ) -> list[list[dict[str, torch.Tensor]]]:
    """Run ``worker`` on ``world_size`` forked ranks (one thread each) with the lab's
    ``make_stage`` and mean-squared error, once per case ``(name, schedule, microbatches,
    targets)``, in one launch; returns, per rank, per case, the gradients it returned. A hang or a
    crash is an ``AssertionError`` that names the rank and what it was waiting in."""
    plans = [(name, normalize(schedule), list(xs), list(ys)) for name, schedule, xs, ys in cases]
    try:
        with guard():
            return launch(_worker_cases, world_size, worker, plans, timeout=timeout,
                          group_timeout=20, threads=1)
    except LaunchTimeout as error:
        raise AssertionError(f"pipeline_worker did not finish on {world_size} processes: "
                             f"{error}") from None
    except WorkerError as error:
        raise AssertionError(f"pipeline_worker failed on rank {error.rank} with "
                             f"{error.error_type}:\n{error.remote_traceback[-1500:]}") from None


def assert_unsplit_gradients(results: Sequence[Sequence[dict[str, torch.Tensor]]],
                             cases: Sequence[Case], world_size: int) -> None:
    """Each rank's gradients, case by case, against ``unsplit_gradients`` of the lab's model."""
    for index, (name, _, xs, ys) in enumerate(cases):
        expected, _ = unsplit_gradients(make_stage, world_size, xs, ys)
        for rank in range(world_size):
            got = results[rank][index]
            for param, grad in expected.items():
                stage, _, local = param.partition(".")
                if int(stage) != rank:
                    continue
                if local not in got:
                    raise AssertionError(f"{name}: rank {rank} returned no gradient for "
                                         f"{local!r} (it returned {sorted(got)})")
                actual = got[local].numpy()
                hint = ""
                scale = float(np.sum(grad.numpy() ** 2))
                ratio = float(np.sum(actual * grad.numpy()) / max(scale, 1e-30))
                if len(xs) > 1 and abs(ratio - len(xs)) < 0.01 * len(xs):
                    hint = (f" (yours is {len(xs)}x too large: the loss of the batch is the "
                            f"mean over microbatches, so divide each microbatch's loss by m)")
                assert_close(actual, grad.numpy(), what=f"{name}: gradient of stage {rank}'s "
                             f"{local}{hint}", atol=1e-6, rtol=1e-4)


def check_worker(worker: Callable[..., Any], world_size: int, cases: Sequence[Case],
                 guard: Guard = contextlib.nullcontext) -> None:
    """Run ``worker`` on every case and compare its gradients with the unsplit model's."""
    assert_unsplit_gradients(run_worker(worker, world_size, cases, guard), cases, world_size)


# ----------------------------------------------------------------------------------------------
# Timing against torch.distributed.pipelining
# ----------------------------------------------------------------------------------------------

# The timing workload: 4 layers of 256 per stage, a batch of 64 cut into the microbatches.
MLP_WIDTH, MLP_LAYERS, BATCH = 256, 4, 64

Step = Callable[[], Any]
Runner = Callable[..., Step]


def mlp_stage(stage: int, width: int = MLP_WIDTH, layers: int = MLP_LAYERS) -> nn.Module:
    """One pipeline stage of the timing workload: ``layers`` Linear + Tanh of ``width``, seeded."""
    torch.manual_seed(100 + stage)
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.Tanh())])


class _Occupy(torch.autograd.Function):
    """Identity that holds the device for ``forward_s`` seconds forward and twice that backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, forward_s: float) -> torch.Tensor:
        ctx.forward_s = forward_s
        time.sleep(forward_s)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        time.sleep(2 * ctx.forward_s)
        return grad.clone(), None


class EmulatedStage(nn.Module):
    """A stage that costs a fixed wall time per microbatch (``f`` forward, ``2f`` backward)
    without using a core (a sleep, as a GPU kernel occupies the GPU and not the CPU), so that
    several ranks on a small machine measure the schedule and not the machine's core count."""

    def __init__(self, width: int, forward_s: float, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(width, width)
        self.forward_s = forward_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Occupy.apply(self.linear(x), self.forward_s)


def emulated_stage(forward_s: float, width: int = 16) -> Callable[[int], nn.Module]:
    """``make_stage`` for emulated-device stages of the given forward time."""
    def make(stage: int) -> nn.Module:
        return EmulatedStage(width, forward_s, seed=200 + stage)
    return make


def split_batch(m: int, width: int, batch: int, seed: int = 0
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A batch of ``batch`` rows of ``width`` and its targets, cut into m microbatches."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batch, width, generator=g), torch.randn(batch, width, generator=g)
    return list(x.chunk(m)), list(y.chunk(m))


def torch_pipeline_step(rank: int, world_size: int, make_stage: Callable[[int], nn.Module],
                        microbatches: list[torch.Tensor], targets: list[torch.Tensor],
                        kind: str = "1f1b") -> Step:
    """One step of ``torch.distributed.pipelining``'s ``Schedule1F1B`` (or ``ScheduleGPipe``)
    on this rank, the stage built once; the step returns this stage's gradients (PyTorch divides
    them by the number of microbatches: the loss of the batch is the mean)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    module = make_stage(rank)
    stage = PipelineStage(module, rank, world_size, torch.device("cpu"))
    schedule = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[kind]
    runner = schedule(stage, n_microbatches=len(microbatches), loss_fn=nn.functional.mse_loss)
    x, y = torch.cat(microbatches), torch.cat(targets)

    def step() -> dict[str, torch.Tensor]:
        module.zero_grad(set_to_none=True)
        if rank == 0:
            runner.step(x)
        elif rank == world_size - 1:
            runner.step(target=y, losses=[])
        else:
            runner.step()
        return {name: p.grad for name, p in module.named_parameters()}

    return step


def worker_runner(worker: Callable[..., Any]) -> Runner:
    """The step of a worker: one call of ``worker`` with the whole schedule (it builds its stage
    on every call, as the lab's ``pipeline_worker`` does)."""
    def prepare(rank: int, world_size: int, schedule: Schedule,
                make_stage: Callable[[int], nn.Module], microbatches: list[torch.Tensor],
                targets: list[torch.Tensor]) -> Step:
        def step() -> Any:
            return worker(rank, world_size, schedule, make_stage, microbatches, targets,
                          nn.functional.mse_loss)
        return step
    return prepare


def _timed(step: Step) -> Callable[[], tuple[float, Any]]:
    def timer() -> tuple[float, Any]:
        dist.barrier()
        start = time.perf_counter()
        out = step()
        return time.perf_counter() - start, out
    return timer


def _difference(yours: Any, theirs: dict[str, torch.Tensor]) -> float:
    """The largest difference between two sets of gradients, relative to the largest of
    ``theirs``; infinite when ``yours`` is not a dict with every one of their names."""
    if not isinstance(yours, dict) or set(theirs) - set(yours):
        return float("inf")
    try:
        worst = max(float((torch.as_tensor(yours[name]) - g).abs().max())
                    for name, g in theirs.items())
    except (TypeError, RuntimeError):  # a missing gradient (None), or one of the wrong shape
        return float("inf")
    scale = max(float(g.abs().max()) for g in theirs.values())
    return worst / max(scale, 1e-30)


def _compare(rank: int, world_size: int, runner: Runner, plan: Schedule,
             make_stage: Callable[[int], nn.Module], m: int, width: int, batch: int, kind: str,
             rounds: int) -> dict[str, Any]:
    xs, ys = split_batch(m, width, batch)
    timers = {"yours": _timed(runner(rank, world_size, plan, make_stage, xs, ys)),
              "torch": _timed(torch_pipeline_step(rank, world_size, make_stage, xs, ys, kind))}
    times: dict[str, list[float]] = {name: [] for name in timers}
    last: dict[str, Any] = {}
    for round_ in range(rounds + 2):
        for name, timer in timers.items():
            seconds, last[name] = timer()
            if round_ >= 2:  # two warm-up rounds
                times[name].append(seconds)
    return {**times, "difference": _difference(last["yours"], last["torch"])}


def _plan(schedule: Sequence[Sequence[Any]] | Callable[[int, int], Any], world_size: int,
          m: int) -> Schedule:
    plan = schedule(world_size, m) if callable(schedule) else schedule
    if not isinstance(plan, (list, tuple)) or len(plan) != world_size:
        size = f" of length {len(plan)}" if hasattr(plan, "__len__") else ""
        raise ScheduleError(f"expected a schedule with one list of actions for each of "
                            f"{world_size} stages, got {type(plan).__name__}{size}")
    return check_structure(plan, m)


def compare_with_torch(worker: Callable[..., Any] | None,
                       schedule: Sequence[Sequence[Any]] | Callable[[int, int], Any],
                       world_size: int = 2, num_microbatches: int = 4, kind: str = "1f1b",
                       rounds: int = 6, make_stage: Callable[[int], nn.Module] = mlp_stage,
                       width: int = MLP_WIDTH, batch: int = BATCH, timeout: float = 120.0,
                       runner: Runner | None = None) -> dict[str, Any]:
    """Step times of ``worker`` running ``schedule`` (a schedule, or a function ``(num_stages,
    num_microbatches) -> schedule``) and of PyTorch's schedule of the same ``kind`` ("1f1b" or
    "gpipe"), on the same stages, interleaved round by round in the same ``world_size`` processes
    with one thread each, after two warm-up rounds.

    Returns ``{"yours": [seconds], "torch": [seconds], "difference": float}`` (rank 0's clock),
    where ``difference`` is the largest difference between the gradients of the last step of
    each, relative to PyTorch's largest gradient, over all ranks: a fast step only counts when it
    is right. The schedule's form is checked first; a schedule that deadlocks hangs until
    ``timeout``. ``runner`` (instead of a worker) builds a step on each rank from ``(rank,
    world_size, schedule, make_stage, microbatches, targets)``.
    """
    if runner is None:
        if worker is None:
            raise ValueError("give a worker (or a runner)")
        runner = worker_runner(worker)
    plan = _plan(schedule, world_size, num_microbatches)
    results = launch(_compare, world_size, runner, plan, make_stage, num_microbatches, width,
                     batch, kind, rounds, timeout=timeout, group_timeout=min(timeout, 30.0),
                     threads=1)
    return {"yours": results[0]["yours"], "torch": results[0]["torch"],
            "difference": max(r["difference"] for r in results)}


def measured_bubble(worker: Callable[..., Any] | None,
                    schedule: Sequence[Sequence[Any]] | Callable[[int, int], Any],
                    world_size: int = 4, num_microbatches: int = 8, kind: str = "1f1b",
                    forward_s: float = 0.01, rounds: int = 3, timeout: float = 120.0,
                    runner: Runner | None = None) -> dict[str, float]:
    """Bubble of ``worker`` and of PyTorch's schedule on emulated stages (forward ``forward_s``,
    backward twice that, of wall time): 1 - m (f + b) / fastest step time. A loaded machine only
    ever adds time to a step, so the fastest round is the closest to the schedule's own bubble
    (a median let a busy grader push a right 1F1B over the bound). Also returns the gradients'
    ``difference``, as ``compare_with_torch`` does."""
    times = compare_with_torch(worker, schedule, world_size, num_microbatches, kind, rounds,
                               emulated_stage(forward_s), width=16, timeout=timeout,
                               runner=runner)
    work = num_microbatches * 3 * forward_s
    return {"yours": 1.0 - work / min(times["yours"]),
            "torch": 1.0 - work / min(times["torch"]),
            "difference": times["difference"]}
