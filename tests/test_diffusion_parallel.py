"""Patch-parallel DiT sampling on forked ranks: synchronous is the single process; DistriFusion's
stale keys and values cost a bounded error; the bytes each rank sends are the formula's."""

from __future__ import annotations

import pytest
import torch

from course_reference.diffusion import quality
from course_reference.diffusion.cfg import cfg_parallel_sample
from course_reference.diffusion.costs import DiTShape, method_costs
from course_reference.diffusion.parallel import band, kv_bytes_per_step, patch_parallel_sample
from course_reference.diffusion.pipefusion import pipefusion_sample
from course_reference.diffusion.sampling import sample
from course_reference.diffusion.sequence import sequence_parallel_sample
from course_runtime.models.dit import load

pytestmark = pytest.mark.xdist_group("diffusion-ranks")

LABELS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
STEPS = 8


@pytest.fixture(scope="module")
def single():
    return sample(load("dit"), LABELS, steps=STEPS, guidance=2.0, seed=3)


def test_bands_cover_the_grid_in_rank_order():
    assert [band(r, 4, 16) for r in range(4)] == [slice(0, 4), slice(4, 8), slice(8, 12),
                                                  slice(12, 16)]
    with pytest.raises(ValueError, match="do not split"):
        band(0, 3, 16)


@pytest.mark.parametrize("world_size", [2, 4])
def test_synchronous_patch_parallelism_is_the_single_process_sampler(single, world_size):
    result = patch_parallel_sample(LABELS, world_size, steps=STEPS, guidance=2.0, seed=3)
    torch.testing.assert_close(result["images"], single, rtol=1e-4, atol=1e-4)
    expected = kv_bytes_per_step(load("dit"), len(LABELS), world_size) * STEPS
    assert result["kv_bytes"] == [pytest.approx(expected)] * world_size
    assert all(calls["all_gather"] == STEPS * 4 for calls in result["calls"])  # 4 blocks


def test_distrifusion_trades_a_bounded_error_for_overlap(single):
    """Stale keys and values of the other bands after one warm-up step: the images move away
    from the single process's, but not far, and they still show the digits asked for; the
    bytes are the same as the synchronous method's, only sent in the background."""
    result = patch_parallel_sample(LABELS, 4, steps=STEPS, guidance=2.0, seed=3, stale=True,
                                   warmup=1)
    error = (result["images"] - single).abs()
    assert 1e-3 < float(error.mean()) < 0.15, float(error.mean())
    assert quality.accuracy(result["images"], LABELS) >= 0.7
    expected = kv_bytes_per_step(load("dit"), len(LABELS), 4) * STEPS
    assert result["kv_bytes"] == [pytest.approx(expected)] * 4
    # one blocking gather per block in the warm-up step, in the background after it
    assert all(calls == {"all_gather": 4, "all_gather_async": 4 * (STEPS - 1)}
               for calls in result["calls"])
    # staleness off: exactly the synchronous images
    all_warm = patch_parallel_sample(LABELS, 2, steps=STEPS, guidance=2.0, seed=3, stale=True,
                                     warmup=STEPS)
    torch.testing.assert_close(all_warm["images"], single, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["ulysses", "ring"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_sequence_parallel_attention_gives_the_single_process_images(single, method,
                                                                      world_size):
    """Part III's Ulysses and ring attention on the DiT's bands: exact, and each rank sends the
    bytes of the cost model's row (float32): Ulysses 4/N of the activations' (N - 1)/N per
    block, the ring twice their (N - 1)/N, per block and step."""
    result = sequence_parallel_sample(LABELS, world_size, method, steps=STEPS, guidance=2.0,
                                      seed=3)
    torch.testing.assert_close(result["images"], single, rtol=1e-4, atol=1e-4)
    model = load("dit")
    c = model.config
    shape = DiTShape(c.num_tokens, c.d_model, c.n_layers, images=len(LABELS), bytes_per_value=4)
    row = {"ulysses": "Ulysses", "ring": "ring attention"}[method]
    expected = method_costs(shape, world_size, row)["bytes"] * STEPS
    assert result["kv_bytes"] == [pytest.approx(expected)] * world_size


def test_cfg_parallelism_gives_the_single_process_images(single):
    """The two branches of guidance on two ranks: exact, and each rank sends its half of one
    all-gather of the images' noise per step."""
    result = cfg_parallel_sample(LABELS, steps=STEPS, guidance=2.0, seed=3)
    torch.testing.assert_close(result["images"], single, rtol=1e-4, atol=1e-4)
    c = load("dit").config
    per_step = len(LABELS) * c.channels * c.image_size * c.image_size * 4
    assert result["bytes"] == [pytest.approx(per_step * STEPS)] * 2


@pytest.mark.parametrize("world_size", [2, 4])
def test_pipefusion_without_staleness_is_the_single_process(single, world_size):
    """One patch per step: every key and value fresh, the single process's images; each stage
    but the last sends one activation's worth per step, the cost model's PipeFusion row."""
    result = pipefusion_sample(LABELS, world_size, patches=1, steps=STEPS, guidance=2.0, seed=3)
    torch.testing.assert_close(result["images"], single, rtol=1e-4, atol=1e-4)
    c = load("dit").config
    shape = DiTShape(c.num_tokens, c.d_model, c.n_layers, images=len(LABELS), bytes_per_value=4)
    expected = method_costs(shape, world_size, "PipeFusion")["bytes"] * STEPS
    assert result["bytes"][:-1] == [pytest.approx(expected)] * (world_size - 1)


def test_pipefusion_with_stale_patches_trades_a_bounded_error(single):
    """Four patches per step after one whole-image step: later patches' keys and values are the
    previous step's, so the images move, but not far, the digits stay those asked for, and the
    bytes do not change (the patches add up to the image)."""
    result = pipefusion_sample(LABELS, 2, patches=4, steps=STEPS, guidance=2.0, seed=3)
    error = float((result["images"] - single).abs().mean())
    assert 1e-3 < error < 0.15, error
    assert quality.accuracy(result["images"], LABELS) >= 0.7
    fresh = pipefusion_sample(LABELS, 2, patches=1, steps=STEPS, guidance=2.0, seed=3)
    assert result["bytes"][0] == pytest.approx(fresh["bytes"][0])
