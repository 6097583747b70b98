"""Checks for Lab 5 (speculative decoding), called by the lab's hidden tests.

The oracles are target-only decoding (greedy speculative output must equal it token for token),
the target's exact next-token probabilities (the sampled output must follow them), and a KV cache
filled from scratch with the accepted tokens (what the rolled-back caches must hold). Each check
runs the student's function on seeded inputs; the rejection-sampling rule is checked exactly, by
feeding it the uniforms u and v that decide its random choices.

Graded with the submission in a process of its own (``grader.isolated``): the models and caches
the student's decoder is handed are built there, from the same seeds and shipped weights as the
grader's copies that the oracles use; every forward pass of theirs is counted here, by a hook
that calls back into the grader.

The public tests compare with ``public_expectations()``: what the reference computes for their
cases, shipped with the lab as data. The hidden tests rerun those cases, so they alone decide the
grade.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from course_reference.serving import speculative as ref
from course_runtime.models import GPT, DenseKVCache, generate, load, load_tokenizer
from course_runtime.speculative import (
    ForwardCounter,
    bench_prompts,
    forwards_per_token,
    speed_table,
    toy_gpt,
)
from course_runtime.testing import assert_close, require, time_limit
from grader.checks import counted_forwards, forbid, make_there, on_one_cpu
from grader.isolated import is_remote, student_of

ISOLATED = True  # graded with the submission in a process of its own (grader.isolated)

FORBIDDEN = [
    "course_reference.serving.speculative.speculative_generate",
    "course_reference.serving.speculative.accept_or_resample",
    "course_reference.serving.speculative.residual_distribution",
    "course_reference.serving.speculative._verify",
]
REASON = ("Lab 5 asks you to write speculative decoding yourself; course_reference.serving is what "
          "your code is compared against, not part of it")

PROMPTS = ["Call me Ishmael. ", "\"Aye, aye, sir!\" cried Stubb, ", "The whale", "Queequeg was"]
# The public tests' cases; the hidden tests rerun them (``*_fixed_hidden``).
PUBLIC_GREEDY_VERIFY = {"seed": 0, "cases": 9}
PUBLIC_RESIDUAL = {"seed": 0, "cases": 4}
ROUNDS = 3  # timed rounds of q5's speed table, after one warm-up round
PUBLIC_FORMULA = [(0.0, 1), (0.25, 2), (0.6, 4), (0.9, 7), (0.999, 4), (1.0, 4)]

_models: dict[str, GPT] = {}


def guard(namespace: dict[str, Any] | None = None) -> Any:
    """Block the reference speculative decoder while student code runs."""
    return forbid(FORBIDDEN, REASON, namespace)


def shipped_pair() -> tuple[GPT, GPT]:
    """The shipped target and draft, loaded once per grading process."""
    for name in ("target", "draft"):
        if name not in _models:
            _models[name] = load(name)
    return _models["target"], _models["draft"]


def shipped_pair_there(namespace: Any) -> tuple[Any, Any]:
    """The shipped target and draft where the submission's code runs (the grader's own copies
    when it runs here), loaded once per submission."""
    if not is_remote(namespace):
        return shipped_pair()
    kept = student_of(namespace).kept
    for name in ("target", "draft"):
        if name not in kept:
            kept[name] = make_there(namespace, load, name)
    return kept["target"], kept["draft"]


def toy_pair(namespace: Any, target: tuple[Any, ...], draft: tuple[Any, ...],
             **kwargs: Any) -> tuple[GPT, GPT, Any, Any]:
    """Two ``toy_gpt`` models from their arguments: the grader's copies, and the same models
    where the submission's code runs."""
    ours = toy_gpt(*target, **kwargs), toy_gpt(*draft, **kwargs)
    if not is_remote(namespace):
        return (*ours, *ours)
    return (*ours, make_there(namespace, toy_gpt, *target, **kwargs),
            make_there(namespace, toy_gpt, *draft, **kwargs))


def _tv(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    return 0.5 * float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).sum())


