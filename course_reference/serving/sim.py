"""Serving simulated: an engine's iterations timed by a roofline cost model.

The tiny GPT runs on this machine, but questions about serving a 7B model to thousands of users
(how long the first token takes, how evenly the next ones come, how many requests per second a GPU
sustains under a latency target) need a model of time. This module replays a request stream
through an iteration-level engine (Orca's continuous batching) whose every step costs what
``roofline.step_cost`` says it costs on the given hardware, at a stated fraction of the peaks.

Engine policies:

- ``"prefill-first"``: whenever prompts wait, the next step runs whole prompts and nothing else
  (vLLM's original scheduler): new requests start fast, running ones stall meanwhile.
- ``"chunked"``: every step carries all running decodes first, then fills ``token_budget`` with
  chunks of waiting prompts (Sarathi-Serve's stall-free batching, Agrawal et al., OSDI 2024).
- ``"prefill-only"`` and ``"decode-only"``: the two halves of a disaggregated deployment
  (DistServe, Zhong et al., OSDI 2024; Splitwise, Patel et al., ISCA 2024): one instance computes
  prompts and the first token, ships the KV cache, another decodes.

``pipeline_latencies`` is the queueing model of AlpaServe's placement study (Li et al., OSDI 2023):
requests flowing through a chain of first-come-first-served pipeline stages.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .roofline import DecoderShape, Hardware, StepCost

POLICIES = ("prefill-first", "chunked", "prefill-only", "decode-only")


@dataclass(frozen=True)
class EngineCost:
    """Time of one engine step: the roofline bound at ``mfu`` of peak FLOP/s and ``mbu`` of peak
    bandwidth (what real kernels reach), plus a fixed ``overhead_s`` per step (scheduling, kernel
    launches)."""

    shape: DecoderShape
    hardware: Hardware
    mfu: float = 0.5
    mbu: float = 0.8
    overhead_s: float = 0.0

    def time_of(self, tokens: int, pairs: int, kv_tokens: int) -> float:
        """Step time from totals: new tokens, (query, key) pairs attended, KV tokens moved."""
        s, hw = self.shape, self.hardware
        cost = StepCost(2 * s.matmul_params * tokens, 4 * s.n_layers * s.attn_dim * pairs,
                        s.weight_params * s.bytes_per_value, kv_tokens * s.kv_bytes_per_token)
        return (max(cost.flops / (hw.peak_flops * self.mfu),
                    cost.bytes / (hw.mem_bandwidth * self.mbu)) + self.overhead_s)

    def step_time(self, segments: Sequence[tuple[int, int]]) -> float:
        """Time of a step of ``(new, context)`` segments (as in ``roofline.step_cost``)."""
        if not segments:
            raise ValueError("step_time: a step needs at least one (new, context) segment")
        return self.time_of(*_totals(segments))

    def transfer_time(self, tokens: int, link_bandwidth: float) -> float:
        """Seconds to ship the KV cache of ``tokens`` tokens over a link of bytes/s."""
        return tokens * self.shape.kv_bytes_per_token / link_bandwidth


def _totals(segments: Sequence[tuple[int, int]]) -> tuple[int, int, int]:
    tokens = pairs = kv = 0
    for new, context in segments:
        tokens += new
        pairs += new * context + new * (new + 1) // 2
        kv += context + 2 * new
    return tokens, pairs, kv


@dataclass(frozen=True)
class SimRequest:
    """A request of the simulated stream: arrival time (s), prompt and output lengths."""

    id: int
    arrival: float
    prompt_len: int
    output_len: int


@dataclass
class Served:
    """When a request arrived and when each of its output tokens came out (seconds)."""

    request: SimRequest
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        """Time to first token."""
        return self.token_times[0] - self.request.arrival

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first (0 for a one-token answer)."""
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else 0.0

    @property
    def max_gap(self) -> float:
        """Longest wait between two consecutive tokens: the stall a reader sees."""
        return float(np.diff(self.token_times).max()) if len(self.token_times) > 1 else 0.0


def poisson_requests(rate: float, num_requests: int, *, seed: int = 0,
                     prompt_len: tuple[int, int] = (128, 2048),
                     output_len: tuple[int, int] = (32, 512)) -> list[SimRequest]:
    """Poisson arrivals at ``rate`` per second; lengths log-uniform in the given ranges."""
    if rate <= 0 or num_requests < 1:
        raise ValueError(f"need a positive rate and at least one request, got rate={rate}, "
                         f"num_requests={num_requests}")
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, num_requests))

    def lengths(low: int, high: int) -> np.ndarray:
        return np.floor(np.exp(rng.uniform(np.log(low), np.log(high + 1), num_requests)))

    prompts, outputs = lengths(*prompt_len), lengths(*output_len)
    return [SimRequest(i, float(arrivals[i]), int(prompts[i]), int(outputs[i]))
            for i in range(num_requests)]


