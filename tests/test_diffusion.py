"""Part V's diffusion transformer and samplers, against diffusers on the same numbers."""

from __future__ import annotations

import pytest
import torch

from course_reference.diffusion.peers import diffusers_dit, diffusers_sample
from course_reference.diffusion.sampling import ddim_step, ddpm_step, guided_eps, sample
from course_runtime.diffusion import NoiseSchedule, ddim_timesteps, digit_images
from course_runtime.models.dit import DiT, DiTConfig, patchify, unpatchify

diffusers = pytest.importorskip("diffusers", reason="diffusers is pinned in the constraints")

TINY = DiTConfig(image_size=8, patch=2, d_model=32, n_layers=2, n_heads=4)


def test_patches_are_row_major_and_unpatchify_inverts_them():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 6, 12)
    # token 4 is patch (row 1, column 1): pixels 2..3 x 2..3 of every channel, channel first
    torch.testing.assert_close(tokens[1, 4], x[1, :, 2:4, 2:4].reshape(-1))
    torch.testing.assert_close(unpatchify(tokens, 2, 3, 4, 6), x)
    with pytest.raises(ValueError, match="does not split"):
        patchify(x, 4)


def test_adaln_zero_starts_every_block_as_the_identity():
    model = DiT(TINY)
    x = torch.randn(3, 1, 8, 8)
    t, y = torch.tensor([0, 500, 999]), torch.tensor([1, 2, model.null_class])
    c = model.condition(t, y)
    tokens = model.embed(x)
    for block in model.blocks:
        torch.testing.assert_close(block(tokens, c), tokens)
    assert torch.count_nonzero(model(x, t, y)) == 0


def test_the_model_depends_on_time_class_and_every_token_after_training_a_little():
    torch.manual_seed(0)
    model = DiT(TINY)
    for p in model.parameters():  # off the zero initialisation
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 1, 8, 8)
    base = model(x, torch.tensor([10]), torch.tensor([3]))
    assert not torch.allclose(base, model(x, torch.tensor([900]), torch.tensor([3])))
    assert not torch.allclose(base, model(x, torch.tensor([10]), torch.tensor([4])))
    nudged = x.clone()
    nudged[0, 0, 7, 7] += 1.0  # one pixel, in the last patch: attention carries it everywhere
    changed = (model(nudged, torch.tensor([10]), torch.tensor([3])) - base).abs()
    assert changed[0, 0, :2, :2].sum() > 0


def test_the_schedule_and_timesteps_are_diffusers_own():
    schedule = NoiseSchedule()
    ddim = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                   beta_schedule="linear")
    torch.testing.assert_close(schedule.alphas_cumprod, ddim.alphas_cumprod, rtol=0, atol=0)
    for steps in (1, 7, 50, 1000):
        ddim.set_timesteps(steps)
        assert ddim_timesteps(steps) == ddim.timesteps.tolist()
    with pytest.raises(ValueError):
        ddim_timesteps(0)


@pytest.mark.parametrize("clip,clipped_eps", [(None, False), (1.0, False), (1.0, True)])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_a_ddim_step_is_diffusers_step(clip, clipped_eps, eta):
    schedule = NoiseSchedule()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4,
                                        beta_end=0.02, beta_schedule="linear",
                                        clip_sample=clip is not None, set_alpha_to_one=True)
    scheduler.set_timesteps(25)
    timesteps = scheduler.timesteps.tolist()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 8, 8, generator=g)
    for i, t in enumerate(timesteps):
        eps = torch.randn(x.shape, generator=g) * 1.5
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        seed = 100 + i
        theirs = scheduler.step(eps, t, x, eta=eta, use_clipped_model_output=clipped_eps,
                                generator=torch.Generator().manual_seed(seed)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        ours = ddim_step(eps, t, t_prev, x, schedule.alphas_cumprod, eta=eta, clip=clip,
                         clipped_eps=clipped_eps, noise=noise)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=f"t = {t}")
        x = theirs


