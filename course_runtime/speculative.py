"""What the speculative-decoding lab gives you: the counters a decoder reports, the prompts its
cost is measured on, and the two measurements of that cost against target-only decoding.

- ``SpeculativeStats``: the counts of one speculative generation (steps, target and draft
  forward passes, draft tokens proposed and accepted) and the acceptance rate alpha;
- ``bench_prompts``: fixed prompts from the held-out end of the book (the models never saw them);
- ``forwards_per_token``: target forward passes per generated token of any decoder, counted on
  the target model itself, not taken from the decoder's own stats (a hardware-independent cost:
  target-only decoding runs 1.0);
- ``speed_table``: median seconds for a decoder and for target-only ``generate`` on the same
  prompts, timed interleaved in one process on one thread;
- ``toy_gpt``: a small random GPT, seeded, cheap enough to sample thousands of times (for tests
  of a sampler, where the exact distribution of a few tokens can be enumerated).

A decoder here is any function called as ``decoder(target, draft, prompt, max_new_tokens,
gamma=gamma)`` that returns the new token ids (a list, a tensor, or ``(tokens, stats)``).
Greedy verification, the rejection-sampling rule and the decoding loop with its cache rollback
(Leviathan, Kalman and Matias, ICML 2023) are what the lab asks you to write; they are not here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .models import GPT, GPTConfig, generate, load, load_corpus, load_tokenizer
from .models.tokenizer import split_corpus
from .timing import measure_interleaved, pinned_threads

Decoder = Callable[..., Any]


@dataclass
class SpeculativeStats:
    """Counts of one speculative generation (hardware-independent measures of its cost)."""

    gamma: int
    generated: int = 0
    steps: int = 0               # draft-then-verify rounds
    target_forwards: int = 0     # including the prompt's prefill
    draft_forwards: int = 0
    proposed: int = 0            # draft tokens offered to the target
    accepted: int = 0            # draft tokens the target kept
    accepted_per_step: list[int] = field(default_factory=list)

    @property
    def alpha(self) -> float:
        """Measured acceptance rate: accepted / proposed draft tokens."""
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def target_forwards_per_token(self) -> float:
        return self.target_forwards / self.generated if self.generated else float("nan")


def bench_prompts(num: int = 2, chars: int = 48) -> list[list[int]]:
    """``num`` prompts of ``chars`` characters, evenly spaced through the held-out end of the
    book (the models never trained on them), as token ids."""
    _, val = split_corpus(load_corpus())
    tokenizer = load_tokenizer()
    starts = np.linspace(0, len(val) - chars - 1, num).astype(int)
    return [tokenizer.encode(val[s:s + chars]) for s in starts]


def target_only(target: GPT, draft: GPT, prompt: Sequence[int], max_new_tokens: int,
                gamma: int = 0) -> torch.Tensor:
    """Plain greedy decoding with the target alone (``generate``), called as a decoder is: the
    baseline speculative decoding is measured against. The draft and gamma are ignored."""
    return generate(target, list(prompt), max_new_tokens)[0]


class ForwardCounter:
    """Counts the forward passes of ``model`` (``count``) until ``close()``.

    The hook sits on the token embedding, which every forward pass runs exactly once, so a pass
    is counted whether the decoder calls ``model(...)`` or ``model.forward(...)``.
    """

    def __init__(self, model: GPT):
        self.count = 0
        self._handle = model.embed.register_forward_pre_hook(self._seen)

    def _seen(self, module: torch.nn.Module, inputs: Any) -> None:
        self.count += 1

    def close(self) -> None:
        self._handle.remove()


@contextlib.contextmanager
def counting_forwards(model: GPT) -> Iterator[ForwardCounter]:
    """A ``ForwardCounter`` of ``model``'s forward passes in the block (``counter.count``)."""
    counter = ForwardCounter(model)
    try:
        yield counter
    finally:
        counter.close()