@dataclass
class _Seq:
    served: Served
    prefilled: int = 0
    generated: int = 0

    @property
    def req(self) -> SimRequest:
        return self.served.request

    @property
    def reserved(self) -> int:
        return self.req.prompt_len + self.req.output_len


def simulate_engine(requests: Sequence[SimRequest], cost: EngineCost, *,
                    policy: str = "prefill-first", token_budget: int | None = None,
                    max_batch: int = 256, kv_capacity_tokens: int | None = None,
                    trace: list[dict] | None = None) -> dict[int, Served]:
    """Run one engine instance over ``requests`` (see the module docstring for ``policy``).

    token_budget: most tokens per step (required for ``"chunked"``; for the prefill policies it
    caps the prompt tokens batched in one step, a single longer prompt still runs alone).
    kv_capacity_tokens: KV slots of the instance; a request is admitted only when its prompt
    plus its whole output fit beside those already admitted (no preemption). ``trace``, if
    given, receives one dict per step: start, duration, prefill and decode tokens.
    For ``"decode-only"`` a request's arrival is when its KV cache lands; its first token was
    produced elsewhere, so only tokens 2.. are timed here.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
    if policy == "chunked" and not token_budget:
        raise ValueError("the chunked policy needs a token_budget (tokens per step)")
    for r in requests:
        if r.prompt_len < 1 or r.output_len < 1:
            raise ValueError(f"request {r.id}: prompt and output need at least one token, got "
                             f"{r.prompt_len} and {r.output_len}")
        if kv_capacity_tokens is not None and r.prompt_len + r.output_len > kv_capacity_tokens:
            raise ValueError(f"request {r.id} needs {r.prompt_len + r.output_len} KV slots, the "
                             f"instance has {kv_capacity_tokens}")
    capacity = math.inf if kv_capacity_tokens is None else kv_capacity_tokens
    budget_cap = math.inf if token_budget is None else token_budget
    arriving = deque(sorted(requests, key=lambda r: r.arrival))
    waiting: deque[_Seq] = deque()          # admitted to the queue, prompt not (fully) computed
    running: list[_Seq] = []                # in the KV cache
    served: dict[int, Served] = {}
    reserved = 0
    t = 0.0
    while arriving or waiting or running:
        while arriving and arriving[0].arrival <= t:
            seq = _Seq(Served(arriving.popleft()))
            if policy == "decode-only":
                seq.prefilled, seq.generated = seq.req.prompt_len, 1
            waiting.append(seq)
            served[seq.req.id] = seq.served
        if not waiting and not running:
            t = arriving[0].arrival
            continue
        # Admission into the cache, oldest first, while memory and batch slots last.
        admitted: list[_Seq] = []
        while (waiting and len(running) + len(admitted) < max_batch
               and reserved + waiting[0].reserved <= capacity):
            seq = waiting.popleft()
            reserved += seq.reserved
            admitted.append(seq)
        segments = _schedule(policy, running, admitted, budget_cap)
        # Admitted requests that got no work this step go back to the front of the queue.
        scheduled = {id(s) for s, _ in segments}
        for seq in reversed(admitted):
            if id(seq) not in scheduled and seq.prefilled == 0:
                reserved -= seq.reserved
                waiting.appendleft(seq)
            elif seq not in running:
                running.append(seq)
        if not segments:
            if not arriving:
                raise RuntimeError("the engine cannot make progress: the waiting requests do "
                                   "not fit in its KV capacity")
            t = max(t, arriving[0].arrival)
            continue
        dt = cost.step_time([(n, s.prefilled if s.prefilled < s.req.prompt_len
                              else s.req.prompt_len + s.generated - 1) for s, n in segments])
        if trace is not None:
            prefill = sum(n for s, n in segments if s.prefilled < s.req.prompt_len)
            trace.append({"start": t, "duration": dt, "prefill_tokens": prefill,
                          "decode_tokens": sum(n for _, n in segments) - prefill})
        t += dt
        for seq, n in segments:
            if seq.prefilled < seq.req.prompt_len:
                seq.prefilled += n
                if seq.prefilled < seq.req.prompt_len:
                    continue                      # a chunk: no token yet
            seq.generated += 1
            seq.served.token_times.append(t)
            if seq.generated == seq.req.output_len or policy == "prefill-only":
                running.remove(seq)
                reserved -= seq.reserved
    return served


def _schedule(policy: str, running: list[_Seq], admitted: list[_Seq], budget: float
              ) -> list[tuple[_Seq, int]]:
    """This step's (sequence, new tokens): see the policies in the module docstring."""
    prefilling = [s for s in running + admitted if s.prefilled < s.req.prompt_len]
    decoding = [(s, 1) for s in running + admitted if s.prefilled == s.req.prompt_len]
    if policy == "chunked":
        segments = decoding[:int(budget)]
        left = budget - len(segments)
        for seq in prefilling:
            if left <= 0:
                break
            n = int(min(seq.req.prompt_len - seq.prefilled, left))
            segments.append((seq, n))
            left -= n
        return segments
    if policy == "decode-only" or not prefilling:
        return decoding
    segments, total = [], 0
    for seq in prefilling:
        n = seq.req.prompt_len - seq.prefilled
        if segments and total + n > budget:
            break
        segments.append((seq, n))
        total += n
    return segments


