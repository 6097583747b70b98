"""Curated buggy submissions for Lab 6: the mistakes students make, and the points they cost."""

from .mutations import cheat, cheats_for, mutation

MUTATIONS = [
    mutation(
        "bands_merged_in_wrong_order",
        "merges the bands bottom to top: the images come back upside down, band by band",
        [("    return torch.cat(list(bands), dim=-2)",
          "    return torch.cat(list(bands)[::-1], dim=-2)")],
        breaks={"q1"}, may_break={"q5"}),
    mutation(
        "bands_split_along_the_width",
        "splits the columns instead of the rows",
        [("    return images[..., rank * rows * patch:(rank + 1) * rows * patch, :]",
          "    return images[..., rank * rows * patch:(rank + 1) * rows * patch]")],
        breaks={"q1"}, may_break={"q5"}),
    mutation(
        "uneven_split_not_refused",
        "lets a world size that does not divide the rows through: the last rows belong to no "
        "rank",
        [("    if world_size < 1 or grid % world_size:\n        raise ValueError",
          "    if world_size < 1:\n        raise ValueError")],
        breaks={"q1"}),
    mutation(
        "model_noise_kept_after_the_clip",
        "clips the predicted clean image but keeps the model's noise: the step's two halves "
        "disagree whenever the clip bites",
        [("        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()\n    return",
          "    return")],
        breaks={"q2"}, may_break={"q5"}),
    mutation(
        "last_step_reads_the_schedule_end",
        "t_prev = -1 indexes the schedule's last entry (t = 999) instead of the clean image",
        [("    abar_prev = alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones(())",
          "    abar_prev = alphas_cumprod[t_prev]")],
        breaks={"q2"}, may_break={"q5"}),
    mutation(
        "values_joined_in_another_order",
        "joins the gathered values in reverse rank order but the keys in rank order: a key and "
        "the value at its place belong to different tokens (both in the same other order would "
        "be right: attention does not care how the tokens are ordered)",
        [("    return joined[0], joined[1]\n    # END SOLUTION",
          "    return joined[0], torch.cat(list(parts)[::-1], dim=-2)[1]\n    # END SOLUTION")],
        breaks={"q3"}),
    mutation(
        "own_band_only",
        "attends over this band's own keys and values: no communication at all",
        [("    comm.all_gather(parts.view(-1), mine.view(-1))\n    joined = torch.cat(list(parts), "
          "dim=-2)",
          "    joined = torch.cat([mine] * world_size, dim=-2)")],
        breaks={"q3"}),
    mutation(
        "stale_in_the_warm_up",
        "gathers fresh keys and values only in the first step, not in every warm-up step: the "
        "other warm-up steps use stale activations",
        [("        if fresh:\n            comm.all_gather(",
          "        if self.kv is None:\n            comm.all_gather(")],
        breaks={"q4"}),
    mutation(
        "blocking_gather_after_the_warm_up",
        "gathers this step's keys and values with a blocking all-gather after the warm-up: the "
        "same stale values, with the communication back on the critical path",
        [("        self.pending = comm.all_gather_async(parts.view(-1), mine.view(-1))\n"
          "        self.incoming = parts",
          "        comm.all_gather(parts.view(-1), mine.view(-1))\n"
          "        self.kv = parts")],
        breaks={"q4"}, may_break={"q5"}),
    mutation(
        "staleness_reuses_this_steps_keys",
        "starts this step's gather before waiting, so the wait brings this step's keys and "
        "values: synchronous patch parallelism by mistake, none of the overlap",
        [("        self.wait()\n        stale = self.kv.clone()\n        stale[self.rank] = mine\n"
          "        self.pending = comm.all_gather_async(parts.view(-1), mine.view(-1))\n"
          "        self.incoming = parts\n",
          "        self.pending = comm.all_gather_async(parts.view(-1), mine.view(-1))\n"
          "        self.incoming = parts\n        self.wait()\n        stale = self.kv.clone()\n"
          "        stale[self.rank] = mine\n")],
        breaks={"q4"}),
    mutation(
        "own_band_stale_too",
        "uses the previous step's keys and values of this band as well, not only the others'",
        [("        stale[self.rank] = mine\n", "")],
        breaks={"q4"}, may_break={"q5"}),
    mutation(
        "arrivals_never_kept",
        "waits for the background gather but never keeps what it brought: every stale step "
        "attends over the warm-up's keys and values",
        [("            self.kv, self.pending = self.incoming, None",
          "            self.pending = None")],
        breaks={"q4"}, may_break={"q5"}),
]