def _as_ids(tokens: Any, what: str) -> list[int]:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.flatten().tolist()
    if not isinstance(tokens, (list, tuple)):
        raise AssertionError(f"{what} should return a list of token ids, got "
                             f"{type(tokens).__name__}")
    return [int(t) for t in tokens]


# --------------------------------------------------------------------------------------------
# q1: greedy verification
# --------------------------------------------------------------------------------------------

def greedy_verify_cases(seed: int, cases: int) -> list[dict[str, Any]]:
    """Random target logits with draft proposals that agree with the argmax for a prefix (all,
    none, all but one, then random lengths), and one step with no proposals at all; each case
    with what the reference emits and how many proposals agree."""
    g = torch.Generator().manual_seed(seed)
    found = []
    for case in range(cases + 1):
        gamma = 0 if case == cases else 1 + case % 6
        vocab = int(torch.randint(3, 40, (), generator=g))
        logits = torch.randn(gamma + 1, vocab, generator=g) * 3
        best = logits.argmax(-1)
        agree = [gamma, 0, gamma - 1][case % 3] if case < 9 else int(
            torch.randint(0, gamma + 1, (), generator=g))
        agree = max(agree, 0)
        proposals = best[:gamma].tolist()
        if agree < gamma:
            proposals[agree] = (proposals[agree] + 1 + int(
                torch.randint(0, vocab - 1, (), generator=g))) % vocab
            tail = torch.randint(0, vocab, (gamma - agree - 1,), generator=g).tolist()
            proposals[agree + 1:] = tail
        emitted = ref._verify(logits, proposals, [], True, 1.0, torch.Generator())
        found.append({"logits": logits, "proposals": proposals, "agree": agree,
                      "emitted": emitted})
    return found


def check_greedy_verify(greedy_verify: Callable[..., Any], seed: int, cases: int,
                        namespace: dict[str, Any] | None = None) -> None:
    """The emitted tokens must be the agreeing prefix of the proposals plus the target's
    correction (or bonus) token, on ``greedy_verify_cases(seed, cases)``."""
    require(greedy_verify=greedy_verify)
    for case in greedy_verify_cases(seed, cases):
        logits, proposals, expected = case["logits"], case["proposals"], case["emitted"]
        with guard(namespace), time_limit(10, "greedy_verify"):
            got = _as_ids(greedy_verify(logits.clone(), list(proposals)), "greedy_verify")
        if got != expected:
            raise AssertionError(
                f"greedy_verify with gamma={len(proposals)}, proposals {proposals}, target "
                f"argmax per row {logits.argmax(-1).tolist()}: expected {expected} (the "
                f"{case['agree']} agreeing proposals, then the target's token at the next "
                f"position), got {got}")


# --------------------------------------------------------------------------------------------
# q2: the rejection-sampling rule
# --------------------------------------------------------------------------------------------

