"""The tiny GPTs: shipped weights, tokenizer, KV cache and generation, checked against PyTorch's
own attention and against uncached decoding. Nothing here trains."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from course_runtime.models import (
    GPT,
    CharTokenizer,
    DenseKVCache,
    GPTConfig,
    KVCache,
    generate,
    load,
    load_corpus,
    load_meta,
    load_tokenizer,
)
from course_runtime.models.cache import attention_reference
from course_runtime.models.gpt import apply_rope, rope_tables
from course_runtime.models.tokenizer import split_corpus
from course_runtime.models.train import evaluate

PROMPTS = ["Call me Ishmael. ", "The whale", "\"Aye, aye, sir!\" cried Stubb"]


@pytest.fixture(scope="module")
def target() -> GPT:
    return load("target")


@pytest.fixture(scope="module")
def draft() -> GPT:
    return load("draft")


@pytest.fixture(scope="module")
def tokenizer() -> CharTokenizer:
    return load_tokenizer()


def small_gpt(seed: int = 0, **overrides: int) -> GPT:
    torch.manual_seed(seed)
    config = dict(vocab_size=11, d_model=32, n_layers=2, n_heads=4, context=64) | overrides
    return GPT(GPTConfig(**config)).eval()


# --- corpus, tokenizer, shipped weights -------------------------------------------------------

def test_corpus_is_the_whole_book_in_ascii(tokenizer: CharTokenizer) -> None:
    text = load_corpus()
    assert len(text) > 1_000_000
    assert text.isascii()
    assert text.startswith("ETYMOLOGY.")
    assert "Call me Ishmael." in text and "CHAPTER 135. The Chase.--Third Day." in text
    # The shipped tokenizer is the corpus's alphabet, so every character of the book encodes.
    assert CharTokenizer.from_text(text).alphabet == tokenizer.alphabet


def test_tokenizer_round_trip(tokenizer: CharTokenizer) -> None:
    text = load_corpus()[500_000:520_000]
    ids = tokenizer.encode(text)
    assert len(ids) == len(text) and max(ids) < tokenizer.vocab_size
    assert tokenizer.decode(ids) == text


def test_tokenizer_rejects_unknown_input(tokenizer: CharTokenizer) -> None:
    with pytest.raises(ValueError, match="unknown character '\u00e9' at index 3"):
        tokenizer.encode("caf\u00e9")
    with pytest.raises(ValueError, match=f"unknown token id {tokenizer.vocab_size}"):
        tokenizer.decode([0, tokenizer.vocab_size])
    with pytest.raises(ValueError, match="repeated"):
        CharTokenizer("abca")


def test_shipped_checkpoints_load(target: GPT, draft: GPT, tokenizer: CharTokenizer) -> None:
    for model in (target, draft):
        assert model.config.vocab_size == tokenizer.vocab_size
        assert not model.training
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all()
                   for p in model.parameters())
    assert 2_000_000 <= target.num_params() <= 5_000_000
    assert target.num_params() > 15 * draft.num_params()
    assert target.config.n_layers >= 4 * draft.config.n_layers
    # Tied embeddings: the output layer is the embedding matrix, not a copy.
    assert "embed.weight" in target.state_dict() and not any(
        "head" in name for name in target.state_dict())
    with pytest.raises(FileNotFoundError, match="shipped checkpoints"):
        load("nonexistent")


def test_target_beats_draft_beats_chance(target: GPT, draft: GPT, tokenizer: CharTokenizer
                                         ) -> None:
    _, val = split_corpus(load_corpus())
    ids = torch.tensor(tokenizer.encode(val), dtype=torch.uint8)
    chance = math.log(tokenizer.vocab_size)
    target_loss = evaluate(target, ids)
    draft_loss = evaluate(draft, ids)
    assert target_loss < draft_loss - 0.05, (target_loss, draft_loss)
    assert draft_loss < 0.6 * chance, (draft_loss, chance)
    assert target_loss < 0.45 * chance, (target_loss, chance)
    # The figures written beside the weights are the ones a user gets.
    assert abs(load_meta("target")["val_loss"] - target_loss) < 1e-3
    assert abs(load_meta("draft")["val_loss"] - draft_loss) < 1e-3


# --- the model's parts against PyTorch --------------------------------------------------------

def test_rope_scores_depend_only_on_relative_position() -> None:
    torch.manual_seed(0)
    head_dim, context = 16, 40
    cos, sin = rope_tables(head_dim, context, 10000.0)
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def rotated(x: torch.Tensor, pos: int) -> torch.Tensor:
        return apply_rope(x.view(1, 1, 1, -1), cos[pos].view(1, 1, 1, -1),
                          sin[pos].view(1, 1, 1, -1)).flatten()

    for m, n in [(3, 1), (20, 18), (39, 37)]:
        score = rotated(q, m) @ rotated(k, n)
        assert torch.allclose(score, rotated(q, 2) @ rotated(k, 0), atol=1e-5)
    # Rotations keep lengths, and position 0 is the identity.
    assert torch.allclose(rotated(q, 17).norm(), q.norm(), atol=1e-5)
    assert torch.equal(rotated(q, 0), q)


def test_dense_cache_attention_matches_full_causal_attention() -> None:
    """Prefill 5 tokens, then chunks of 1, 3 and 2: every chunk's output equals the matching rows
    of causal attention over the whole sequence at once (PyTorch's SDPA)."""
    torch.manual_seed(0)
    B, H, T, Dh = 2, 3, 11, 8
    q, k, v = (torch.randn(B, H, T, Dh) for _ in range(3))
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    cache = DenseKVCache(n_layers=1, batch=B, n_heads=H, head_dim=Dh, capacity=T)
    assert isinstance(cache, KVCache)
    start = 0
    for n in (5, 1, 3, 2):
        rows = slice(start, start + n)
        assert torch.equal(cache.positions(n), torch.arange(start, start + n).expand(B, n))
        out = cache.attend(0, q[:, :, rows], k[:, :, rows], v[:, :, rows])
        cache.advance(n)
        torch.testing.assert_close(out, full[:, :, rows])
        torch.testing.assert_close(out, attention_reference(q[:, :, rows], k[:, :, :start + n],
                                                            v[:, :, :start + n], start))
        start += n
    assert cache.length == T and cache.lengths.tolist() == [T, T]


def test_truncate_then_rewrite_equals_never_written() -> None:
    torch.manual_seed(1)
    B, H, Dh = 1, 2, 4
    q, k, v = (torch.randn(B, H, 9, Dh) for _ in range(3))
    wrong = torch.randn(B, H, 3, Dh)
    cache = DenseKVCache(1, B, H, Dh, capacity=9)
    cache.attend(0, q[:, :, :6], k[:, :, :6], v[:, :, :6])
    cache.advance(6)
    cache.attend(0, wrong, wrong, wrong)  # three speculative tokens ...
    cache.advance(3)
    cache.truncate(6)                     # ... rejected
    out = cache.attend(0, q[:, :, 6:], k[:, :, 6:], v[:, :, 6:])
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, full[:, :, 6:])


