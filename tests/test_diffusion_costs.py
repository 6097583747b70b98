"""Part V's cost model against what the course's DiT really does, and pyramid attention
broadcast's trade against the plain sampler."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from course_reference.diffusion import quality
from course_reference.diffusion.broadcast import sample_with_broadcast
from course_reference.diffusion.costs import (
    METHODS,
    DiTShape,
    dit_xl_1024,
    flops_per_step,
    method_costs,
)
from course_reference.diffusion.sampling import sample
from course_runtime.models.dit import load
from course_runtime.patch_parallel import kv_bytes_per_step


def shape_of(model, images, guidance=True, bytes_per_value=4):
    c = model.config
    return DiTShape(c.num_tokens, c.d_model, c.n_layers, images=images, guidance=guidance,
                    bytes_per_value=bytes_per_value)


def test_flops_are_what_torch_counts_in_a_forward_pass():
    """torch's FLOP counter on one forward pass (attention in its math form, so that the
    counter sees the two batched products): the attention is the model's count exactly, the
    matrix products within 1 % (the adaLN, embedding and head layers the model leaves out)."""
    model = load("dit")
    x, t, y = torch.randn(3, 1, 16, 16), torch.full((3,), 500), torch.tensor([1, 2, 3])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, \
            torch.no_grad():
        model(x, t, y)
    counted = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    model_flops = flops_per_step(shape_of(model, 3, guidance=False))
    assert counted["aten.bmm"] == model_flops["attention"]
    assert model_flops["linear"] <= counted["aten.addmm"] <= 1.01 * model_flops["linear"]


def test_parameters_are_the_blocks_weights_and_dit_xl_has_its_published_size():
    model = load("dit")
    weights = sum(layer.weight.numel() for block in model.blocks
                  for layer in (block.qkv_proj, block.out_proj, block.fc1, block.fc2, block.ada))
    assert shape_of(model, 1).params == weights
    assert dit_xl_1024().params == pytest.approx(675e6, rel=0.02)  # Peebles and Xie, table 1
    assert dit_xl_1024().tokens == 4096


@pytest.mark.parametrize("n", [2, 4, 8])
def test_distrifusion_bytes_are_the_counted_all_gathers(n):
    """DistriFusion's row of the table, in float32 on the course's DiT, is what the runtime's
    counted all-gathers send (tests/test_diffusion_parallel.py checks those counts on real
    ranks); with guidance the rows double."""
    model = load("dit")
    for images in (1, 10):
        assert method_costs(shape_of(model, images), n, "DistriFusion")["bytes"] == \
            pytest.approx(kv_bytes_per_step(model, images, n))


def test_the_table_orders_the_methods_as_xdit_does():
    """xDiT's table, on DiT-XL at 1024x1024 over 8 devices: per step, PipeFusion sends the
    least (no factor L), Ulysses 2/N of DistriFusion's and ring attention's, tensor parallelism
    twice theirs; only tensor parallelism and PipeFusion split the parameters, and only the
    stale methods keep a key-value buffer between steps (PipeFusion a 1/N share of
    DistriFusion's)."""
    shape, n = dit_xl_1024(), 8
    c = {m: method_costs(shape, n, m) for m in METHODS}
    assert c["PipeFusion"]["bytes"] < c["Ulysses"]["bytes"] < c["DistriFusion"]["bytes"]
    assert c["Ulysses"]["bytes"] == pytest.approx(2 / n * c["DistriFusion"]["bytes"])
    assert c["ring attention"]["bytes"] == c["DistriFusion"]["bytes"]
    assert c["tensor parallel"]["bytes"] == pytest.approx(2 * c["DistriFusion"]["bytes"])
    assert c["tensor parallel"]["params"] == c["PipeFusion"]["params"] == shape.params * 2 / n
    assert {m for m in METHODS if c[m]["kv_buffer"]} == {"DistriFusion", "PipeFusion"}
    assert c["PipeFusion"]["kv_buffer"] == pytest.approx(c["DistriFusion"]["kv_buffer"] / n)


def test_pyramid_attention_broadcast_saves_attention_at_a_measured_cost():
    """Reusing each block's attention output for 2 steps in the middle of a 20-step sampler
    skips 30 % of the attention computations; the images move, but not far, and the digits are
    still those asked for. Reuse 1 is the plain sampler exactly."""
    model, labels = load("dit"), list(range(10))
    plain = sample(model, labels, steps=20, guidance=2.0, seed=5)
    same = sample_with_broadcast(model, labels, steps=20, reuse=1, seed=5)
    torch.testing.assert_close(same["images"], plain, rtol=1e-5, atol=1e-5)
    reused = sample_with_broadcast(model, labels, steps=20, reuse=2, seed=5)
    assert reused["attention_computed"] == 4 * (4 + 6 + 4)  # 12 middle steps, half computed
    error = float((reused["images"] - plain).abs().mean())
    assert 1e-4 < error < 0.1, error
    assert quality.accuracy(reused["images"], labels) >= 0.7