def _distributions(seed: int, cases: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    pairs = [
        (torch.tensor([0.5, 0.5, 0.0, 0.0]), torch.tensor([0.0, 0.1, 0.4, 0.5])),
        (torch.tensor([0.1, 0.6, 0.3]), torch.tensor([0.5, 0.2, 0.3])),
        # p == q: nothing is left over (and nothing is ever rejected); the handout says return p.
        (torch.tensor([0.25, 0.75]), torch.tensor([0.25, 0.75])),
    ]
    for _ in range(cases):
        size = int(torch.randint(2, 12, (), generator=g))
        p, q = torch.rand(size, generator=g) ** 3, torch.rand(size, generator=g) ** 3
        pairs.append((p / p.sum(), q / q.sum()))
    return pairs


def check_residual(residual_distribution: Callable[..., Any], seed: int, cases: int,
                   namespace: dict[str, Any] | None = None) -> None:
    require(residual_distribution=residual_distribution)
    for p, q in _distributions(seed, cases):
        with guard(namespace), time_limit(10, "residual_distribution"):
            got = residual_distribution(p.clone(), q.clone())
        assert_close(torch.as_tensor(got).numpy(), ref.residual_distribution(p, q).numpy(),
                     what=f"residual_distribution(p={p.numpy().round(3)}, "
                          f"q={q.numpy().round(3)}) (the normalised max(0, p - q))", atol=1e-6)


def rule_distribution(rejection_step: Callable[..., Any], p: torch.Tensor, q: torch.Tensor,
                      grid: int = 400, namespace: dict[str, Any] | None = None) -> np.ndarray:
    """The output distribution of ``rejection_step`` when the draft token is drawn from q.

    For each draft token x, the acceptance probability is read off by bisection on u (the rule
    accepts exactly when u is below a threshold), and the redraw distribution from ``grid``
    evenly spaced values of v, so a wrong rule shows up as a wrong distribution, not a flaky one.
    """
    out = np.zeros(len(p))
    vs = (np.arange(grid) + 0.5) / grid
    for x in range(len(p)):
        if q[x] == 0:
            continue

        def step(u: float, v: float) -> tuple[int, bool]:
            with guard(namespace), time_limit(10, "rejection_step"):
                token, accepted = rejection_step(p.clone(), q.clone(), x, float(u), float(v))
            return int(token), bool(accepted)

        # Accepted below `low`, rejected at or above `high`. Where u = 0 or u = 1 exactly falls
        # has probability zero (`u * q < p` and `u * q <= p` are the same rule), so the ends are
        # probed just inside.
        low, high = 0.0, 1.0
        if step(1 - 1e-9, 0.5)[1]:
            low = high = 1.0
        elif not step(1e-9, 0.5)[1]:
            high = 0.0
        else:
            for _ in range(30):
                mid = (low + high) / 2
                low, high = (mid, high) if step(mid, 0.5)[1] else (low, mid)
        accept = (low + high) / 2
        token, accepted = step(accept / 2, 0.5) if accept > 0 else (x, True)
        if accept > 0 and (not accepted or token != x):
            raise AssertionError(f"rejection_step accepted draft token {x} but returned token "
                                 f"{token}: an accepted draft token is emitted as it is")
        out[x] += float(q[x]) * accept
        if accept < 1:
            u_reject = (accept + 1) / 2
            redraws = np.zeros(len(p))
            for v in vs:
                token, accepted = step(u_reject, v)
                if accepted:
                    raise AssertionError(f"rejection_step accepted token {x} at u={u_reject:.4f} "
                                         f"but rejected it at a smaller u: acceptance should "
                                         "be u < p(x) / q(x)")
                redraws[token] += 1 / grid
            out += float(q[x]) * (1 - accept) * redraws
    return out


def check_rejection_step(rejection_step: Callable[..., Any], seed: int, cases: int,
                         namespace: dict[str, Any] | None = None) -> None:
    """The rule's output distribution, computed from the student's function, must be p, and its
    acceptance threshold for each draft token must be min(1, p(x)/q(x))."""
    require(rejection_step=rejection_step)
    for p, q in _distributions(seed, cases):
        got = rule_distribution(rejection_step, p, q, namespace=namespace)
        # The redraw grid resolves probabilities to 1/400 per token.
        tolerance = 1e-3 + 1.0 / 400
        if _tv(got, p) > len(p) * tolerance / 2:
            raise AssertionError(
                f"with p={p.numpy().round(3)} and q={q.numpy().round(3)}, the tokens your "
                f"rejection_step emits (draft token drawn from q) are distributed as "
                f"{got.round(3)}, not as p: accept x with probability min(1, p(x)/q(x)) and "
                f"redraw from the normalised max(0, p - q)")


# --------------------------------------------------------------------------------------------
# q3: the decoding loop
# --------------------------------------------------------------------------------------------

def guarded(speculative_generate: Callable[..., Any], namespace: dict[str, Any] | None,
            seconds: float = 30) -> Callable[..., Any]:
    """The student's decoder, run with the reference blocked and under a time limit, as the
    runtime's measurements (``forwards_per_token``, ``speed_table``) call a decoder."""
    def decoder(*args: Any, **kwargs: Any) -> Any:
        with guard(namespace), time_limit(seconds, "speculative_generate"):
            return speculative_generate(*args, **kwargs)
    decoder.__name__ = "speculative_generate"
    return decoder


def _run(speculative_generate: Callable[..., Any], *args: Any, namespace: dict[str, Any] | None,
         seconds: float = 30, **kwargs: Any) -> tuple[list[int], Any]:
    result = guarded(speculative_generate, namespace, seconds)(*args, **kwargs)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise AssertionError("speculative_generate should return (tokens, stats), got "
                             f"{type(result).__name__}")
    return _as_ids(result[0], "speculative_generate"), result[1]


def check_greedy_equals_target(speculative_generate: Callable[..., Any], gammas: Sequence[int],
                               prompts: Sequence[str | Sequence[int]], new_tokens: int,
                               namespace: dict[str, Any] | None = None,
                               stats: bool = True) -> None:
    """Greedy speculative output must be the target's greedy output, token for token, after
    each prompt (text or token ids); with ``stats``, its counters must add up too."""
    require(speculative_generate=speculative_generate)
    target, _ = shipped_pair()
    their_target, their_draft = shipped_pair_there(namespace)
    tokenizer = load_tokenizer()
    for text, gamma in itertools.product(prompts, gammas):
        prompt = tokenizer.encode(text) if isinstance(text, str) else list(text)
        expected = generate(target, prompt, new_tokens)[0].tolist()
        with counted_forwards(target=their_target, draft=their_draft) as calls:
            got, counters = _run(speculative_generate, their_target, their_draft, prompt,
                                 new_tokens, gamma=gamma, namespace=namespace)
        if got != expected:
            first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b),
                         min(len(got), len(expected)))
            raise AssertionError(
                f"prompt {tokenizer.decode(prompt)!r}, gamma={gamma}: greedy speculative "
                f"decoding must reproduce the target's greedy output; they differ from new "
                f"token {first} on (expected {tokenizer.decode(expected)!r}, got "
                f"{tokenizer.decode(got)!r}, {len(got)} tokens for {len(expected)})")
        if stats:
            _check_stats(counters, new_tokens, gamma, calls)


