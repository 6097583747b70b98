"""Weight-only and weight-and-activation quantization of the tiny GPT.

Decoding reads every weight once per step (see ``roofline.py``), so its time is the weights'
bytes over the memory bandwidth: storing weights in 8 or 4 bits instead of 16 makes each step up to
2 or 4 times cheaper to read. This module quantizes the linear layers of the course's tiny GPT
(``course_runtime.models.GPT``) four ways:

- **round-to-nearest (RTN)**, symmetric, with one scale per output channel or per group of
  ``group_size`` input columns: each weight becomes round(w / scale), an integer in
  [-qmax, qmax] with qmax = 2^(bits-1) - 1, so it moves by at most scale / 2;
- **GPTQ** (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
  Transformers", ICLR 2023, Algorithm 1): columns are quantized one at a time, and each column's
  rounding error is pushed onto the columns not yet quantized through the inverse Hessian
  H = 2 X^T X of the layer's calibration inputs, so the layer's *output* on those inputs moves
  less than RTN's;
- **AWQ** (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
  Acceleration", MLSys 2024, section 3.2): input channels that carry large activations are scaled
  up in the weight (and down in the input) before RTN, so their weights lose less relative
  precision; the exponent of the scale is picked by a small grid search on calibration data;
- **SmoothQuant** (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization
  for Large Language Models", ICML 2023, section 4): activation outliers are migrated into the
  weights by s_j = max|X_j|^alpha / max|W_j|^(1-alpha), folded into the LayerNorm before the layer,
  so that both the activations and the weights quantize well to int8 (W8A8).

Quantized weights are stored for real (int8 values, or two int4/int3 values per byte) with float16
scales, in ``QuantizedLinear``, which dequantizes in its forward: the byte counts are those of the
stored tensors, while the arithmetic is float32 (a CPU kernel for int4 is out of scope).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.nn import functional as F  # noqa: N812

from course_runtime.models.gpt import GPT

LINEARS = ("qkv", "proj", "up", "down")  # the linear layers of a block, in the order they run


def qmax(bits: int) -> int:
    """Largest integer of the symmetric grid: 127 for int8, 7 for int4, 3 for int3.

    The grid [-qmax, qmax] leaves out the most negative code (-128, -8) so that it is symmetric
    about an exact zero, as the symmetric schemes of GPTQ and SmoothQuant are."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    return 2 ** (bits - 1) - 1


def _check_groups(weight: torch.Tensor, group_size: int | None) -> int:
    """The group size actually used: the whole row (per-channel) when ``group_size`` is None."""
    if weight.dim() != 2:
        raise ValueError(f"expected a weight matrix [out, in], got shape {tuple(weight.shape)}")
    columns = weight.shape[1]
    if group_size is None:
        return columns
    if group_size <= 0 or columns % group_size:
        raise ValueError(f"group_size {group_size} must be positive and divide the "
                         f"{columns} input columns")
    return group_size


def absmax_scales(weight: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """One scale per output row and group of input columns, [out, in / group], as float16.

    scale = max|w| / qmax over the group. Storing it in float16 changes it by at most 2^-11 of
    itself, which moves the group's largest weight by at most qmax * 2^-11 of a step from the end
    of the grid: well within the half step that rounding allows. An all-zero group gets scale 1
    (every code is 0)."""
    group = _check_groups(weight, group_size)
    top = weight.detach().float().abs().reshape(weight.shape[0], -1, group).amax(-1)
    scale = (top / qmax(bits)).to(torch.float16)
    return torch.where(top > 0, scale, torch.ones_like(scale))


def _expand(scales: torch.Tensor, columns: int) -> torch.Tensor:
    """Scales [out, groups] repeated over each group's columns: [out, columns]."""
    return scales.float().repeat_interleave(columns // scales.shape[1], dim=1)


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric quantization: (codes int8 [out, in], scales float16 [out, g])."""
    weight = weight.detach()
    scales = absmax_scales(weight, bits, group_size)
    codes = torch.round(weight.float() / _expand(scales, weight.shape[1]))
    return codes.clamp(-qmax(bits), qmax(bits)).to(torch.int8), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes * scale, in float32."""
    return codes.float() * _expand(scales, codes.shape[1])


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes in [-8, 7] per uint8, along the last dimension (which must be even).

    Code 2k goes to the low nibble and code 2k + 1 to the high one, in two's complement."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got shape {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise ValueError(f"int4 codes must lie in [-8, 7], got [{int(codes.min())}, "
                         f"{int(codes.max())}]")
    nibbles = codes.to(torch.int16) & 0xF
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_int4``: int8 codes in [-8, 7], twice as many along the last dim."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 expects uint8, got {packed.dtype}")
    wide = packed.to(torch.int16)
    low, high = wide & 0xF, wide >> 4
    both = torch.stack((low, high), dim=-1).flatten(-2)
    return torch.where(both > 7, both - 16, both).to(torch.int8)