def test_a_ddpm_step_is_diffusers_step():
    schedule = NoiseSchedule()
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4,
                                        beta_end=0.02, beta_schedule="linear",
                                        variance_type="fixed_small", clip_sample=True)
    scheduler.set_timesteps(40)
    timesteps = scheduler.timesteps.tolist()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 8, 8, generator=g)
    for i, t in enumerate(timesteps):
        eps = torch.randn(x.shape, generator=g)
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        theirs = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(i)
                                ).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        ours = ddpm_step(eps, t, t_prev, x, schedule.alphas_cumprod, noise, clip=1.0)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=f"t = {t}")
        x = theirs


def test_the_dit_is_diffusers_dit_with_a_weight_mapping():
    torch.manual_seed(3)
    model = DiT(TINY).eval()
    for p in model.parameters():  # off the zero initialisation, so every weight matters
        torch.nn.init.normal_(p, std=0.1)
    theirs = diffusers_dit(model)
    x = torch.randn(3, 1, 8, 8)
    t, y = torch.tensor([0, 321, 999]), torch.tensor([0, 7, model.null_class])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), theirs(x, t, y).sample, rtol=1e-4, atol=1e-5)


def test_guidance_mixes_the_conditional_and_unconditional_predictions():
    torch.manual_seed(4)
    model = DiT(TINY).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, labels = torch.randn(2, 1, 8, 8), torch.tensor([1, 5])
    with torch.no_grad():
        cond = model(x, torch.tensor([50, 50]), labels)
        uncond = model(x, torch.tensor([50, 50]), torch.full((2,), model.null_class))
        torch.testing.assert_close(guided_eps(model, x, 50, labels, 3.0),
                                   uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(guided_eps(model, x, 50, labels, 1.0), cond)


def test_the_digits_are_bundled_and_scaled():
    images, labels = digit_images(16)
    assert images.shape == (1797, 1, 16, 16) and labels.shape == (1797,)
    assert images.min() >= -1 and images.max() <= 1 and set(labels.tolist()) == set(range(10))
    train, test = digit_images(16, "train")[0], digit_images(16, "test")[0]
    assert len(train) + len(test) == 1797


def test_the_sampler_is_diffusers_loop_over_diffusers_dit():
    """A whole guided DDIM run: the course's sampler on the course's DiT, and diffusers'
    scheduler on diffusers' DiT with the same weights, from the same seeded noise."""
    torch.manual_seed(5)
    model = DiT(TINY).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    labels = [0, 3, 9]
    ours = sample(model, labels, steps=12, guidance=2.5, seed=7)
    theirs = diffusers_sample(diffusers_dit(model), labels, steps=12, guidance=2.5, seed=7,
                              image_size=TINY.image_size, null_class=TINY.num_classes)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert ours.abs().max() <= 1.0 + 1e-6  # clipped predictions keep the images in range


def test_the_shipped_dit_draws_the_digit_it_is_asked_for():
    """Samples of the shipped checkpoint, measured: a classifier trained on the digits labels
    most of them as the class asked for (chance: one in ten), and their features are about as
    far from held-out digits as real digits are, far nearer than noise is."""
    from course_reference.diffusion import quality
    from course_runtime.models.dit import load

    model = load("dit")
    classes = torch.arange(10).repeat_interleave(4)
    images = sample(model, classes, steps=10, guidance=2.0, seed=0)
    assert images.shape == (40, 1, 16, 16) and images.abs().max() <= 1.0 + 1e-6
    assert quality.accuracy(images, classes) >= 0.7
    held_out, held_out_labels = digit_images(16, "test")
    assert quality.accuracy(held_out, held_out_labels) >= 0.85  # the classifier itself
    real = quality.frechet_distance(digit_images(16, "train")[0][:40], held_out)
    noise = quality.frechet_distance(torch.rand(40, 1, 16, 16) * 2 - 1, held_out)
    samples = quality.frechet_distance(images, held_out)
    assert samples < 2 * real and samples < noise / 3, (samples, real, noise)