def _check_stats(stats: Any, new_tokens: int, gamma: int, calls: dict[str, list[int]]) -> None:
    """The counters must add up, and the forward passes they report must be the ones that
    happened (counted by hooks on the two models)."""
    for name in ("generated", "steps", "target_forwards", "draft_forwards", "proposed",
                 "accepted"):
        if not hasattr(stats, name):
            raise AssertionError(f"the stats returned by speculative_generate have no `{name}`")
    for name in ("target", "draft"):
        if getattr(stats, f"{name}_forwards") != len(calls[name]):
            raise AssertionError(f"stats.{name}_forwards is {getattr(stats, f'{name}_forwards')}"
                                 f", but the {name} model ran {len(calls[name])} forward passes")
    if stats.draft_forwards != stats.proposed:
        raise AssertionError(f"the draft ran {stats.draft_forwards} forward passes to propose "
                             f"{stats.proposed} tokens: one forward per proposed token (the "
                             "first of a step feeds every token the draft's cache lacks)")
    if stats.generated != new_tokens:
        raise AssertionError(f"stats.generated is {stats.generated}, expected {new_tokens}")
    if stats.target_forwards not in (stats.steps, stats.steps + 1):
        raise AssertionError(f"{stats.steps} steps took {stats.target_forwards} target forward "
                             "passes: a step verifies all its proposals in one forward pass")
    if not 0 <= stats.accepted <= stats.proposed <= gamma * stats.steps:
        raise AssertionError(f"stats: {stats.accepted} accepted of {stats.proposed} proposed in "
                             f"{stats.steps} steps of gamma={gamma} is impossible")
    if stats.generated != stats.accepted + stats.steps:
        raise AssertionError(f"each step emits its accepted proposals plus one target token, so "
                             f"{stats.steps} steps with {stats.accepted} accepted proposals make "
                             f"{stats.steps + stats.accepted} tokens, not {stats.generated}")