def test_cached_forward_matches_uncached_logits() -> None:
    model = small_gpt()
    tokens = torch.randint(0, 11, (3, 20), generator=torch.Generator().manual_seed(0))
    full = model(tokens)
    cache = DenseKVCache.for_model(model, batch=3)
    pieces = [model(tokens[:, a:b], cache) for a, b in [(0, 7), (7, 8), (8, 14), (14, 20)]]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)


def test_causality_future_tokens_do_not_change_past_logits() -> None:
    model = small_gpt()
    tokens = torch.randint(0, 11, (1, 16), generator=torch.Generator().manual_seed(2))
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 11
    torch.testing.assert_close(model(tokens)[:, :10], model(changed)[:, :10])
    assert not torch.allclose(model(tokens)[:, 10:], model(changed)[:, 10:])


# --- generation -------------------------------------------------------------------------------

def test_cached_greedy_generation_is_token_identical_to_uncached(
        target: GPT, draft: GPT, tokenizer: CharTokenizer) -> None:
    for model in (target, draft):
        for text in PROMPTS[:2]:
            prompt = tokenizer.encode(text)
            cached = generate(model, prompt, 40)
            uncached = generate(model, prompt, 40, cache=None)
            assert torch.equal(cached, uncached), tokenizer.decode(cached[0])


