"""Quantization of the tiny GPT, checked against first principles: round-to-nearest moves each
weight by at most half a scale, int4 packing loses nothing, GPTQ equals the textbook Optimal Brain
Quantizer step by step and never loses to RTN on the data it saw, AWQ never loses to RTN,
SmoothQuant's migration leaves the float model's function unchanged, and the quantized models'
losses sit between what the float model and a context-free model achieve."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from course_reference.serving.quant import (
    LINEARS,
    QuantizedLinear,
    absmax_scales,
    awq_search,
    collect_inputs,
    dequantize,
    hessian,
    model_bytes,
    output_error,
    pack_int4,
    qmax,
    quantize_activations,
    quantize_gpt,
    quantize_gptq,
    quantize_rtn,
    smooth,
    smoothing_scales,
    unpack_int4,
)
from course_runtime.models import GPT, load
from course_runtime.models.train import encoded_splits, evaluate

WINDOWS = 8  # validation windows of 256 characters: 2048 predictions per loss


@pytest.fixture(scope="module")
def target() -> GPT:
    torch.set_num_threads(1)
    return load("target")


@pytest.fixture(scope="module")
def splits() -> tuple[torch.Tensor, torch.Tensor]:
    return encoded_splits()


@pytest.fixture(scope="module")
def calibration(splits: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Eight windows of the *training* text: the calibration data never overlaps validation."""
    train = splits[0]
    starts = torch.linspace(0, len(train) - 257, 8).long().tolist()
    return torch.stack([train[s:s + 256] for s in starts]).long()


