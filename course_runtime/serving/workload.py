"""The requests a server is given (``Request``, ``request_stream``), and what serving them
produced and cost (``ServeResult``), the same for every server so that they can be compared."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Request:
    """A prompt, how many tokens to generate, and the step at which the request arrives."""

    id: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    arrival: int = 0

    @property
    def max_len(self) -> int:
        return len(self.prompt) + self.max_new_tokens


def request_stream(num_requests: int, vocab_size: int, *, seed: int = 0,
                   prompt_len: tuple[int, int] = (4, 96), output_len: tuple[int, int] = (4, 160),
                   arrivals_per_step: float | None = None) -> list[Request]:
    """``num_requests`` requests with lengths drawn log-uniformly from the given ranges.

    Log-uniform lengths give many short requests and a long tail, the shape of real chat traces
    (ShareGPT, as used by the vLLM paper, section 6.1). With ``arrivals_per_step`` the requests
    arrive as a Poisson process on the step clock; without it they are all there at step 0.
    """
    rng = np.random.default_rng(seed)

    def lengths(low: int, high: int) -> np.ndarray:
        return np.floor(np.exp(rng.uniform(np.log(low), np.log(high + 1), num_requests))
                        ).astype(int)

    prompts, outputs = lengths(*prompt_len), lengths(*output_len)
    if arrivals_per_step:
        arrival = np.floor(np.cumsum(rng.exponential(1 / arrivals_per_step, num_requests)))
    else:
        arrival = np.zeros(num_requests)
    return [Request(i, tuple(int(t) for t in rng.integers(1, vocab_size, prompts[i])),
                    int(outputs[i]), int(arrival[i])) for i in range(num_requests)]


@dataclass
class ServeResult:
    """What a server produced and what it cost.

    ``steps`` counts model calls, the hardware-independent cost of the schedule;
    ``computed_tokens`` counts token positions the model processed, padding and recomputation
    included; ``cached_tokens`` those a prefix cache spared it; ``kv_waste`` is, per finished
    request, the fraction of the KV slots reserved for it that never held a token.
    """

    outputs: dict[int, list[int]]
    steps: int = 0
    computed_tokens: int = 0
    cached_tokens: int = 0
    preemptions: int = 0
    wall_s: float = 0.0
    kv_waste: dict[int, float] = field(default_factory=dict)
    finished_step: dict[int, int] = field(default_factory=dict)
    trace: list[dict] = field(default_factory=list)

    @property
    def generated_tokens(self) -> int:
        return sum(len(o) for o in self.outputs.values())

    @property
    def mean_kv_waste(self) -> float:
        return float(np.mean(list(self.kv_waste.values())))

