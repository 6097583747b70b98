"""Speculative decoding: a cheap draft model guesses, the target model checks many guesses at once.

Leviathan, Kalman and Matias, "Fast Inference from Transformers via Speculative Decoding" (ICML
2023), and Chen et al., "Accelerating Large Language Model Decoding with Speculative Sampling"
(2023). Each step the draft proposes ``gamma`` tokens one by one; the target scores all of them in
a single forward pass, which on memory- or overhead-bound hardware costs about as much as scoring
one. Tokens are accepted left to right:

- greedy: a draft token is kept while it equals the target's argmax;
- sampling: draft token x drawn from q is kept with probability min(1, p(x)/q(x)); at the first
  rejection the token is redrawn from the residual norm((p - q)+). The output is then distributed
  exactly as the target's own samples (Leviathan et al., Appendix A.1).

When every draft token is accepted the target's last distribution gives one more token for free
(the bonus token), so a step yields between 1 and gamma + 1 tokens. If each draft token is accepted
independently with probability alpha, a step yields (1 - alpha^(gamma+1)) / (1 - alpha) tokens in
expectation (their equation 1). Both models keep a KV cache; rejected tokens' entries are rolled
back with ``truncate``. The counters a decoder reports (``SpeculativeStats``) are the runtime's:
the lab gives them to students, whose decoders fill them as this one does.
"""

from __future__ import annotations

import torch

from course_runtime.models.cache import DenseKVCache, KVCache
from course_runtime.models.gpt import GPT, as_batch
from course_runtime.speculative import SpeculativeStats


