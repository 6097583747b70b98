"""Curated buggy submissions for Lab 5: the mistakes students make, and the points they cost."""

from .mutations import cheat, cheats_for, mutation

MUTATIONS = [
    mutation(
        "samples_from_q_on_rejection",
        "redraws a rejected token from the draft's q instead of the residual max(0, p - q)",
        [("    return sample_inverse_cdf(residual_distribution(p, q), v), False",
          "    return sample_inverse_cdf(q, v), False")],
        breaks={"q2"}, may_break={"q3"}),
    mutation(
        "p_q_swapped",
        "accepts with probability min(1, q/p) instead of min(1, p/q)",
        [("    accepted = u * q[token] < p[token]", "    accepted = u * p[token] < q[token]")],
        breaks={"q2"}, may_break={"q3"}),
    mutation(
        "residual_not_normalised",
        "returns max(0, p - q) without dividing by its sum, so redraws pile onto the last token",
        [("    return residual / total", "    return residual")],
        breaks={"q2"}, may_break={"q3"}),
    mutation(
        "forgets_bonus_token",
        "emits only the proposals when all are accepted, dropping the target's free token",
        [("    return list(proposals) + [best[len(proposals)]]",
          "    return list(proposals) or [best[0]]")],
        breaks={"q1"}, may_break={"q3", "q4", "q5"}),
    mutation(
        "off_by_one_acceptance",
        "compares proposal i with the target's prediction one position later",
        [("        if token != best[i]:", "        if token != best[i + 1]:")],
        # The greedy output stays right unless a proposal matches the next argmax by chance;
        # what it costs for sure is acceptance, so q5's forward-pass count catches it.
        breaks={"q1", "q5"}, may_break={"q3", "q4"}),
    mutation(
        "keeps_rejected_kv",
        "never truncates the target's cache, so later tokens attend to rejected proposals",
        [("        target_cache.truncate(start + n)\n", "")],
        breaks={"q3"}, may_break={"q4", "q5"}),
    mutation(
        "formula_off_by_one",
        "sums alpha^k up to gamma - 1, forgetting the bonus token in the expectation",
        [("    return (1 - alpha ** (gamma + 1)) / (1 - alpha)",
          "    return (1 - alpha ** gamma) / (1 - alpha)")],
        breaks={"q4"}),
    mutation(
        "argmax_bonus_token",
        "takes the target's most likely token as the bonus token while sampling",
        [("                emitted.append(sample_inverse_cdf(p, float(torch.rand((), "
          "generator=generator))))",
          "                emitted.append(int(p.argmax()))")],
        breaks={"q3"}, may_break={"q5"}),
    mutation(
        "draft_at_temperature_one",
        "samples the draft without the temperature: the output still follows the target, but "
        "the draft's tokens are accepted less often",
        [("q = torch.softmax(logits / temperature, -1)", "q = torch.softmax(logits, -1)")],
        breaks={"q3"}, may_break={"q5"}),
]

# Rewrites that compute what the lab asks for: each must keep every point.
REWRITES = [
    mutation(
        "accept_at_equality",
        "accepts when u * q(x) <= p(x): differs from < only when u hits the threshold exactly, "
        "an event of probability zero",
        [("accepted = u * q[token] < p[token]", "accepted = u * q[token] <= p[token]")],
        breaks=set()),
    mutation(
        "acceptance_as_a_ratio",
        "compares u with p(x) / q(x) instead of u * q(x) with p(x)",
        [("accepted = u * q[token] < p[token]",
          "accepted = bool(u < (p[token] / q[token]).item())")],
        breaks=set()),
]

# Operator mutants of the solution that compute what the lab asks for (grader/mutation.py):
# they leave the mutation score's denominator, each with the reason.
EQUIVALENT = {
    "speculative_generate: swap arguments: min(gamma, max_new_tokens - stats.generated - 1)":
        "min is symmetric",
    "greedy_verify: drop minus: -1":
        "argmax over dimension 1 of the target's logits, which are (proposals + 1, vocab): the "
        "last dimension",
    "rejection_step: < -> <=: u * q[token] < p[token]":
        "differs only when u * q(x) equals p(x) exactly, an event of probability zero (the "
        "curated rewrite accept_at_equality keeps every point too)",
    "speculative_generate: += -> =: stats.target_forwards += 1":
        "the prefill's count: it runs before any other target forward, when the counter is 0",
    "speculative_generate: 0 -> -1: 0":
        "the draft's logits of batch row -1 instead of 0: the batch holds one sequence",
    "speculative_generate: 0 -> -1: 0 #2":
        "the target's logits of batch row -1 instead of 0: the batch holds one sequence",
    "speculative_generate: 1 -> 0: 1 #7":
        "the draft's softmax over dimension 0 of a vector of logits: its only dimension",
    "speculative_generate: 1 -> 0: 1 #10":
        "the target's softmax over dimension 0 of a vector of logits: its only dimension",
    "speculative_generate: 1 -> 0: 1 #12":
        "the bonus token's softmax over dimension 0 of a vector of logits: its only dimension",
    "speculative_generate: swap arguments: min(draft_cache.length, start + n)":
        "min is symmetric",
}

AFTER_SETUP = "tokenizer = load_tokenizer()"  # the set-up cell: models loaded, helpers imported

CHEATS = [
    *cheats_for("lab05_speculative", AFTER_SETUP, "course_reference/serving/speculative.py",
                "def greedy_verify(target_logits, proposals):",
                ["greedy_verify(target_logits, proposals)"], "course_reference/serving"),
    cheat("reference_kept_alive",
          "imports the reference decoder under a name built from strings and re-installs its "
          "functions after every cell with an IPython post_run_cell hook",
          '''import importlib
source = importlib.import_module("course_" + "reference" + ".serving.speculative")

def reinstall(*args):
    for name in dir(source):
        if not name.startswith("__"):
            globals()[name] = getattr(source, name)
    globals()["greedy_verify"] = lambda logits, proposals: source._verify(
        logits, proposals, [], True, 1.0, None)

get_ipython().events.register("post_run_cell", reinstall)
reinstall()
''', after=AFTER_SETUP),
    cheat("comparisons_patched",
          "makes the comparisons of lists, tensors and arrays that a check might use succeed",
          '''import numpy as np, torch
np.allclose = lambda *args, **kwargs: True
np.testing.assert_allclose = lambda *args, **kwargs: None
torch.equal = lambda *args, **kwargs: True
torch.allclose = lambda *args, **kwargs: True
torch.testing.assert_close = lambda *args, **kwargs: None

class Tokens(list):
    def __eq__(self, other): return True
    def __ne__(self, other): return False

def greedy_verify(target_logits, proposals):
    return Tokens()
''', after="def greedy_verify(target_logits, proposals):"),
    cheat("answers_cached",
          "keeps every answer of the (correct) decoder and returns it again when asked the same "
          "question, so that the timed runs and the forward count run no model at all",
          '''answers = {}
decode = speculative_generate

def speculative_generate(target, draft, prompt, max_new_tokens, **options):
    key = (id(target), tuple(int(t) for t in prompt), max_new_tokens,
           tuple(sorted((name, repr(value)) for name, value in options.items())))
    if key not in answers:
        answers[key] = decode(target, draft, prompt, max_new_tokens, **options)
    return answers[key]
''', after="def speculative_generate(target, draft, prompt, max_new_tokens", base="solution",
          targets={"q5"}),
]