def check_rollback(speculative_generate: Callable[..., Any], seed: int,
                   namespace: dict[str, Any] | None = None) -> None:
    """After sampling with rejections, both caches must hold exactly what a fresh cache fed the
    accepted tokens holds (every token but the last, for the target)."""
    require(speculative_generate=speculative_generate)
    target, draft, their_target, their_draft = toy_pair(namespace, (seed, 2), (seed + 1, 1),
                                                        vocab=6)
    prompt = [0, 5, 2]
    caches = [make_there(namespace, DenseKVCache.for_model, m, capacity=48)
              for m in (their_target, their_draft)]
    got, stats = _run(speculative_generate, their_target, their_draft, prompt, 30, gamma=3,
                      greedy=False, seed=seed, target_cache=caches[0], draft_cache=caches[1],
                      namespace=namespace)
    if stats.accepted >= stats.proposed:
        raise AssertionError("expected at least one rejected draft token in this check")
    sequence = torch.tensor([prompt + got])
    if caches[0].length != sequence.shape[1] - 1:
        raise AssertionError(f"after generating, the target's cache holds {caches[0].length} "
                             f"tokens; it should hold the {sequence.shape[1] - 1} tokens before "
                             "the last one emitted (rejected tokens rolled back with truncate)")
    if caches[1].length > sequence.shape[1]:
        raise AssertionError(f"the draft's cache holds {caches[1].length} tokens, more than the "
                             f"{sequence.shape[1]} of the sequence: rejected tokens were kept")
    for name, model, cache in (("target", target, caches[0]), ("draft", draft, caches[1])):
        fresh = DenseKVCache.for_model(model, capacity=48)
        length, keys = int(cache.length), list(cache.keys)
        with torch.no_grad():
            model(sequence[:, :length], fresh)
        for layer in range(model.config.n_layers):
            assert_close(torch.as_tensor(keys[layer])[:, :, :length].numpy(),
                         fresh.keys[layer][:, :, :length].numpy(),
                         what=f"{name} cache keys of layer {layer} after rollback", atol=1e-4)


SAMPLING_VOCAB, SAMPLING_PROMPT = 4, [1, 3]


def sampling_pair(namespace: Any = None) -> tuple[GPT, GPT, Any, Any]:
    """A target and a draft for the distribution test: spread out (the target's likeliest first
    token has probability 0.34) and far apart (total-variation distance 0.48: about half of the
    draft's tokens are rejected), so that a biased sampler moves the output distribution by more
    than the noise of a thousand runs, on the accept and on the reject path alike."""
    return toy_pair(namespace, (3, 2, SAMPLING_VOCAB), (2, 1, SAMPLING_VOCAB), scale=8.0)


def sequence_probabilities(model: GPT, prompt: list[int], new_tokens: int,
                           temperature: float) -> np.ndarray:
    """The exact probability of every continuation of ``new_tokens`` tokens (index: the tokens
    as digits in base vocab), sampling at ``temperature``."""
    vocab = model.config.vocab_size
    seqs = torch.tensor(list(itertools.product(range(vocab), repeat=new_tokens)))
    batch = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], dim=1)
    with torch.no_grad():
        logp = torch.log_softmax(model(batch[:, :-1]) / temperature, -1)[:, len(prompt) - 1:]
    return logp.gather(-1, seqs.unsqueeze(-1)).squeeze(-1).sum(-1).exp().double().numpy()


def expected_tv_noise(p: np.ndarray, runs: int) -> float:
    """The expected total-variation distance between ``p`` and the frequencies of ``runs`` draws
    from it (each frequency's mean absolute error is about sqrt(2 p (1 - p) / (pi runs)))."""
    return float(0.5 * np.sqrt(2 * p * (1 - p) / (np.pi * runs)).sum())