def quantize_activations(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic per-token symmetric fake quantization of activations [..., channels].

    Each token (row) gets the scale max|x_row| / qmax: a kernel can apply it after the integer
    matrix product, whereas a per-*channel* activation scale would sit inside the sum over
    channels (SmoothQuant, section 3)."""
    top = x.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    scale = top / qmax(bits)
    return torch.round(x / scale).clamp(-qmax(bits), qmax(bits)) * scale


class QuantizedLinear(nn.Module):
    """A bias-free linear layer whose weight is stored as integer codes and float16 scales.

    ``input_scale`` (optional, per input channel) divides the input before the product, the
    runtime form of AWQ's scaling when it cannot be folded into the previous layer; the stored
    weight already carries the matching factor. ``act_bits`` fake-quantizes the input per token
    (W8A8 when both are 8)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bits: int,
                 input_scale: torch.Tensor | None = None, act_bits: int | None = None):
        super().__init__()
        self.bits, self.act_bits = bits, act_bits
        self.out_features, self.in_features = codes.shape
        if int(codes.abs().max()) > qmax(bits):
            raise ValueError(f"codes exceed the {bits}-bit range [-{qmax(bits)}, {qmax(bits)}]")
        stored = pack_int4(codes) if bits <= 4 else codes.to(torch.int8)
        self.register_buffer("codes", stored)
        self.register_buffer("scales", scales.to(torch.float16))
        self.register_buffer("input_scale", None if input_scale is None
                             else input_scale.to(torch.float16))

    def weight(self) -> torch.Tensor:
        """The dequantized weight the layer multiplies by, float32 [out, in]."""
        codes = unpack_int4(self.codes) if self.bits <= 4 else self.codes
        return dequantize(codes, self.scales)

    @property
    def nbytes(self) -> int:
        """Bytes of everything the layer stores: codes, scales and input scales."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantizedLinear expects inputs with {self.in_features} features, "
                             f"got shape {tuple(x.shape)}")
        if self.input_scale is not None:
            x = x / self.input_scale.float()
        if self.act_bits is not None:
            x = quantize_activations(x, self.act_bits)
        return F.linear(x, self.weight())


# --- GPTQ ---------------------------------------------------------------------------------------

def hessian(inputs: torch.Tensor) -> torch.Tensor:
    """H = 2 X^T X / n of the layer's inputs X [n, in], in float64: the Hessian of the squared
    output error ||X W^T - X Q^T||^2 / n with respect to each row of Q."""
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    return 2 * x.T @ x / x.shape[0]


def quantize_gptq(weight: torch.Tensor, H: torch.Tensor, bits: int,
                  group_size: int | None = None, damp: float = 0.01
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al., Algorithm 1, one column at a time): (codes int8, scales float16).

    After rounding column i, its error e (divided by [H^-1]_ii) is subtracted from the remaining
    columns j > i in proportion to [H^-1]_ij, the optimal compensation of the Optimal Brain
    Surgeon. Using the upper Cholesky factor of H^-1 gives every step's row of the shrinking
    inverse at once. ``damp`` adds that fraction of the mean diagonal to H, which keeps it
    invertible when inputs are few or correlated. With group scales, each group's scale is taken
    from the already-updated weights when the loop reaches it, as GPTQ does."""
    group = _check_groups(weight, group_size)
    out_features, columns = weight.shape
    if H.shape != (columns, columns):
        raise ValueError(f"the Hessian must be [{columns}, {columns}] for a weight with "
                         f"{columns} input columns, got {tuple(H.shape)}")
    W = weight.detach().double().clone()
    H = H.double().clone()
    dead = torch.diagonal(H) == 0  # inputs that are always zero: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diagonal(H).mean() * torch.eye(columns, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    limit = qmax(bits)
    codes = torch.empty(out_features, columns, dtype=torch.int8)
    scales = torch.empty(out_features, columns // group, dtype=torch.float16)
    # GPTQ's lazy batch updates: the error of a column is applied at once only to the columns of
    # its own block of ``lazy`` columns; the later columns get the whole block's errors in one
    # matrix product. Same result, a fraction of the memory traffic.
    # A block holds whole groups, so each group's scale is taken when the group is complete.
    lazy = 128 if group_size is None else max(group, 128 // group * group)
    if group_size is None:
        scales[:, 0] = absmax_scales(W.float(), bits)[:, 0]
    for start in range(0, columns, lazy):
        end = min(start + lazy, columns)
        block, errors = W[:, start:end], torch.empty(out_features, end - start, dtype=W.dtype)
        for j in range(end - start):
            i = start + j
            if group_size is not None and i % group == 0:
                scales[:, i // group] = absmax_scales(block[:, j:j + group].float(), bits)[:, 0]
            scale = scales[:, i // group].double()
            q = torch.round(block[:, j] / scale).clamp(-limit, limit)
            codes[:, i] = q.to(torch.int8)
            errors[:, j] = (block[:, j] - q * scale) / Hinv[i, i]
            block[:, j:] -= errors[:, j:j + 1] * Hinv[i, i:end][None, :]
        W[:, end:] -= errors @ Hinv[start:end, end:]
    return codes, scales


# --- AWQ and SmoothQuant --------------------------------------------------------------------------

def output_error(weight: torch.Tensor, approx: torch.Tensor, inputs: torch.Tensor) -> float:
    """Mean squared error of the layer's output on ``inputs``: ||X W^T - X A^T||^2 / n."""
    x = inputs.reshape(-1, inputs.shape[-1]).detach().float()
    difference = (weight.detach().float() - approx.detach().float()).T
    return float(((x @ difference) ** 2).sum(-1).mean())


def awq_search(weight: torch.Tensor, inputs: torch.Tensor, bits: int,
               group_size: int | None = None, grid: Iterable[float] = tuple(i / 10 for i in
                                                                             range(11))
               ) -> tuple[float, torch.Tensor]:
    """AWQ's scale search (Lin et al., section 3.2): the exponent alpha, and the input-channel
    scales s = mean|X_j|^alpha (normalised to a geometric mean of 1), whose RTN quantization of
    W diag(s) gives the smallest output error on ``inputs``. alpha = 0 (s = 1) is plain RTN, so
    the result is never worse than RTN on the calibration data."""
    x, weight = inputs.reshape(-1, inputs.shape[-1]).detach().float(), weight.detach()
    mean_abs = x.abs().mean(0).clamp_min(1e-8)
    best: tuple[float, float, torch.Tensor] | None = None
    for alpha in grid:
        s = mean_abs ** alpha
        s = s / (s.max() * s.min()).sqrt()  # keep the scales around 1 (AWQ's normalisation)
        s = s.to(torch.float16).float()  # the stored precision
        codes, scales = quantize_rtn(weight * s, bits, group_size)
        error = output_error(weight, dequantize(codes, scales) / s, x)
        if best is None or error < best[0]:
            best = (error, alpha, s)
    if best is None:
        raise ValueError("awq_search needs at least one alpha in its grid")
    return best[1], best[2]


def smoothing_scales(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5
                     ) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors s_j = max|X_j|^alpha / max_i |W_ij|^(1-alpha)
    (Xiao et al., equation 4). X diag(s)^-1 and diag(s) W^T multiply to the same product, with
    the activations' outlier channels divided down and the weights' columns multiplied up."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"the migration strength alpha must lie in [0, 1], got {alpha}")
    if act_absmax.shape != (weight.shape[1],):
        raise ValueError(f"expected one activation maximum per input channel "
                         f"({weight.shape[1]}), got shape {tuple(act_absmax.shape)}")
    w_absmax = weight.detach().abs().amax(0).clamp_min(1e-5)
    return (act_absmax.clamp_min(1e-5) ** alpha / w_absmax ** (1 - alpha)).clamp_min(1e-5)


# --- whole models -------------------------------------------------------------------------------

@torch.no_grad()
def collect_inputs(model: GPT, tokens: torch.Tensor, layers: Iterable[str] = LINEARS
                   ) -> dict[tuple[int, str], torch.Tensor]:
    """The inputs [tokens, in] of every named linear layer of every block, for one forward pass
    over ``tokens`` [B, T]."""
    found: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, block in enumerate(model.blocks):
        for name in layers:
            def keep(module: nn.Module, args: tuple, out: torch.Tensor,
                     key: tuple[int, str] = (i, name)) -> None:
                found[key] = args[0].reshape(-1, args[0].shape[-1]).detach().clone()
            hooks.append(getattr(block, name).register_forward_hook(keep))
    try:
        model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return found


def smooth(model: GPT, calibration: torch.Tensor, alpha: float = 0.5) -> GPT:
    """A copy of ``model`` with SmoothQuant's migration folded in, for the inputs of ``qkv`` and
    ``up`` (the two linear layers that follow a LayerNorm, which SmoothQuant smooths too): the
    LayerNorm's weight and bias are divided by s and the layer's columns multiplied by s. The
    float model computes the same function."""
    smoothed = copy.deepcopy(model)
    inputs = collect_inputs(smoothed, calibration, ("qkv", "up"))
    with torch.no_grad():
        for i, block in enumerate(smoothed.blocks):
            for norm, name in ((block.norm1, "qkv"), (block.norm2, "up")):
                linear = getattr(block, name)
                s = smoothing_scales(inputs[i, name].abs().amax(0), linear.weight, alpha)
                norm.weight /= s
                norm.bias /= s
                linear.weight *= s
    return smoothed


def _capture_inputs(block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
    """The inputs [tokens, in] of the block's four linear layers when it runs on x [B, T, D]."""
    found: dict[str, torch.Tensor] = {}
    hooks = [getattr(block, name).register_forward_hook(
        lambda module, args, out, name=name: found.__setitem__(
            name, args[0].reshape(-1, args[0].shape[-1]).detach().clone()))
        for name in LINEARS]
    try:
        block(x, cos, sin, None)
    finally:
        for hook in hooks:
            hook.remove()
    return found


@torch.no_grad()
def quantize_gpt(model: GPT, bits: int, group_size: int | None = None, method: str = "rtn",
                 calibration: torch.Tensor | None = None, act_bits: int | None = None) -> GPT:
    """A copy of ``model`` whose blocks' linear layers are ``QuantizedLinear``.

    ``method`` is "rtn", "gptq" or "awq"; the last two need ``calibration`` tokens [B, T]. They
    go block by block, as GPTQ's reference code does: the calibration batch's hidden states are
    pushed through the blocks already quantized, so each block is fitted to the inputs it will
    really see and can compensate the earlier blocks' errors. The token embedding (tied to the
    output layer) stays in float16, as most quantized LLMs keep it."""
    if method not in ("rtn", "gptq", "awq"):
        raise ValueError(f"method must be 'rtn', 'gptq' or 'awq', got {method!r}")
    quantized = copy.deepcopy(model)
    if method != "rtn":
        if calibration is None:
            raise ValueError(f"method {method!r} needs calibration tokens")
        quantized._check_tokens(calibration)
        T = calibration.shape[1]
        cos, sin = quantized.rope_cos[None, None, :T], quantized.rope_sin[None, None, :T]
        x = quantized.embed(calibration)
    for block in quantized.blocks:
        inputs = _capture_inputs(block, x, cos, sin) if method != "rtn" else {}
        for name in LINEARS:
            weight = getattr(block, name).weight
            input_scale = None
            if method == "gptq":
                codes, scales = quantize_gptq(weight, hessian(inputs[name]), bits, group_size)
            elif method == "awq":
                _, input_scale = awq_search(weight, inputs[name], bits, group_size)
                codes, scales = quantize_rtn(weight * input_scale, bits, group_size)
            else:
                codes, scales = quantize_rtn(weight, bits, group_size)
            setattr(block, name, QuantizedLinear(codes, scales, bits, input_scale, act_bits))
        if method != "rtn":
            x = block(x, cos, sin, None)
    return quantized


def model_bytes(model: nn.Module) -> int:
    """Bytes to store ``model``: float parameters at 2 bytes (float16, as the checkpoints ship)
    plus the stored codes and scales of every ``QuantizedLinear``."""
    params = sum(p.numel() for p in model.parameters()) * 2
    return params + sum(m.nbytes for m in model.modules() if isinstance(m, QuantizedLinear))