# Rewrites that compute what the lab asks for: each must keep every point.
REWRITES = [
    mutation(
        "keys_and_values_gathered_apart",
        "gathers the keys and the values in two all-gathers: the same bytes, one more call",
        [("    mine = torch.stack([k, v]).contiguous()\n    parts = torch.empty((world_size, "
          "*mine.shape), dtype=mine.dtype)\n    comm.all_gather(parts.view(-1), mine.view(-1))\n"
          "    joined = torch.cat(list(parts), dim=-2)  # [2, B, heads, all tokens, head_dim], "
          "rank order\n    return joined[0], joined[1]",
          "    out = []\n    for part in (k.contiguous(), v.contiguous()):\n"
          "        parts = torch.empty((world_size, *part.shape), dtype=part.dtype)\n"
          "        comm.all_gather(parts.view(-1), part.view(-1))\n"
          "        out.append(torch.cat(list(parts), dim=-2))\n    return out[0], out[1]")],
        breaks=set()),
    mutation(
        "split_with_band_rows",
        "takes the band's rows from the runtime's band_rows",
        [("    rows = grid // world_size\n    return images[..., rank * rows * patch:(rank + 1) * "
          "rows * patch, :]",
          "    rows = band_rows(rank, world_size, grid)\n"
          "    return images[:, :, rows.start * patch:rows.stop * patch]")],
        breaks=set()),
]

# Operator mutants of the solution that compute what the lab asks for (grader/mutation.py):
# they leave the mutation score's denominator, each with the reason.
EQUIVALENT = {
    "merge_bands: drop minus: -2":
        "the bands are [B, C, rows, W]: dimension 2 is dimension -2",
    "split_band: drop minus: -2":
        "the images are [B, C, H, W]: images.shape[2] is images.shape[-2]",
    "StaleKV.__init__: drop statement: self.kv = None":
        "a warm-up step sets self.kv before any stale step reads it; with no warm-up, the "
        "first stale step fails either way (None has no clone(); a missing attribute raises "
        "AttributeError too)",
    "StaleKV.__init__: drop statement: self.incoming = None":
        "self.incoming is read only in wait() once self.pending is set, and both are set "
        "together",
}

SETUP = "schedule = NoiseSchedule()"  # the set-up cell: the model loaded, helpers imported

CHEATS = [
    *cheats_for("lab06_patch_parallel", SETUP, "course_reference/diffusion/*.py",
                "def split_band(images, rank, world_size, patch):",
                ["split_band(images, rank, world_size, patch)"], "course_reference/diffusion"),
    cheat("reference_kept_alive",
          "imports the reference under a name built from strings and re-installs its pieces "
          "after every cell with an IPython post_run_cell hook",
          '''import importlib
par = importlib.import_module("course_" + "reference" + ".diffusion.parallel")
sampling = importlib.import_module("course_" + "reference" + ".diffusion.sampling")

def reinstall(*args):
    globals().update(split_band=par.split_band, merge_bands=par.merge_bands,
                     gather_kv=par.gather_kv, StaleKV=par.StaleKV,
                     ddim_step=lambda eps, t, t_prev, x, abar, clip=None: sampling.ddim_step(
                         eps, t, t_prev, x, abar, clip=clip, clipped_eps=True))

get_ipython().events.register("post_run_cell", reinstall)
reinstall()
''', after=SETUP),
    cheat("diffusers_does_the_step",
          "hands the DDIM step to diffusers' DDIMScheduler, which ships with the course",
          '''import torch
from diffusers import DDIMScheduler

_scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                           clip_sample=False, set_alpha_to_one=True)

def ddim_step(eps, t, t_prev, x, alphas_cumprod, clip=None):
    _scheduler.config.clip_sample = clip is not None
    _scheduler.config.clip_sample_range = clip or 1.0
    _scheduler.num_inference_steps = 1000 // max(t - t_prev, 1)
    return _scheduler.step(eps, t, x, use_clipped_model_output=clip is not None).prev_sample
''', after="def ddim_step(eps, t, t_prev, x, alphas_cumprod, clip=None):", targets={"q2"}),
]