def expected_tokens_per_step(alpha: float, gamma: int) -> float:
    """(1 - alpha^(gamma+1)) / (1 - alpha): tokens per target forward for i.i.d. acceptance."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha is a probability, got {alpha}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if alpha == 1:
        return gamma + 1.0
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def acceptance_rate(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Probability that one sampled draft token is accepted: sum_x min(p(x), q(x)) = 1 - TV(p, q)
    (Leviathan et al., section 3.2)."""
    return torch.minimum(p, q).sum(-1)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last dimension: where to sample after a rejection.

    Where p equals q there is nothing left (and no rejection can happen); p is returned there so
    the result is always a distribution.
    """
    residual = (p - q).clamp_min(0)
    total = residual.sum(-1, keepdim=True)
    return torch.where(total > 0, residual / total.clamp_min(torch.finfo(p.dtype).tiny), p)


def sample_inverse_cdf(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The token whose cumulative-probability interval contains v (uniform in [0, 1)).

    Explicit uniforms (instead of ``torch.multinomial``) make each random choice a function the
    tests can evaluate exactly.
    """
    cdf = probs.cumsum(-1)
    index = torch.searchsorted(cdf, (v * cdf[..., -1]).unsqueeze(-1).contiguous(), right=True)
    return index.squeeze(-1).clamp_max(probs.shape[-1] - 1)


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, token: torch.Tensor, u: torch.Tensor,
                       v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of speculative sampling, batched over leading dimensions.

    ``token`` was drawn from q; keep it if u < p(token)/q(token), else draw from the residual
    with uniform v. Returns (the token emitted, whether the draft token was accepted).
    """
    p_x = p.gather(-1, token.unsqueeze(-1)).squeeze(-1)
    q_x = q.gather(-1, token.unsqueeze(-1)).squeeze(-1)
    # u * q < p is u < p / q without dividing by a tiny q; p >= q is always accepted (u < 1).
    accepted = u * q_x < p_x
    redrawn = sample_inverse_cdf(residual_distribution(p, q), v)
    return torch.where(accepted, token, redrawn), accepted


def _distribution(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=-1)


@torch.no_grad()
def speculative_generate(target: GPT, draft: GPT, prompt: torch.Tensor | list[int],
                         max_new_tokens: int, gamma: int = 4, greedy: bool = True,
                         temperature: float = 1.0, seed: int | None = None,
                         target_cache: KVCache | None = None,
                         draft_cache: KVCache | None = None
                         ) -> tuple[torch.Tensor, SpeculativeStats]:
    """Generate ``max_new_tokens`` for one prompt; returns (new token ids [new], stats).

    Greedy output is token-for-token the target's greedy output; sampled output follows the
    target's distribution at ``temperature``. Caches default to fresh ``DenseKVCache`` objects;
    any empty ``KVCache`` (a paged one, say) works.
    """
    device = next(target.parameters()).device
    tokens = as_batch(prompt).to(device)
    if tokens.shape[0] != 1:
        raise ValueError(f"speculative_generate decodes one sequence, got a batch of "
                         f"{tokens.shape[0]}")
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(f"target and draft must share a vocabulary, got sizes "
                         f"{target.config.vocab_size} and {draft.config.vocab_size}")
    if gamma < 1:
        raise ValueError(f"gamma (draft tokens per step) must be >= 1, got {gamma}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}; use greedy=True")
    total = tokens.shape[1] + max_new_tokens
    context = min(target.config.context, draft.config.context)
    if total > context:
        raise ValueError(f"a prompt of {tokens.shape[1]} tokens plus {max_new_tokens} new tokens "
                         f"exceeds the models' context of {context}")
    if target_cache is None:
        target_cache = DenseKVCache.for_model(target, capacity=total)
    if draft_cache is None:
        draft_cache = DenseKVCache.for_model(draft, capacity=total)
    for name, cache in (("target", target_cache), ("draft", draft_cache)):
        if cache.length != 0:
            raise ValueError(f"the {name} cache must start empty, it holds {cache.length} tokens")
    generator = torch.Generator().manual_seed(0 if seed is None else seed)
    stats = SpeculativeStats(gamma=gamma)

    sequence = tokens[0].tolist()
    if len(sequence) > 1:
        # Invariant: the target's cache holds every token but the last one of `sequence`.
        target(tokens[:, :-1], target_cache)
        stats.target_forwards += 1
    while stats.generated < max_new_tokens:
        # Never propose more than can be emitted: a step yields up to g + 1 tokens.
        g = min(gamma, max_new_tokens - stats.generated - 1)
        start = len(sequence)  # tokens before this step's proposals
        proposals: list[int] = []
        draft_probs: list[torch.Tensor] = []
        if g > 0:
            # The draft's first forward catches up on every token it has not seen yet.
            feed = sequence[draft_cache.length:]
            for _ in range(g):
                logits = draft(torch.tensor([feed], device=device), draft_cache)[0, -1]
                stats.draft_forwards += 1
                if greedy:
                    token = int(logits.argmax())
                else:
                    q = _distribution(logits, temperature)
                    u = torch.rand((), generator=generator).to(device)
                    token = int(sample_inverse_cdf(q, u))
                    draft_probs.append(q)
                proposals.append(token)
                feed = [token]
        # One target forward scores the last accepted token and every proposal.
        verify = torch.tensor([[sequence[-1], *proposals]], device=device)
        target_logits = target(verify, target_cache)[0]
        stats.target_forwards += 1
        emitted = _verify(target_logits, proposals, draft_probs, greedy, temperature, generator)
        n_accepted = len(emitted) - 1
        stats.steps += 1
        stats.proposed += g
        stats.accepted += n_accepted
        stats.accepted_per_step.append(n_accepted)
        # Roll back both caches to the accepted prefix: the rejected tokens' keys and values
        # must not be attended to by later tokens.
        target_cache.truncate(start + n_accepted)
        draft_cache.truncate(min(draft_cache.length, start + n_accepted))
        sequence += emitted
        stats.generated += len(emitted)
    return torch.tensor(sequence[tokens.shape[1]:], device=device), stats


def _verify(target_logits: torch.Tensor, proposals: list[int], draft_probs: list[torch.Tensor],
            greedy: bool, temperature: float, generator: torch.Generator) -> list[int]:
    """The tokens one step emits: the accepted proposals, then a correction or bonus token.

    ``target_logits[i]`` is the target's prediction for the position of ``proposals[i]``; the
    row after the last proposal gives the bonus token.
    """
    emitted: list[int] = []
    for i, token in enumerate(proposals):
        if greedy:
            best = int(target_logits[i].argmax())
            if best != token:
                return emitted + [best]
        else:
            p = _distribution(target_logits[i], temperature)
            u, v = torch.rand(2, generator=generator).to(p.device)
            out, accepted = accept_or_resample(p, draft_probs[i],
                                               torch.tensor(token, device=p.device), u, v)
            if not accepted:
                return emitted + [int(out)]
        emitted.append(token)
    last = target_logits[len(proposals)]
    if greedy:
        return emitted + [int(last.argmax())]
    bonus = sample_inverse_cdf(_distribution(last, temperature),
                               torch.rand((), generator=generator).to(last.device))
    return emitted + [int(bonus)]
