"""A tiny GPT-style decoder: pre-norm blocks, rotary positions, causal attention, tied embeddings.

The architecture is the one of GPT-2 (Radford et al., 2019) with two changes most current LLMs
share: LayerNorm before each sub-layer rather than after (pre-norm, as in GPT-2 itself and
later models), and rotary position embeddings (RoPE, Su et al., 2021) applied to queries and keys
instead of a learned position table. The output layer reuses the token embedding matrix (tied
embeddings, Press & Wolf, 2017).

``GPT.forward(tokens, cache)`` runs with or without a KV cache (see ``cache.py``); with one, the
tokens are the next ones of each sequence and their positions come from the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from torch.nn import functional as F  # noqa: N812

from .cache import DenseKVCache, KVCache
from .checkpoint import WEIGHTS_DIR, load_meta, load_weights
from .checkpoint import save as save


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    context: int
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model {self.d_model} must split into {self.n_heads} heads of an "
                             "even size (RoPE rotates pairs of dimensions)")


def rope_tables(head_dim: int, context: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of angle pos * base^(-2i/Dh) for every position and pair i: [context, Dh/2]."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(context, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., i], x[..., i + Dh/2]) of x [B, H, T, Dh] by the angles in cos/sin
    [B, 1, T, Dh/2]: the dot product of a rotated query and key then depends only on the
    distance between their positions."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Block(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads = layer, cfg.n_heads
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.up = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=False)
        self.down = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (self.qkv(self.norm1(x)).view(B, T, 3, self.n_heads, D // self.n_heads)
                   .permute(2, 0, 3, 1, 4))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = cache.attend(self.layer, q, k, v)
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, D))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class GPT(nn.Module):
    """Token ids [B, T] -> next-token logits [B, T, vocab]."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model)
        cos, sin = rope_tables(config.d_model // config.n_heads, config.context,
                               config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # Scale the residual branches' output layers down with depth (as GPT-2 does) so the
        # residual stream's variance does not grow with the number of layers.
        for block in self.blocks:
            for layer in (block.proj, block.down):
                nn.init.normal_(layer.weight, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        self._check_tokens(tokens)
        B, T = tokens.shape
        if cache is None:
            if T > self.config.context:
                raise ValueError(f"{T} tokens exceed the model's context of "
                                 f"{self.config.context}")
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        else:
            positions = cache.positions(T)
            if positions.shape != (B, T):
                raise ValueError(f"the cache holds {positions.shape[0]} sequences but the tokens "
                                 f"have batch size {B}")
            if int(positions.max()) >= self.config.context:
                raise ValueError(f"position {int(positions.max())} is past the model's context "
                                 f"of {self.config.context} (RoPE was trained up to there)")
        cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.advance(T)
        return F.linear(self.norm(x), self.embed.weight)

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
            got = (f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor)
                   else type(tokens).__name__)
            raise ValueError(f"GPT expects token ids as a LongTensor [batch, time], got {got}")
        if tokens.shape[1] == 0:
            raise ValueError("GPT got an empty sequence (0 tokens)")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"unknown token id {bad}: the vocabulary has ids "
                             f"0..{self.config.vocab_size - 1}")


def as_batch(prompt: torch.Tensor | list[int]) -> torch.Tensor:
    """A prompt given as a list of ids, a 1-D or a 2-D tensor, as a LongTensor [B, T]."""
    tokens = torch.as_tensor(prompt)
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"a prompt must be token ids of shape [T] or [B, T], got "
                         f"{tuple(tokens.shape)} {tokens.dtype}")
    return tokens.long()


def sample_next(logits: torch.Tensor, greedy: bool, temperature: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row of logits [B, V]: the argmax, or a sample at ``temperature``."""
    if greedy:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}; use greedy=True")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: GPT, prompt: torch.Tensor | list[int], max_new_tokens: int,
             cache: KVCache | Literal["dense"] | None = "dense", greedy: bool = True,
             temperature: float = 1.0, seed: int | None = None) -> torch.Tensor:
    """Append ``max_new_tokens`` tokens to the prompt; returns only the new ids, [B, new].

    ``cache="dense"`` decodes through a fresh ``DenseKVCache``; a ``KVCache`` object is used as
    given (it must be empty); ``None`` recomputes the whole sequence at every step, the slow
    oracle the cached versions are tested against.
    """
    tokens = as_batch(prompt).to(next(model.parameters()).device)
    B, T = tokens.shape
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if T + max_new_tokens > model.config.context:
        raise ValueError(f"a prompt of {T} tokens plus {max_new_tokens} new tokens exceeds the "
                         f"model's context of {model.config.context}")
    if isinstance(cache, str):
        if cache != "dense":
            raise ValueError(f"cache must be \"dense\", None or a KVCache, got {cache!r}")
        cache = DenseKVCache.for_model(model, batch=B, capacity=T + max_new_tokens)
    elif cache is not None and cache.length != 0:
        raise ValueError(f"generate needs an empty cache, this one holds {cache.length} tokens")
    generator = None if seed is None else torch.Generator(tokens.device).manual_seed(seed)
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=tokens.device)
    if max_new_tokens == 0:
        return out
    if cache is None:
        sequence = tokens
        for i in range(max_new_tokens):
            out[:, i] = sample_next(model(sequence)[:, -1], greedy, temperature, generator)
            sequence = torch.cat([sequence, out[:, i:i + 1]], dim=1)
        return out
    logits = model(tokens, cache)[:, -1]
    for i in range(max_new_tokens):
        out[:, i] = sample_next(logits, greedy, temperature, generator)
        if i + 1 < max_new_tokens:
            logits = model(out[:, i:i + 1], cache)[:, -1]
    return out


def load(name: Literal["target", "draft"] | str, directory: Path = WEIGHTS_DIR,
         device: torch.device | str = "cpu") -> GPT:
    """A shipped checkpoint ("target" or "draft") in float32, in eval mode."""
    meta = load_meta(name, directory)
    return load_weights(GPT(GPTConfig(**meta["config"])), name, directory, device)