def _new_tokens(result: Any, what: str) -> list[int]:
    """The token ids a decoder returned: a list, a tensor, or the first item of a tuple."""
    if isinstance(result, tuple) and result:
        result = result[0]
    if isinstance(result, torch.Tensor):
        return [int(t) for t in result.flatten().tolist()]
    if isinstance(result, (list, tuple)):
        return [int(t) for t in result]
    raise ValueError(f"{what} returned {type(result).__name__}; expected the new token ids "
                     "(a list or a tensor), or (tokens, stats)")


def _models(target: GPT | None, draft: GPT | None) -> tuple[GPT, GPT]:
    return (load("target") if target is None else target,
            load("draft") if draft is None else draft)


def forwards_per_token(decoder: Decoder, gamma: int = 4, new_tokens: int = 96,
                       target: GPT | None = None, draft: GPT | None = None,
                       prompts: Sequence[Sequence[int]] | None = None) -> float:
    """Target forward passes per generated token when ``decoder`` decodes ``new_tokens`` after
    each prompt (default: the shipped models and ``bench_prompts()``).

    The passes are counted on the target model (``counting_forwards``), the prompt's prefill
    included, so the figure does not depend on the decoder's own bookkeeping. Target-only
    decoding scores 1.0; speculative decoding at gamma = 4 needs well under half of that.
    """
    target, draft = _models(target, draft)
    prompts = bench_prompts() if prompts is None else prompts
    name = getattr(decoder, "__name__", "the decoder")
    forwards = generated = 0
    for prompt in prompts:
        with counting_forwards(target) as counter:
            tokens = _new_tokens(decoder(target, draft, list(prompt), new_tokens, gamma=gamma),
                                 name)
        if len(tokens) != new_tokens:
            raise ValueError(f"{name} was asked for {new_tokens} new tokens and returned "
                             f"{len(tokens)}: forward passes per token mean nothing until it "
                             "returns exactly as many as asked")
        forwards += counter.count
        generated += len(tokens)
    return forwards / generated


def speed_table(decoder: Decoder, gamma: int = 4, rounds: int = 3, new_tokens: int = 96,
                target: GPT | None = None, draft: GPT | None = None,
                prompts: Sequence[Sequence[int]] | None = None,
                others: Mapping[str, Decoder] | None = None,
                threads: int = 1) -> dict[str, float]:
    """Seconds to decode ``new_tokens`` after every prompt, the fastest of ``rounds``:
    target-only decoding (``"target-only"``), ``decoder`` (``"yours"``) and any ``others``
    (name: decoder).

    The contenders run round by round, interleaved, after one warm-up round, with ``threads``
    BLAS and torch threads, so that load on the machine and its core count affect them alike:
    compare the times as ratios. Load only ever adds time, so each contender's fastest round
    is the closest to its own cost (a median of three let a busy grading machine put a right
    decoder at three times the reference's time).
    """
    target, draft = _models(target, draft)
    prompts = [list(p) for p in (bench_prompts() if prompts is None else prompts)]

    def timer(fn: Decoder) -> Callable[[], float]:
        def once() -> float:
            start = time.perf_counter()
            for prompt in prompts:
                fn(target, draft, prompt, new_tokens, gamma=gamma)
            return time.perf_counter() - start
        return once

    contenders = {"target-only": target_only, "yours": decoder, **(others or {})}
    with pinned_threads(threads):
        times = measure_interleaved({name: timer(fn) for name, fn in contenders.items()},
                                    rounds, warmup=1)
    return {name: float(min(t)) for name, t in times.items()}


def toy_gpt(seed: int, n_layers: int, vocab: int = 4, scale: float = 25.0) -> GPT:
    """A small random GPT (width 16, two heads, context 64) built from ``seed``; its weight
    matrices are multiplied by ``scale``: the larger it is, the more peaked its distributions."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, d_model=16, n_layers=n_layers, n_heads=2,
                          context=64)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(scale)
    return model
