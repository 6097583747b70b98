"""Lab 5's benchmark: speculative decoding against target-only decoding, swept over gamma.

Both sides decode the same prompts greedily with a dense KV cache, in the same process, round by
round; speculative decoding must produce the very same tokens. Beside each time ratio the record
keeps the hardware-independent figures: the measured acceptance rate alpha, the tokens each step
yields against the i.i.d. theory (1 - alpha^(gamma+1)) / (1 - alpha) (Leviathan et al., ICML
2023, equation 1), and target forward passes per generated token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from course_runtime.speculative import bench_prompts
from course_runtime.timing import device_name, measure_interleaved

from .harness import ratio_record

GAMMAS = (1, 2, 3, 4, 6, 8)
NEW_TOKENS = 128
PROMPT_CHARS = 64
NUM_PROMPTS = 4


def forward_cost_ratio(target: torch.nn.Module, draft: torch.nn.Module, rounds: int = 5,
                       steps: int = 30) -> float:
    """Median time of one cached single-token forward of the draft over the target's (c in
    Leviathan et al.): speculative decoding can only win when c is well below 1."""
    from course_runtime.models import DenseKVCache

    def timer(model: torch.nn.Module) -> Callable[[], float]:
        @torch.no_grad()
        def once() -> float:
            cache = DenseKVCache.for_model(model, capacity=PROMPT_CHARS + steps)
            model(torch.zeros(1, PROMPT_CHARS, dtype=torch.long), cache)
            token = torch.zeros(1, 1, dtype=torch.long)
            start = time.perf_counter()
            for _ in range(steps):
                model(token, cache)
            return (time.perf_counter() - start) / steps
        return once

    times = measure_interleaved({"target": timer(target), "draft": timer(draft)}, rounds, 1)
    return float(np.median(times["draft"]) / np.median(times["target"]))


def sweep(target: torch.nn.Module, draft: torch.nn.Module, gammas: Sequence[int] = GAMMAS,
          rounds: int = 3, new_tokens: int = NEW_TOKENS,
          prompt_set: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
    """Time target-only and speculative greedy decoding of every prompt, interleaved.

    Returns {"times": {name: [seconds per round]}, "stats": {gamma: [SpeculativeStats]}}; raises
    if any speculative output differs from the target's own greedy output.
    """
    from course_reference.serving.speculative import speculative_generate
    from course_runtime.models import generate

    prompt_set = bench_prompts(NUM_PROMPTS, PROMPT_CHARS) if prompt_set is None else prompt_set
    reference = [generate(target, p, new_tokens)[0] for p in prompt_set]
    stats: dict[int, list[Any]] = {}

    def target_only() -> float:
        start = time.perf_counter()
        for p in prompt_set:
            generate(target, p, new_tokens)
        return time.perf_counter() - start

    def speculative(gamma: int) -> Callable[[], float]:
        def once() -> float:
            found = []
            start = time.perf_counter()
            for p, expected in zip(prompt_set, reference):
                out, st = speculative_generate(target, draft, p, new_tokens, gamma=gamma)
                found.append(st)
                if not torch.equal(out, expected):
                    raise AssertionError(f"gamma={gamma}: speculative greedy output differs "
                                         "from the target's greedy output")
            elapsed = time.perf_counter() - start
            stats[gamma] = found
            return elapsed
        return once

    timers: dict[str, Callable[[], float]] = {"target": target_only}
    timers.update({f"gamma={g}": speculative(g) for g in gammas})
    return {"times": measure_interleaved(timers, rounds, warmup=1), "stats": stats}


def summarise(result: dict[str, Any]) -> list[dict[str, float]]:
    """One row per gamma: speed-up, measured alpha, tokens per step (measured and in theory),
    target forwards per token."""
    from course_reference.serving.speculative import expected_tokens_per_step

    base = float(np.median(result["times"]["target"]))
    rows = []
    for gamma, stats in sorted(result["stats"].items()):
        proposed = sum(s.proposed for s in stats)
        accepted = sum(s.accepted for s in stats)
        alpha = accepted / proposed
        generated = sum(s.generated for s in stats)
        rows.append({
            "gamma": gamma,
            "speedup": base / float(np.median(result["times"][f"gamma={gamma}"])),
            "alpha": alpha,
            "tokens_per_step": generated / sum(s.steps for s in stats),
            "tokens_per_step_theory": expected_tokens_per_step(alpha, gamma),
            "target_forwards_per_token": sum(s.target_forwards for s in stats) / generated,
        })
    return rows


def plot_sweep(rows: Sequence[dict[str, float]], cost_ratio: float | None = None) -> Any:
    """Speed-up and tokens per step against gamma, measured beside the i.i.d. theory."""
    import matplotlib.pyplot as plt

    gammas = [r["gamma"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(gammas, [r["tokens_per_step"] for r in rows], "o-", label="measured")
    left.plot(gammas, [r["tokens_per_step_theory"] for r in rows], "s--",
              label="theory, measured alpha")
    left.set_xlabel("gamma (draft tokens per step)")
    left.set_ylabel("tokens per step (one target pass)")
    left.legend()
    right.plot(gammas, [r["speedup"] for r in rows], "o-", color="#C44E52", label="measured")
    if cost_ratio is not None:
        # Leviathan et al., Theorem 3.8: speed-up = E[tokens] / (gamma c + 1).
        right.plot(gammas, [r["tokens_per_step_theory"] / (r["gamma"] * cost_ratio + 1)
                            for r in rows], "s--", color="#8C8C8C",
                   label=f"theory, c = {cost_ratio:.2f}")
    right.axhline(1, color="black", lw=0.8)
    right.set_xlabel("gamma (draft tokens per step)")
    right.set_ylabel("speed-up over target-only")
    right.legend()
    fig.tight_layout()
    return fig


def run(rounds: int = 30) -> list[dict[str, Any]]:
    """The records for ``make bench``: one per gamma. Each round decodes 4 x 128 tokens per
    contender, so at most 3 rounds."""
    from course_runtime.models import load

    torch.manual_seed(0)
    target, draft = load("target"), load("draft")
    cost_ratio = forward_cost_ratio(target, draft)
    result = sweep(target, draft, rounds=min(rounds, 3))
    records = []
    for row in summarise(result):
        gamma = row["gamma"]
        records.append(ratio_record(
            f"speculative_greedy_{NUM_PROMPTS}x{NEW_TOKENS}_tokens_gamma{gamma}",
            f"speculative decoding, gamma={gamma}", "target-only decoding, dense KV cache",
            result["times"][f"gamma={gamma}"], result["times"]["target"], device=device_name(),
            draft_target_cost_ratio=cost_ratio, **row))
    return records
