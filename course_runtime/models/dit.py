"""The course's tiny diffusion transformer (DiT, Peebles and Xie, ICCV 2023), class-conditional.

An image ``[B, C, H, W]`` is cut into ``p x p`` patches, one token each (``patchify``); the tokens
get a fixed 2-D sine-cosine position embedding and go through ``n_layers`` transformer blocks
conditioned on the timestep and the class by *adaLN-Zero*: each block's LayerNorms have no
parameters of their own; a linear map of the conditioning vector gives each block a shift, a
scale and a gate for its attention and for its MLP, initialised to zero so that every block
starts as the identity. A last adaLN-modulated linear layer maps each token back to its patch's
pixels (``unpatchify``): the model predicts the noise that was added to the image.

Class ``num_classes`` is the *null* class: training drops the label to it now and then, so that
one model gives both the conditional and the unconditional prediction that classifier-free
guidance (Ho and Salimans, 2021) mixes.

The block is written as its pieces (``modulations``, ``qkv``, ``attend``, ``attention_out``,
``mlp_out``) so that the parallel samplers of Part V can run a block on a slice of the tokens
with keys and values that came from elsewhere (other ranks, or the previous step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from .checkpoint import WEIGHTS_DIR, load_meta, load_weights
from .checkpoint import save as save


@dataclass(frozen=True)
class DiTConfig:
    image_size: int = 16
    channels: int = 1
    patch: int = 1
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    num_classes: int = 10
    mlp_ratio: int = 4
    frequency_dim: int = 256  # sinusoidal features of the timestep, before its MLP

    def __post_init__(self) -> None:
        if self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the patch "
                             f"size {self.patch}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} does not split into {self.n_heads} heads")
        if self.d_model % 4:
            raise ValueError("the 2-D position embedding needs d_model divisible by 4")

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)(W/p), C p p]``: patches in row-major order."""
    B, C, H, W = x.shape
    if H % patch or W % patch:
        raise ValueError(f"an image of {H}x{W} does not split into patches of {patch}")
    x = x.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // patch) * (W // patch), C * patch * patch)


def unpatchify(tokens: torch.Tensor, patch: int, channels: int, height: int,
               width: int) -> torch.Tensor:
    """The inverse of ``patchify``."""
    B = tokens.shape[0]
    rows, cols = height // patch, width // patch
    x = tokens.reshape(B, rows, cols, channels, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, channels, height, width)


def position_embedding(d_model: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine embedding ``[grid * grid, d_model]``: half the channels encode the
    column, half the row, each as sines then cosines of geometric frequencies (the layout of
    the DiT paper's code, and of diffusers' ``PatchEmbed``)."""
    quarter = d_model // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for coordinate in (cols.flatten(), rows.flatten()):
        angles = coordinate[:, None] * frequencies[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``[B, dim]`` of timesteps ``t`` ``[B]``: cosines then sines of
    frequencies from 1 down to ``1 / max_period`` (as the DiT code and diffusers' ``Timesteps``
    with ``flip_sin_to_cos`` and a frequency shift of 1 compute them)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32)
                            / (half - 1)).to(t.device)
    angles = t.float()[:, None] * frequencies[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with one shift and scale per image (``[B, D]``)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.qkv_proj = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.fc1 = nn.Linear(d, config.mlp_ratio * d)
        self.fc2 = nn.Linear(config.mlp_ratio * d, d)
        self.ada = nn.Linear(d, 6 * d)  # after a SiLU of the conditioning vector

    def modulations(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(shift, scale, gate) of the attention, then of the MLP: six ``[B, D]`` tensors."""
        return self.ada(F.silu(c)).chunk(6, dim=1)

    def qkv(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values ``[B, heads, N, head_dim]`` of tokens ``x`` ``[B, N, D]``."""
        B, N, D = x.shape
        q, k, v = self.qkv_proj(modulate(self.norm1(x), shift, scale)).chunk(3, dim=-1)
        return tuple(t.reshape(B, N, self.n_heads, D // self.n_heads).transpose(1, 2)
                     for t in (q, k, v))

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Full (not causal) attention of queries over keys and values; ``[B, Nq, D]``."""
        out = F.scaled_dot_product_attention(q, k, v)
        B, H, N, Dh = out.shape
        return out.transpose(1, 2).reshape(B, N, H * Dh)

    def attention_out(self, x: torch.Tensor, attended: torch.Tensor,
                      gate: torch.Tensor) -> torch.Tensor:
        return x + gate[:, None] * self.out_proj(attended)

    def mlp_out(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                gate: torch.Tensor) -> torch.Tensor:
        h = self.fc2(F.gelu(self.fc1(modulate(self.norm2(x), shift, scale)), approximate="tanh"))
        return x + gate[:, None] * h

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulations(c)
        q, k, v = self.qkv(x, shift_a, scale_a)
        x = self.attention_out(x, self.attend(q, k, v), gate_a)
        return self.mlp_out(x, shift_m, scale_m, gate_m)


class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        d, p = config.d_model, config.patch
        self.patch_embed = nn.Linear(config.channels * p * p, d)
        self.register_buffer("pos", position_embedding(d, config.grid), persistent=False)
        self.t_mlp = nn.Sequential(nn.Linear(config.frequency_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.label_embed = nn.Embedding(config.num_classes + 1, d)  # the last is the null class
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(d, 2 * d)
        self.final = nn.Linear(d, config.channels * p * p)
        self._initialise()

    def _initialise(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.label_embed.weight, std=0.02)
        for layer in self.t_mlp:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, and the output as zero.
        for module in [*(b.ada for b in self.blocks), self.final_ada, self.final]:
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def condition(self, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The conditioning vector ``[B, D]`` of timesteps and class labels."""
        return self.t_mlp(timestep_features(t, self.config.frequency_dim)) + \
            self.label_embed(labels)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``[B, C, H, W]`` -> tokens ``[B, N, D]`` with their positions."""
        return self.patch_embed(patchify(x, self.config.patch)) + self.pos

    def head(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, n, D]`` -> each token's patch of predicted noise ``[B, n, C p p]``."""
        shift, scale = self.final_ada(F.silu(c)).chunk(2, dim=1)
        return self.final(modulate(self.final_norm(tokens), shift, scale))

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The noise predicted in images ``x`` ``[B, C, H, W]`` at timesteps ``t`` ``[B]``."""
        config = self.config
        c = self.condition(t, labels)
        tokens = self.embed(x)
        for block in self.blocks:
            tokens = block(tokens, c)
        return unpatchify(self.head(tokens, c), config.patch, config.channels,
                          config.image_size, config.image_size)


# --------------------------------------------------------------------------------------------
# The shipped checkpoint
# --------------------------------------------------------------------------------------------

def load(name: str = "dit", directory: Path = WEIGHTS_DIR,
         device: torch.device | str = "cpu") -> DiT:
    """The shipped DiT (trained by ``python -m course_reference.diffusion.train``) in float32,
    in eval mode."""
    meta = load_meta(name, directory)
    return load_weights(DiT(DiTConfig(**meta["config"])), name, directory, device)
