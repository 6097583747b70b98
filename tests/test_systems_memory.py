"""Activation memory, counted against the analytic count for a stack of Linear + ReLU layers:
with and without recomputation (non-reentrant checkpoints every k layers), and with saved tensors
offloaded; gradients must be identical in every case, dropout included."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from course_reference.systems.memory_saving import (
    OffloadSavedTensors,
    SavedTensorCounter,
    checkpointed_peak_bytes,
    run_stack,
)

B, D, N = 4, 8, 6


def _stack(dropout=0.0):
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Dropout(dropout)) for _ in range(N)]
    return layers, [p for layer in layers for p in layer.parameters()]


@pytest.mark.parametrize("every", [None, 1, 2, 4, 6])
def test_saved_bytes_match_the_count_of_kept_activations(every):
    layers, params = _stack()
    x = torch.randn(B, D, requires_grad=True)
    with SavedTensorCounter(ignore=params) as saved:
        run_stack(layers, x, every)
    # no checkpoint: the input and every ReLU output (also the next Linear's input, counted once);
    # with one: only the input of each of the ⌈N/k⌉ segments
    kept = N + 1 if every is None else math.ceil(N / every)
    assert saved.bytes == kept * B * D * 4


@pytest.mark.parametrize("every", [1, 2, 4])
def test_recomputation_gives_identical_gradients_even_with_dropout(every):
    layers, params = _stack(dropout=0.3)
    x = torch.randn(B, D, requires_grad=True)
    grads = []
    for k in (None, every):
        for p in [*params, x]:
            p.grad = None
        torch.manual_seed(1)
        run_stack(layers, x, k).square().sum().backward()
        grads.append([p.grad.clone() for p in [*params, x]])
    for plain, recomputed in zip(*grads, strict=True):
        assert torch.equal(plain, recomputed)


def test_offloading_moves_each_activation_once_and_changes_no_gradient():
    layers, params = _stack()
    x = torch.randn(B, D, requires_grad=True)
    run_stack(layers, x).square().sum().backward()
    expected = [p.grad.clone() for p in [*params, x]]
    for p in [*params, x]:
        p.grad = None
    with OffloadSavedTensors(ignore=params) as offload:
        y = run_stack(layers, x)
    assert offload.bytes_moved == (N + 1) * B * D * 4
    assert offload.bytes_kept == N * D * D * 4                 # the weights stay
    y.square().sum().backward()
    for want, p in zip(expected, [*params, x], strict=True):
        assert torch.equal(want, p.grad)
    with OffloadSavedTensors(min_bytes=B * D * 4 + 1, ignore=params) as small:
        run_stack(layers, x)
    assert small.bytes_moved == 0


def test_the_peak_model_is_smallest_near_the_square_root():
    n, unit = 64, 100
    peaks = {k: checkpointed_peak_bytes(n, k, unit, k * unit) for k in range(1, n + 1)}
    assert min(peaks, key=peaks.get) == 8
    assert peaks[8] == 16 * unit and peaks[1] == 65 * unit and peaks[64] == 65 * unit


def test_bad_segment_length_is_named():
    layers, _ = _stack()
    with pytest.raises(ValueError, match="checkpoint_every must be a positive number of layers, "
                                         "got 0"):
        run_stack(layers, torch.randn(B, D), 0)


def test_offloading_never_confuses_a_freed_tensor_with_a_new_one_at_its_address():
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(12)]
    params = [p for layer in layers for p in layer.parameters()]
    x = torch.randn(32, 64, requires_grad=True)
    run_stack(layers, x).square().sum().backward()
    expected = [p.grad.clone() for p in [*params, x]]
    for p in [*params, x]:
        p.grad = None
    with OffloadSavedTensors(ignore=params) as offload:
        y = run_stack(layers, x)
    assert offload.bytes_moved == 2 * 12 * 32 * 64 * 4   # x and each Linear's output
    y.square().sum().backward()
    for want, p in zip(expected, [*params, x], strict=True):
        assert torch.equal(want, p.grad)
