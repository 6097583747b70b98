"""Speculative decoding: greedy output equals the target's, sampled output is distributed as the
target's (exactly for one step, statistically end to end), and the KV caches roll back."""

from __future__ import annotations

import itertools

import pytest
import torch

from course_reference.serving import (
    accept_or_resample,
    expected_tokens_per_step,
    residual_distribution,
    speculative_generate,
)
from course_reference.serving.speculative import acceptance_rate, sample_inverse_cdf
from course_runtime.models import GPT, DenseKVCache, generate, load, load_tokenizer
from course_runtime.speculative import toy_gpt as grading_toy_gpt


@pytest.fixture(scope="module")
def pair() -> tuple[GPT, GPT]:
    return load("target"), load("draft")


def toy_gpt(seed: int, n_layers: int, vocab: int = 6) -> GPT:
    """A random GPT with peaked next-token distributions (the lab's checks use the same kind)."""
    return grading_toy_gpt(seed, n_layers, vocab)


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    """Total variation distance between two distributions."""
    return 0.5 * float((a - b).abs().sum())


def random_pairs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Target/draft distributions p, q, including the edge cases of the rule."""
    g = torch.Generator().manual_seed(0)
    pairs = []
    for size in (2, 5, 8):
        for _ in range(4):
            p = torch.rand(size, generator=g) ** 3
            q = torch.rand(size, generator=g) ** 3
            pairs.append((p / p.sum(), q / q.sum()))
    eye = torch.eye(4, dtype=torch.float32)
    pairs += [
        (torch.tensor([0.5, 0.5, 0.0, 0.0]), torch.tensor([0.0, 0.1, 0.4, 0.5])),  # p=0 where q>0
        (torch.tensor([0.2, 0.3, 0.1, 0.4]), torch.tensor([0.0, 0.0, 1.0, 0.0])),  # q one-hot
        (eye[1], eye[1]),                                                          # p == q
        (eye[0], torch.full((4,), 0.25)),                                          # p one-hot
    ]
    return pairs


# --- the one-step rule, exactly ---------------------------------------------------------------

@pytest.mark.parametrize("index", range(16))
def test_one_step_output_distribution_is_exactly_p(index: int) -> None:
    """Enumerate the draft token x ~ q: accepted with probability min(1, p(x)/q(x)), else the
    output is drawn from the residual. The mixture must be p, to float precision."""
    p, q = random_pairs()[index]
    accept = torch.where(q > 0, torch.minimum(torch.ones_like(p), p / q.clamp_min(1e-30)),
                         torch.zeros_like(p))
    residual = residual_distribution(p, q)
    assert torch.all(residual >= 0) and abs(float(residual.sum()) - 1) < 1e-6
    out = torch.zeros_like(p)
    for x in range(len(p)):
        out[x] += q[x] * accept[x]
        out += q[x] * (1 - accept[x]) * residual
    torch.testing.assert_close(out, p, atol=1e-6, rtol=0)
    # The overall acceptance probability is sum min(p, q), Leviathan et al.'s alpha.
    assert abs(float((q * accept).sum()) - float(acceptance_rate(p, q))) < 1e-6
    # The test can fail: redrawing from q instead of the residual does not give p.
    wrong = q * accept + (1 - float((q * accept).sum())) * q
    if tv(p, q) > 0.05:
        assert tv(wrong, p) > 1e-3


def test_accept_or_resample_follows_the_rule_at_the_thresholds() -> None:
    """accept_or_resample keeps token x exactly when u < p(x)/q(x), and redraws by inverse CDF."""
    p, q = torch.tensor([0.1, 0.6, 0.3]), torch.tensor([0.5, 0.2, 0.3])
    for x in range(3):
        ratio = min(1.0, float(p[x] / q[x]))
        for u, expected in [(ratio - 1e-4, True), (min(ratio + 1e-4, 1 - 1e-7), ratio >= 1)]:
            token, accepted = accept_or_resample(p, q, torch.tensor(x), torch.tensor(u),
                                                 torch.tensor(0.99))
            assert bool(accepted) == expected, (x, u)
            if expected:
                assert int(token) == x
    # Rejections redraw from norm((p - q)+) = [0, 1, 0] here: always token 1.
    for v in torch.linspace(0, 0.999, 50):
        token, accepted = accept_or_resample(p, q, torch.tensor(0), torch.tensor(0.9), v)
        assert not accepted and int(token) == 1


def test_inverse_cdf_sampling_is_exact_on_a_grid() -> None:
    probs = torch.tensor([0.125, 0.0, 0.5, 0.25, 0.125])
    n = 8000  # midpoints of n equal cells: each token gets exactly probs * n of them
    v = (torch.arange(n) + 0.5) / n
    counts = torch.bincount(sample_inverse_cdf(probs.expand(n, -1), v), minlength=5)
    assert counts.tolist() == (probs * n).long().tolist()


def test_one_step_rule_empirically_converges_to_p_not_q() -> None:
    """Seeded samples of the full rule: the distance to p shrinks with more samples, the distance
    to q stays near TV(p, q). Bounds are many standard deviations wide, and the seed is fixed."""
    g = torch.Generator().manual_seed(1234)
    p = torch.tensor([0.05, 0.4, 0.05, 0.3, 0.1, 0.1])
    q = torch.tensor([0.3, 0.1, 0.2, 0.1, 0.2, 0.1])
    distances = {}
    for n in (500, 200_000):
        x = torch.multinomial(q, n, replacement=True, generator=g)
        u, v = torch.rand(n, generator=g), torch.rand(n, generator=g)
        out, accepted = accept_or_resample(p.expand(n, -1), q.expand(n, -1), x, u, v)
        freq = torch.bincount(out, minlength=6).float() / n
        distances[n] = (tv(freq, p), tv(freq, q))
        assert abs(float(accepted.float().mean()) - float(acceptance_rate(p, q))) < 0.1
    assert distances[200_000][0] < 0.01 < distances[500][0]
    assert distances[200_000][0] < distances[500][0] / 3
    assert min(distances[500][1], distances[200_000][1]) > tv(p, q) - 0.1


def test_expected_tokens_formula() -> None:
    for alpha, gamma in itertools.product([0.0, 0.3, 0.8, 0.99], [1, 3, 7]):
        geometric = sum(alpha ** k for k in range(gamma + 1))  # P(at least k accepted), summed
        assert abs(expected_tokens_per_step(alpha, gamma) - geometric) < 1e-9
    assert expected_tokens_per_step(1.0, 4) == 5.0
    with pytest.raises(ValueError, match="alpha is a probability"):
        expected_tokens_per_step(1.5, 2)


# --- end to end -------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_greedy_speculative_equals_target_greedy(pair: tuple[GPT, GPT], gamma: int) -> None:
    target, draft = pair
    tokenizer = load_tokenizer()
    for text in ["Call me Ishmael. ", "\"Aye, aye, sir!\" cried Stubb"]:
        prompt = tokenizer.encode(text)
        expected = generate(target, prompt, 80)[0]
        out, stats = speculative_generate(target, draft, prompt, 80, gamma=gamma)
        assert torch.equal(out, expected), (tokenizer.decode(out), tokenizer.decode(expected))
        assert stats.generated == 80
        assert stats.target_forwards == stats.steps + 1  # the prompt's prefill, then one a step
        assert stats.accepted == sum(stats.accepted_per_step) == 80 - stats.steps
        assert stats.target_forwards < 80


def test_shipped_pair_accepts_most_draft_tokens(pair: tuple[GPT, GPT]) -> None:
    target, draft = pair
    prompt = load_tokenizer().encode("It was the whale, ")
    _, stats = speculative_generate(target, draft, prompt, 150, gamma=4)
    assert stats.alpha > 0.5, stats
    assert stats.target_forwards_per_token < 0.5, stats


def test_draft_equal_to_target_accepts_everything() -> None:
    model = toy_gpt(0, n_layers=2)
    out, stats = speculative_generate(model, model, [1, 2], 21, gamma=4)
    assert torch.equal(out, generate(model, [1, 2], 21)[0])
    assert stats.alpha == 1.0 and stats.accepted_per_step == [4, 4, 4, 4, 0]
    assert stats.steps == 5  # 5 + 5 + 5 + 5 + 1 tokens (the last step proposes nothing)


def test_sampled_speculative_matches_target_distribution_end_to_end() -> None:
    """3 new tokens after a fixed prompt, 1,500 seeded runs with gamma = 2: the joint frequency
    of the first two tokens and the marginal of the third match the target's exact probabilities
    (enumerated), and not the draft's."""
    vocab, prompt = 4, [1, 3]
    target, draft = toy_gpt(1, n_layers=2, vocab=vocab), toy_gpt(2, n_layers=1, vocab=vocab)

    def exact(model: GPT) -> torch.Tensor:
        """P(a, b, c | prompt) for every three-token continuation, [vocab]^3."""
        seqs = torch.tensor(list(itertools.product(range(vocab), repeat=3)))
        batch = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], dim=1)
        with torch.no_grad():
            logp = torch.log_softmax(model(batch[:, :-1]), -1)[:, len(prompt) - 1:]
        picked = logp.gather(-1, seqs.unsqueeze(-1)).squeeze(-1).sum(-1)
        return picked.exp().view(vocab, vocab, vocab)

    p_target, p_draft = exact(target), exact(draft)
    runs = 1500
    counts = torch.zeros(vocab, vocab, vocab)
    for seed in range(runs):
        out, _ = speculative_generate(target, draft, prompt, 3, gamma=2, greedy=False, seed=seed)
        counts[tuple(out.tolist())] += 1
    freq = counts / runs
    first_two, third = freq.sum(2).flatten(), freq.sum((0, 1))
    assert tv(first_two, p_target.sum(2).flatten()) < 0.07
    assert tv(third, p_target.sum((0, 1))) < 0.05
    gap = tv(p_target.sum(2).flatten(), p_draft.sum(2).flatten())
    assert gap > 0.3
    assert tv(first_two, p_draft.sum(2).flatten()) > gap - 0.07