def colocated(requests: Sequence[SimRequest], cost: EngineCost, instances: int,
              **engine: object) -> dict[int, Served]:
    """``instances`` identical engines, each doing prefill and decode; requests round-robin."""
    served: dict[int, Served] = {}
    ordered = sorted(requests, key=lambda r: r.arrival)
    for i in range(instances):
        served.update(simulate_engine(ordered[i::instances], cost, **engine))
    return served


def disaggregated(requests: Sequence[SimRequest], cost: EngineCost, prefill_instances: int,
                  decode_instances: int, *, link_bandwidth: float,
                  prefill_budget: int | None = None, decode_max_batch: int = 256,
                  decode_kv_capacity: int | None = None) -> dict[int, Served]:
    """Prefill on some instances, decode on others, the KV cache shipped in between.

    The first token comes from the prefill instance; the request then reaches a decode instance
    (round-robin) after ``transfer_time`` of its prompt's KV cache over ``link_bandwidth``."""
    first = colocated(requests, cost, prefill_instances, policy="prefill-only",
                      token_budget=prefill_budget)
    handoff = sorted((SimRequest(r.id, first[r.id].token_times[0]
                                 + cost.transfer_time(r.prompt_len, link_bandwidth),
                                 r.prompt_len, r.output_len)
                      for r in requests if r.output_len > 1), key=lambda r: r.arrival)
    later = colocated(handoff, cost, decode_instances, policy="decode-only",
                      max_batch=decode_max_batch, kv_capacity_tokens=decode_kv_capacity)
    served = {r.id: Served(r, list(first[r.id].token_times)) for r in requests}
    for rid, s in later.items():
        served[rid].token_times += s.token_times
    return served


def slo_attainment(served: dict[int, Served], ttft_slo: float, tpot_slo: float) -> float:
    """Fraction of requests whose time to first token and time per output token both meet
    their targets (DistServe's measure)."""
    ok = [s.ttft <= ttft_slo and s.tpot <= tpot_slo for s in served.values()]
    return float(np.mean(ok))


def max_rate(attainment: Callable[[float], float], rates: Sequence[float],
             target: float = 0.9) -> float:
    """The highest rate in ``rates`` (ascending) whose attainment, and every lower rate's, is
    at least ``target``: goodput, as DistServe defines it. 0 if even the lowest misses."""
    best = 0.0
    for rate in rates:
        if attainment(rate) < target:
            break
        best = rate
    return best


# --------------------------------------------------------------------------------------------
# AlpaServe: FCFS pipelines fed by bursty streams
# --------------------------------------------------------------------------------------------


def gamma_arrivals(rate: float, cv: float, duration: float, *, seed: int = 0) -> np.ndarray:
    """Arrival times in [0, duration) with Gamma-distributed gaps of mean 1/rate and
    coefficient of variation ``cv`` (cv = 1 is Poisson; larger is burstier), as AlpaServe
    models its traces."""
    if rate <= 0 or cv <= 0:
        raise ValueError(f"rate and cv must be positive, got {rate}, {cv}")
    rng = np.random.default_rng(seed)
    shape = 1 / cv**2
    gaps = rng.gamma(shape, 1 / (rate * shape), int(rate * duration * 2) + 100)
    times = np.cumsum(gaps)
    while times[-1] < duration:     # a slow stretch: draw more
        more = rng.gamma(shape, 1 / (rate * shape), len(gaps))
        times = np.concatenate([times, times[-1] + np.cumsum(more)])
    return times[times < duration]


def pipeline_latencies(arrivals: np.ndarray, stage_times: Sequence[float]) -> np.ndarray:
    """Latency of each request through FCFS stages in series, one request per stage at a time.

    A request enters stage j when it has left stage j - 1 and stage j has finished the request
    before it. One stage is a single server; S stages are a model split into a pipeline over S
    devices (AlpaServe's inter-operator parallelism), which serves S requests at once.
    """
    if not stage_times:
        raise ValueError("pipeline_latencies: need at least one stage")
    order = np.argsort(arrivals, kind="stable")
    free = [0.0] * len(stage_times)
    done = np.empty(len(arrivals))
    for i in order:
        t = float(arrivals[i])
        for j, d in enumerate(stage_times):
            t = max(t, free[j]) + d
            free[j] = t
        done[i] = t
    return done - arrivals