def test_batched_cached_generation_matches_one_by_one(target: GPT, tokenizer: CharTokenizer
                                                      ) -> None:
    prompts = torch.tensor([tokenizer.encode("The sea."), tokenizer.encode("Ahab sai")])
    batched = generate(target, prompts, 24)
    for row in range(2):
        assert torch.equal(batched[row], generate(target, prompts[row], 24)[0])


def test_greedy_text_is_english_like(target: GPT, tokenizer: CharTokenizer) -> None:
    text = tokenizer.decode(generate(target, tokenizer.encode(PROMPTS[0]), 120)[0])
    words = text.split()
    common = {"the", "of", "and", "a", "to", "in", "that", "his", "it", "I", "was", "he", "with",
              "is", "as", "for", "all", "this", "at", "by", "but", "not", "whale", "so", "from"}
    assert len(words) >= 15, text
    assert sum(w.strip(".,;!?\"'-") in common for w in words) >= 4, text


def test_sampling_is_seeded() -> None:
    model = small_gpt(seed=3)
    prompt = [1, 2, 3]
    a = generate(model, prompt, 30, greedy=False, seed=7)
    assert torch.equal(a, generate(model, prompt, 30, greedy=False, seed=7))
    assert not torch.equal(a, generate(model, prompt, 30, greedy=False, seed=8))
    assert torch.equal(a, generate(model, prompt, 30, greedy=False, seed=7, cache=None))


def test_bad_input_gives_clear_errors() -> None:
    model = small_gpt()
    with pytest.raises(ValueError, match="unknown token id 11: the vocabulary has ids 0..10"):
        model(torch.tensor([[1, 11]]))
    with pytest.raises(ValueError, match="unknown token id -1"):
        generate(model, [3, -1], 2)
    with pytest.raises(ValueError, match=r"LongTensor \[batch, time\], got \(2, 3\) torch.float32"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="65 tokens exceed the model's context of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt of 60 tokens plus 5 new tokens exceeds the "
                                         "model's context of 64"):
        generate(model, [0] * 60, 5)
    with pytest.raises(ValueError, match="temperature must be positive"):
        generate(model, [0], 3, greedy=False, temperature=0)


def test_cache_errors_name_the_problem() -> None:
    model = small_gpt()
    cache = DenseKVCache.for_model(model, batch=1, capacity=8)
    model(torch.zeros(1, 6, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="KV cache full: it holds 6 of 8 tokens per sequence and "
                                         "cannot take 3 more"):
        model(torch.zeros(1, 3, dtype=torch.long), cache)
    assert cache.length == 6  # the failed call stored nothing
    with pytest.raises(ValueError, match="generate needs an empty cache, this one holds 6"):
        generate(model, [1], 1, cache=cache)
    with pytest.raises(ValueError, match="holds 1 sequences but the tokens have batch size 2"):
        model(torch.zeros(2, 1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match=r"truncate\(7\): the cache holds 6 tokens"):
        cache.truncate(7)
    with pytest.raises(ValueError, match=r"expected k of shape \(1, 4, 2, 8\), got \(1, 4, 2, 4\)"):
        cache.attend(0, torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 4), torch.zeros(1, 4, 2, 8))
    with pytest.raises(IndexError, match="layer 2 out of range for a cache of 2 layers"):
        cache.attend(2, *(torch.zeros(1, 4, 1, 8) for _ in range(3)))
    long_cache = DenseKVCache.for_model(model, capacity=100)
    model(torch.zeros(1, 64, dtype=torch.long), long_cache)
    with pytest.raises(ValueError, match="position 64 is past the model's context of 64"):
        model(torch.zeros(1, 1, dtype=torch.long), long_cache)