@pytest.fixture(scope="module")
def layer_inputs(target: GPT, calibration: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    return collect_inputs(target, calibration)


def heavy_tailed_weight(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with a few large entries, as trained matrices have."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, columns, generator=gen) * 0.05
    w[torch.rand(rows, columns, generator=gen) < 0.01] *= 20
    return w


# --- round-to-nearest ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("group_size", [None, 16])
def test_rtn_moves_each_weight_by_at_most_half_a_scale(bits: int, group_size: int | None) -> None:
    w = heavy_tailed_weight(24, 64)
    codes, scales = quantize_rtn(w, bits, group_size)
    groups = 1 if group_size is None else 64 // group_size
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16
    assert scales.shape == (24, groups)
    per_element = scales.float().repeat_interleave(64 // groups, dim=1)
    assert ((w - dequantize(codes, scales)).abs() <= per_element / 2 * (1 + 1e-6)).all()
    # The largest weight of each group lands on the end of the grid: no code is wasted.
    ends = codes.abs().reshape(24, groups, -1).amax(-1)
    assert (ends == qmax(bits)).all()


def test_grid_sizes_and_bad_arguments() -> None:
    assert [qmax(b) for b in (8, 4, 3, 2)] == [127, 7, 3, 1]
    for bits in (1, 9, 4.0):
        with pytest.raises(ValueError, match="bits must be an integer from 2 to 8"):
            qmax(bits)
    with pytest.raises(ValueError, match="group_size 24 must .* divide the 64 input columns"):
        quantize_rtn(torch.ones(4, 64), 4, 24)
    with pytest.raises(ValueError, match=r"weight matrix \[out, in\], got shape \(64,\)"):
        absmax_scales(torch.ones(64), 4)


def test_all_zero_rows_stay_exactly_zero() -> None:
    w = torch.zeros(3, 8)
    w[1] = torch.linspace(-1, 1, 8)
    codes, scales = quantize_rtn(w, 4)
    assert torch.equal(dequantize(codes, scales)[[0, 2]], torch.zeros(2, 8))
    assert torch.isfinite(scales.float()).all()


def test_int4_packing_round_trips_every_code() -> None:
    gen = torch.Generator().manual_seed(1)
    every_pair = torch.cartesian_prod(torch.arange(-8, 8), torch.arange(-8, 8)).to(torch.int8)
    random = torch.randint(-8, 8, (5, 7, 32), generator=gen, dtype=torch.int8)
    for codes in (every_pair, random):
        packed = pack_int4(codes)
        assert packed.dtype == torch.uint8 and packed.shape[-1] == codes.shape[-1] // 2
        assert torch.equal(unpack_int4(packed), codes)
    # Two's complement nibbles, low nibble first: (-1, 2) -> 0x2F.
    assert pack_int4(torch.tensor([-1, 2], dtype=torch.int8)).item() == 0x2F
    with pytest.raises(ValueError, match="even last dimension"):
        pack_int4(torch.zeros(3, 5, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"must lie in \[-8, 7\], got \[-9, 0\]"):
        pack_int4(torch.tensor([-9, 0], dtype=torch.int8))
    with pytest.raises(ValueError, match="expects uint8"):
        unpack_int4(torch.zeros(4, dtype=torch.int8))


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_quantized_linear_computes_with_the_dequantized_weight(bits: int) -> None:
    w = heavy_tailed_weight(12, 32, seed=2)
    codes, scales = quantize_rtn(w, bits, 8)
    layer = QuantizedLinear(codes, scales, bits)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(layer(x), x @ dequantize(codes, scales).T, atol=1e-6)
    # Stored bytes: one byte per code at int8, half a byte at 4 bits or fewer, and a float16
    # scale per row and group of 8.
    code_bytes = 12 * 32 if bits == 8 else 12 * 32 // 2
    assert layer.nbytes == code_bytes + 12 * 4 * 2
    with pytest.raises(ValueError, match="expects inputs with 32 features, got shape"):
        layer(torch.randn(2, 31))


def test_activation_quantization_is_per_token() -> None:
    x = torch.tensor([[0.01, -0.02, 0.005], [100.0, 3.0, -50.0]])
    q = quantize_activations(x, 8)
    # Each row's error is at most half of its own step, max|row| / 127 / 2: the small row is not
    # drowned by the large one.
    steps = x.abs().amax(-1, keepdim=True) / 127
    assert ((q - x).abs() <= steps / 2 * (1 + 1e-6)).all()
    assert torch.equal(quantize_activations(torch.zeros(2, 4)), torch.zeros(2, 4))


# --- GPTQ ---------------------------------------------------------------------------------------

def optimal_brain_quantizer(w: torch.Tensor, H: torch.Tensor, bits: int) -> torch.Tensor:
    """The textbook OBQ step in GPTQ's fixed column order, with explicit inverses: quantize column
    q, then move the remaining columns F by -(w_q - quant(w_q)) / [H_F^-1]_qq * [H_F^-1]_{q,F}
    (Frantar et al., equation 2), and drop q from F. Per-channel scales from the original row."""
    w = w.double().clone()
    scale = absmax_scales(w.float(), bits).double()[:, 0]
    codes = torch.empty_like(w)
    for q in range(w.shape[1]):
        remaining = list(range(q, w.shape[1]))
        Hinv = torch.linalg.inv(H[remaining][:, remaining])
        codes[:, q] = torch.round(w[:, q] / scale).clamp(-qmax(bits), qmax(bits))
        error = w[:, q] - codes[:, q] * scale
        w[:, remaining] -= error[:, None] * Hinv[0][None, :] / Hinv[0, 0]
    return codes


def test_gptq_is_the_optimal_brain_quantizer_in_column_order() -> None:
    gen = torch.Generator().manual_seed(4)
    # 160 columns: more than one of GPTQ's lazy blocks of 128, so the update between blocks counts.
    x = torch.randn(400, 160, generator=gen, dtype=torch.float64) @ torch.randn(
        160, 160, generator=gen, dtype=torch.float64)  # correlated inputs
    w = torch.randn(16, 160, generator=gen)  # no outliers: every column's rounding matters
    H = hessian(x)
    H_damped = H + 0.01 * torch.diagonal(H).mean() * torch.eye(160, dtype=H.dtype)
    codes, _ = quantize_gptq(w, H, 3)
    assert torch.equal(codes.double(), optimal_brain_quantizer(w, H_damped, 3))


def test_gptq_is_rtn_when_inputs_are_uncorrelated() -> None:
    # A diagonal Hessian couples no columns: there is nothing to compensate.
    w = heavy_tailed_weight(16, 48, seed=6)
    H = torch.diag(torch.rand(48, generator=torch.Generator().manual_seed(7)) + 0.1)
    for group_size in (None, 16):
        gptq = quantize_gptq(w, H, 4, group_size)
        rtn = quantize_rtn(w, 4, group_size)
        assert torch.equal(gptq[0], rtn[0]) and torch.equal(gptq[1], rtn[1])


@pytest.mark.parametrize("bits,group_size", [(4, None), (3, None), (3, 32)])
def test_gptq_output_error_is_below_rtns_on_real_activations(
        target: GPT, layer_inputs: dict, bits: int, group_size: int | None) -> None:
    for key in [(1, "qkv"), (4, "down"), (7, "up")]:
        w, x = getattr(target.blocks[key[0]], key[1]).weight, layer_inputs[key]
        rtn = output_error(w, dequantize(*quantize_rtn(w, bits, group_size)), x)
        gptq = output_error(w, dequantize(*quantize_gptq(w, hessian(x), bits, group_size)), x)
        assert gptq < rtn, (key, gptq, rtn)


def test_gptq_rejects_a_hessian_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match=r"Hessian must be \[8, 8\].*got \(7, 7\)"):
        quantize_gptq(torch.ones(4, 8), torch.eye(7), 4)


# --- AWQ and SmoothQuant ------------------------------------------------------------------------

def test_awq_is_never_worse_than_rtn_on_its_calibration(target: GPT, layer_inputs: dict) -> None:
    for key in [(2, "qkv"), (6, "down")]:
        w, x = getattr(target.blocks[key[0]], key[1]).weight, layer_inputs[key]
        alpha, s = awq_search(w, x, 3, 32)
        assert 0 <= alpha <= 1 and s.shape == (w.shape[1],) and (s > 0).all()
        awq = dequantize(*quantize_rtn(w * s, 3, 32)) / s
        rtn = dequantize(*quantize_rtn(w, 3, 32))
        assert output_error(w, awq, x) <= output_error(w, rtn, x)


def test_smoothing_migrates_the_outliers_without_changing_the_product() -> None:
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(64, 16, generator=gen, dtype=torch.float64)
    x[:, 3] *= 40  # one outlier channel, as large LLMs have
    w = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    act_max, w_max = x.abs().amax(0), w.abs().amax(0)
    s = smoothing_scales(act_max, w, 0.5)
    assert torch.allclose((x / s) @ (w * s).T, x @ w.T, rtol=1e-12, atol=1e-10)
    # With alpha = 0.5 both sides end with the same per-channel maximum, sqrt(max|X_j| max|W_j|).
    balanced = (act_max * w_max).sqrt()
    assert torch.allclose((x / s).abs().amax(0), balanced)
    assert torch.allclose((w * s).abs().amax(0), balanced)
    # alpha = 1 moves the whole range into the weights: every activation channel peaks at 1.
    assert torch.allclose((x / smoothing_scales(act_max, w, 1.0)).abs().amax(0),
                          torch.ones(16, dtype=x.dtype))
    with pytest.raises(ValueError, match="alpha must lie in"):
        smoothing_scales(act_max, w, 1.5)
    with pytest.raises(ValueError, match=r"one activation maximum per input channel \(16\)"):
        smoothing_scales(act_max[:4], w, 0.5)


def test_smoothed_model_computes_the_same_function(target: GPT, calibration: torch.Tensor,
                                                   splits: tuple) -> None:
    smoothed = smooth(target, calibration, alpha=0.5)
    tokens = splits[1][:512].long().reshape(2, 256)
    with torch.no_grad():
        assert torch.allclose(smoothed(tokens), target(tokens), atol=1e-4, rtol=1e-4)
        # ...but not with the same activations: the LayerNorm outputs were divided by s.
        norm_out = smoothed.blocks[3].norm1.weight / target.blocks[3].norm1.weight
    assert not torch.allclose(norm_out, torch.ones_like(norm_out))


# --- whole models -------------------------------------------------------------------------------

def test_bytes_follow_from_the_shapes(target: GPT) -> None:
    linear_params = sum(getattr(b, n).weight.numel() for b in target.blocks for n in LINEARS)
    linear_rows = sum(getattr(b, n).weight.shape[0] for b in target.blocks for n in LINEARS)
    other_params = target.num_params() - linear_params
    assert model_bytes(target) == 2 * target.num_params()  # float16, as shipped
    int8 = quantize_gpt(target, 8)
    assert model_bytes(int8) == 2 * other_params + linear_params + 2 * linear_rows
    int4_g32 = quantize_gpt(target, 4, 32)
    assert model_bytes(int4_g32) == (2 * other_params + linear_params // 2
                                     + 2 * linear_params // 32)


def test_quantize_gpt_rejects_bad_requests(target: GPT) -> None:
    with pytest.raises(ValueError, match="method must be 'rtn', 'gptq' or 'awq', got 'gguf'"):
        quantize_gpt(target, 4, method="gguf")
    with pytest.raises(ValueError, match="'gptq' needs calibration tokens"):
        quantize_gpt(target, 4, method="gptq")
    with pytest.raises(ValueError, match="unknown token id 80"):
        quantize_gpt(target, 4, method="gptq", calibration=torch.full((1, 4), 80))


def unigram_entropy(ids: torch.Tensor) -> float:
    """Cross-entropy (nats) of the validation text under its own character frequencies: the
    best any model can do that ignores the context."""
    counts = Counter(ids.tolist())
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def test_quantized_models_lose_little_and_keep_using_context(
        target: GPT, splits: tuple, calibration: torch.Tensor) -> None:
    val = splits[1]
    base = evaluate(target, val, windows=WINDOWS)
    context_free = unigram_entropy(val)
    assert base < context_free - 1  # the float model uses its context (about 1.6 vs 3.1 nats)
    losses = {}
    for name, bits, group_size, method in [("int8", 8, None, "rtn"), ("int4", 4, 32, "rtn"),
                                           ("int2 rtn", 2, None, "rtn"),
                                           ("int2 gptq", 2, None, "gptq")]:
        model = quantize_gpt(target, bits, group_size, method, calibration)
        losses[name] = evaluate(model, val, windows=WINDOWS)
        assert math.isfinite(losses[name]) and losses[name] < context_free, (name, losses)
    # int8 moves every weight by at most 1/254 of its row's largest one (0.4 %); a perturbation
    # that small must not move the loss by 1 %.
    assert abs(losses["int8"] - base) < 0.01 * base
    # A coarser grid cannot be free: a ternary grid per row loses more than int4 with groups,
    # and GPTQ's compensation must recover part of what round-to-nearest loses at 2 bits.
    assert losses["int2 rtn"] > losses["int4"]
    assert losses["int2 gptq"] < losses["int2 rtn"]


def test_w8a8_quantizes_activations_per_token(target: GPT, splits: tuple) -> None:
    model = quantize_gpt(target, 8, act_bits=8)
    layer = model.blocks[0].up
    assert isinstance(layer, QuantizedLinear) and layer.act_bits == 8
    tokens = splits[1][:256].long()[None]
    with torch.no_grad():
        logits, reference = model(tokens), target(tokens)
    # Two 8-bit roundings per product: the predictions barely move.
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(reference, -1), log_target=True,
                  reduction="batchmean").item() / 256
    assert 0 < kl < 1e-2