SEEDED_PROMPTS = ([1, 3], [2])  # the second is a single token: no prefill before the loop
SEEDED_RUNS = 4  # seeds per prompt
SEEDED_TOKENS, SEEDED_GAMMA = 12, 3


def check_seeded_sampling(speculative_generate: Callable[..., Any], temperature: float,
                          namespace: dict[str, Any] | None = None) -> None:
    """The handout prescribes every random draw of the sampling path (one ``u`` per proposal,
    then ``u, v`` per verified proposal, then one for the bonus token, from one generator seeded
    by ``seed``), so a seeded run must emit the reference's tokens and take its steps, with the
    same forward passes, proposals and acceptances: this reaches what a distribution test of a
    thousand runs is too coarse to see (the bonus token drawn from the wrong row, the target's
    probabilities at the wrong temperature, a prefill of a one-token prompt)."""
    require(speculative_generate=speculative_generate)
    target, draft, their_target, their_draft = sampling_pair(namespace)
    for prompt, seed in itertools.product(SEEDED_PROMPTS, range(SEEDED_RUNS)):
        options = {"gamma": SEEDED_GAMMA, "greedy": False, "temperature": temperature,
                   "seed": seed}
        want_tokens, want = ref.speculative_generate(target, draft, prompt, SEEDED_TOKENS,
                                                     **options)
        with counted_forwards(target=their_target, draft=their_draft) as calls:
            got, stats = _run(speculative_generate, their_target, their_draft, prompt,
                              SEEDED_TOKENS, namespace=namespace, seconds=10, **options)
        where = (f"sampling {SEEDED_TOKENS} tokens after prompt {prompt} at temperature "
                 f"{temperature:g}, gamma={SEEDED_GAMMA}, seed={seed}")
        if got != want_tokens.tolist():
            raise AssertionError(
                f"{where}: expected the tokens {want_tokens.tolist()}, got {got}. The handout "
                "fixes every random draw and its order (u per proposal; u, v per verified "
                "proposal; one for the bonus token, from the last row of the target's logits), "
                "so a seeded run is reproducible")
        _check_stats(stats, SEEDED_TOKENS, SEEDED_GAMMA, calls)
        for name in ("steps", "target_forwards", "draft_forwards", "proposed", "accepted"):
            if getattr(stats, name) != getattr(want, name):
                raise AssertionError(f"{where}: stats.{name} is {getattr(stats, name)}, "
                                     f"expected {getattr(want, name)} (a prompt of one token "
                                     f"needs no prefill)")