# --- caches -----------------------------------------------------------------------------------

def test_rollback_leaves_caches_as_if_only_accepted_tokens_were_seen() -> None:
    target, draft = toy_gpt(3, n_layers=2), toy_gpt(4, n_layers=1)
    prompt = [0, 5, 2]
    caches = [DenseKVCache.for_model(m, capacity=40) for m in (target, draft)]
    out, stats = speculative_generate(target, draft, prompt, 30, gamma=3, greedy=False, seed=5,
                                      target_cache=caches[0], draft_cache=caches[1])
    assert stats.accepted < stats.proposed, "the check needs at least one rejection"
    sequence = torch.tensor([prompt + out.tolist()])
    assert caches[0].length == sequence.shape[1] - 1
    assert caches[1].length <= sequence.shape[1] - 1
    for model, cache in zip((target, draft), caches):
        fresh = DenseKVCache.for_model(model, capacity=40)
        model(sequence[:, :cache.length], fresh)
        for layer in range(model.config.n_layers):
            held = slice(0, cache.length)
            torch.testing.assert_close(cache.keys[layer][:, :, held],
                                       fresh.keys[layer][:, :, held], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(cache.values[layer][:, :, held],
                                       fresh.values[layer][:, :, held], rtol=1e-4, atol=1e-5)


class NoRollbackCache(DenseKVCache):
    """A buggy cache that keeps rejected tokens' entries."""

    def truncate(self, length: int) -> None:
        self._pending = None


def test_keeping_rejected_entries_changes_the_output() -> None:
    """The greedy-equality test can fail: without rollback the target attends to rejected
    draft tokens and its output drifts from plain greedy decoding."""
    target, draft = toy_gpt(5, n_layers=2), toy_gpt(6, n_layers=1)
    expected = generate(target, [1, 2], 20)[0]
    out, stats = speculative_generate(target, draft, [1, 2], 20, gamma=3)
    assert torch.equal(out, expected) and stats.accepted < stats.proposed
    out, _ = speculative_generate(target, draft, [1, 2], 20, gamma=3,
                                  target_cache=NoRollbackCache.for_model(target, capacity=64))
    assert not torch.equal(out, expected)


def test_bad_arguments_are_named() -> None:
    target, draft = toy_gpt(0, n_layers=2), toy_gpt(1, n_layers=1)
    with pytest.raises(ValueError, match="one sequence, got a batch of 2"):
        speculative_generate(target, draft, [[1, 2], [3, 4]], 5)
    with pytest.raises(ValueError, match="share a vocabulary, got sizes 6 and 9"):
        speculative_generate(target, toy_gpt(1, n_layers=1, vocab=9), [1], 5)
    with pytest.raises(ValueError, match="gamma .* must be >= 1, got 0"):
        speculative_generate(target, draft, [1], 5, gamma=0)
    with pytest.raises(ValueError, match="prompt of 60 tokens plus 5 new tokens exceeds the "
                                         "models' context of 64"):
        speculative_generate(target, draft, [1] * 60, 5)
    with pytest.raises(ValueError, match="unknown token id 6"):
        speculative_generate(target, draft, [1, 6], 5)
    used = DenseKVCache.for_model(target)
    target(torch.tensor([[1]]), used)
    with pytest.raises(ValueError, match="target cache must start empty, it holds 1 tokens"):
        speculative_generate(target, draft, [1], 5, target_cache=used)


def test_benchmark_sweep_counts_match_the_decoder(pair: tuple[GPT, GPT]) -> None:
    """The benchmark's sweep (a short one) reproduces the decoder's own counts."""
    from course_reference.bench.speculative import summarise, sweep
    from course_runtime.speculative import bench_prompts

    target, draft = pair
    prompt_set = bench_prompts(2, 32)
    rows = summarise(sweep(target, draft, gammas=(2, 5), rounds=1, new_tokens=40,
                           prompt_set=prompt_set))
    for row in rows:
        stats = [speculative_generate(target, draft, p, 40, gamma=row["gamma"])[1]
                 for p in prompt_set]
        assert row["alpha"] == sum(s.accepted for s in stats) / sum(s.proposed for s in stats)
        assert row["target_forwards_per_token"] == sum(s.target_forwards for s in stats) / 80
        assert row["tokens_per_step_theory"] == expected_tokens_per_step(row["alpha"],
                                                                         row["gamma"])
        assert row["speedup"] > 0