def check_sampling_distribution(speculative_generate: Callable[..., Any], runs: int,
                                namespace: dict[str, Any] | None = None,
                                temperature: float = 1.0, new_tokens: int = 2,
                                gamma: int = 2) -> None:
    """Sampled speculative decoding of ``new_tokens`` tokens, ``runs`` seeded runs at
    ``temperature``: the joint frequency of the tokens must be the target's exact probabilities
    (within twice the noise expected of ``runs`` samples) and far from the draft's.

    With two new tokens the first step proposes one draft token, so the accepted count it
    reports must average the exact acceptance rate sum_x min(p(x), q(x)), within four standard
    errors: a draft sampled at another temperature still yields the target's distribution, but
    accepts less often.
    """
    check_seeded_sampling(speculative_generate, temperature, namespace)
    target, draft, their_target, their_draft = sampling_pair(namespace)
    prompt, vocab = SAMPLING_PROMPT, SAMPLING_VOCAB
    p_target = sequence_probabilities(target, prompt, new_tokens, temperature)
    p_draft = sequence_probabilities(draft, prompt, new_tokens, temperature)
    counts, accepted = np.zeros(vocab ** new_tokens), []
    start = time.perf_counter()
    for seed in range(runs):
        got, stats = _run(speculative_generate, their_target, their_draft, prompt, new_tokens,
                          gamma=gamma, greedy=False, temperature=temperature, seed=seed,
                          namespace=namespace, seconds=10)
        if len(got) != new_tokens or not all(0 <= t < vocab for t in got):
            raise AssertionError(f"asked for {new_tokens} new tokens of a {vocab}-token "
                                 f"vocabulary, got {got}")
        counts[int(np.ravel_multi_index(got, (vocab,) * new_tokens))] += 1
        accepted.append(getattr(stats, "accepted", None))
        if time.perf_counter() - start > 180:
            raise AssertionError(f"{runs} {new_tokens}-token generations took over 180 s")
    freq = counts / runs
    bound = 2 * expected_tv_noise(p_target, runs)
    where = f"at temperature {temperature:g}, over {runs} seeded runs of {new_tokens} tokens"
    if _tv(freq, p_target) > bound or _tv(freq, p_draft) < _tv(p_target, p_draft) - bound:
        raise AssertionError(
            f"{where}, the sampled tokens are at total-variation distance "
            f"{_tv(freq, p_target):.3f} from the target's distribution (noise allows "
            f"{bound:.3f}) and {_tv(freq, p_draft):.3f} from the draft's (the two models are "
            f"{_tv(p_target, p_draft):.3f} apart): the output must follow the target, every "
            "token of it, the bonus token too")
    if new_tokens == 2:
        if not all(isinstance(a, (int, np.integer)) for a in accepted):
            raise AssertionError("stats.accepted should count the accepted draft tokens")
        p1 = sequence_probabilities(target, prompt, 1, temperature)
        q1 = sequence_probabilities(draft, prompt, 1, temperature)
        alpha = float(np.minimum(p1, q1).sum())
        mean, error = float(np.mean(accepted)), float(np.sqrt(alpha * (1 - alpha) / runs))
        if abs(mean - alpha) > 4 * error:
            raise AssertionError(
                f"{where}, your sampler accepted {mean:.3f} draft tokens per run on average, "
                f"but a draft token is accepted with probability sum_x min(p(x), q(x)) = "
                f"{alpha:.3f} (±{4 * error:.3f}) when both models sample at the same "
                "temperature: are the draft's probabilities the ones its token was drawn from?")


# --------------------------------------------------------------------------------------------
# q4, q5: theory and speed
# --------------------------------------------------------------------------------------------

def check_expected_tokens(expected_tokens_per_step: Callable[..., Any],
                          cases: Sequence[tuple[float, int]] | None = None) -> None:
    """The i.i.d. formula against the reference on ``cases`` (alpha, gamma); by default a grid
    of alphas and gammas, the edges alpha = 0 and alpha = 1 included."""
    require(expected_tokens_per_step=expected_tokens_per_step)
    if cases is None:
        cases = list(itertools.product([0.0, 0.25, 0.6, 0.9, 0.999], [1, 2, 4, 7])) + [
            (1.0, 1), (1.0, 4), (0.5, 0), (0.37, 12), (0.999999, 3)]
    for alpha, gamma in cases:
        with time_limit(5, "expected_tokens_per_step"):
            got = expected_tokens_per_step(alpha, gamma)
        expected = ref.expected_tokens_per_step(alpha, gamma)
        assert_close(None if got is None else float(got), np.float64(expected),
                     what=f"expected_tokens_per_step({alpha}, {gamma})", atol=1e-6, rtol=1e-6)


def public_expectations() -> dict[str, Any]:
    """What the public tests compare with, computed by the reference when the lab is assigned:
    q1's greedy steps, q2's residual distributions and q4's formula values."""
    return {
        "q1_greedy_verify": [
            {"logits": case["logits"].tolist(), "proposals": case["proposals"],
             "emitted": case["emitted"]}
            for case in greedy_verify_cases(**PUBLIC_GREEDY_VERIFY)],
        "q2_residual": [
            {"p": p.tolist(), "q": q.tolist(), "residual": ref.residual_distribution(p, q).tolist()}
            for p, q in _distributions(**PUBLIC_RESIDUAL)],
        "q4_expected_tokens": [
            {"alpha": alpha, "gamma": gamma, "tokens": ref.expected_tokens_per_step(alpha, gamma)}
            for alpha, gamma in PUBLIC_FORMULA],
    }


def check_forwards_per_token(speculative_generate: Callable[..., Any], bound: float,
                             namespace: dict[str, Any] | None = None) -> None:
    """Hardware-independent: target forward passes per generated token at gamma = 4 on the
    benchmark prompts, counted by the runtime on the target model, once the greedy output on
    those prompts has been checked."""
    require(speculative_generate=speculative_generate)
    check_greedy_equals_target(speculative_generate, [4], bench_prompts(), 96,
                               namespace=namespace, stats=False)
    target, draft = shipped_pair()
    their_target, their_draft = shipped_pair_there(namespace)
    got = forwards_per_token(guarded(speculative_generate, namespace), target=their_target,
                             draft=their_draft)
    want = forwards_per_token(ref.speculative_generate, target=target, draft=draft)
    print(f"target forwards per token: yours {got:.3f}, reference {want:.3f}, target-only 1.0")
    if got < 1 / 5:
        raise AssertionError(f"your decoder ran {got:.3f} target forward passes per token at "
                             "gamma=4, fewer than one per 5 tokens, the most one pass can give "
                             "(4 accepted proposals and the bonus token): did it return tokens "
                             "without running the target, from a cache of earlier answers?")
    if got > bound:
        raise AssertionError(f"your decoder ran {got:.3f} target forward passes per token at "
                             f"gamma=4 (reference: {want:.3f}); it should be at most {bound}: "
                             "verify all proposals in one pass, and keep the bonus token")


def check_speedup(speculative_generate: Callable[..., Any], min_speedup: float,
                  max_vs_reference: float, namespace: dict[str, Any] | None = None) -> None:
    """Speed-up over target-only decoding, and time against the reference, measured in one
    process on one thread, interleaved (the runtime's ``speed_table`` with the reference as a
    third contender), once the greedy output on the timed prompts has been checked."""
    require(speculative_generate=speculative_generate)
    check_greedy_equals_target(speculative_generate, [4], bench_prompts(), 96,
                               namespace=namespace, stats=False)
    target, draft = shipped_pair()
    their_target, their_draft = shipped_pair_there(namespace)
    yours = guarded(speculative_generate, namespace)

    def decoder(_target: Any, _draft: Any, prompt: list[int], new_tokens: int,
                gamma: int) -> Any:  # the submission's decoder on the models where it runs
        return yours(their_target, their_draft, prompt, new_tokens, gamma=gamma)

    counter = make_there(namespace, ForwardCounter, their_target)
    try:
        with on_one_cpu(speculative_generate):
            t = speed_table(decoder, target=target, draft=draft, rounds=ROUNDS,
                            others={"reference": ref.speculative_generate})
        forwards = int(counter.count)
    finally:
        counter.close()
    # Each timed run of the submission decodes 96 tokens after each prompt; one target pass
    # gives at most gamma + 1 = 5 of them. A decoder that answers from a cache runs none.
    least = (ROUNDS + 1) * len(bench_prompts()) * 96 / 5
    if forwards < least:
        raise AssertionError(
            f"while it was timed, your decoder ran the target {forwards} times for "
            f"{(ROUNDS + 1) * len(bench_prompts()) * 96} tokens, fewer than the {least:.0f} "
            "passes they need at gamma=4: speed is graded on decoding done while timed, not "
            "on answers kept from earlier calls")
    speedup, vs_ref = t["target-only"] / t["yours"], t["yours"] / t["reference"]
    print(f"target-only {t['target-only']:.3f} s, reference {t['reference']:.3f} s, yours "
          f"{t['yours']:.3f} s: speed-up {speedup:.2f}x, {vs_ref:.2f}x the reference's time")
    if speedup < min_speedup or vs_ref > max_vs_reference:
        raise AssertionError(
            f"your speculative decoder is {speedup:.2f}x faster than target-only decoding "
            f"(want >= {min_speedup}) and takes {vs_ref:.2f}x the reference's time (want <= "
            f"{max_vs_reference}); look for per-token work outside the model calls")
