"""Part V's benchmark: the course's DiT sampler against diffusers' on the same weights.

Both sample the same classes from the same seeded noise with guided DDIM: the course's sampler
over the course's DiT, and diffusers' ``DDIMScheduler`` over diffusers' ``DiTTransformer2DModel``
holding the same weights (``course_reference/diffusion/peers.py``); their images must agree
before a time is kept. One thread each, interleaved round by round.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from course_runtime.timing import device_name, measure_interleaved, pinned_threads

from .harness import ratio_record

IMAGES, STEPS, GUIDANCE, THREADS = 8, 20, 2.0, 1


def run(rounds: int = 30) -> list[dict[str, Any]]:
    return run_peer(rounds) + run_parallel(min(rounds, 3))


def run_peer(rounds: int = 30) -> list[dict[str, Any]]:
    from course_reference.diffusion.peers import diffusers_dit, diffusers_sample
    from course_reference.diffusion.sampling import sample
    from course_runtime.models.dit import load

    model = load("dit")
    theirs = diffusers_dit(model)
    config = model.config
    labels = torch.arange(IMAGES) % config.num_classes
    with pinned_threads(THREADS):
        ours_images = sample(model, labels, steps=STEPS, guidance=GUIDANCE, seed=0)
        their_images = diffusers_sample(theirs, labels, steps=STEPS, guidance=GUIDANCE, seed=0,
                                        image_size=config.image_size,
                                        null_class=config.num_classes)
        gap = float((ours_images - their_images).abs().max())
        if gap > 1e-3:
            raise AssertionError(f"the two samplers' images differ by {gap:.2e}")

        def timed(fn: Any) -> Any:
            def once() -> float:
                start = time.perf_counter()
                fn()
                return time.perf_counter() - start
            return once

        times = measure_interleaved({
            "ours": timed(lambda: sample(model, labels, steps=STEPS, guidance=GUIDANCE)),
            "diffusers": timed(lambda: diffusers_sample(
                theirs, labels, steps=STEPS, guidance=GUIDANCE, image_size=config.image_size,
                null_class=config.num_classes))}, min(rounds, 10), warmup=1)
    return [ratio_record(
        f"dit_ddim_{IMAGES}_images_{STEPS}_steps_guided", "course DiT + DDIM sampler",
        "diffusers DiTTransformer2DModel + DDIMScheduler", times["ours"], times["diffusers"],
        device=device_name(), threads=THREADS, tokens=config.num_tokens,
        max_image_difference=gap)]


PARALLEL_IMAGES, PARALLEL_STEPS = 10, 10


def run_parallel(rounds: int = 3) -> list[dict[str, Any]]:
    """Patch-parallel sampling at N = 2 and 4 (synchronous and DistriFusion), sequence-parallel
    attention (Ulysses, ring) and PipeFusion at N = 2 and 4, and CFG parallelism (2 ranks),
    each against the single process, each round a whole sampling run (the ranks' launch
    included, as a user waits for it), with the bytes rank 0 sent beside the cost model's. On
    a machine with fewer cores than ranks the ratio says what the ranks' overlap is worth
    there, not on a device per rank."""
    from course_reference.diffusion.cfg import cfg_parallel_sample
    from course_reference.diffusion.costs import DiTShape, method_costs
    from course_reference.diffusion.parallel import patch_parallel_sample
    from course_reference.diffusion.pipefusion import pipefusion_sample
    from course_reference.diffusion.sampling import sample
    from course_reference.diffusion.sequence import sequence_parallel_sample
    from course_runtime.models.dit import load

    model = load("dit")
    config = model.config
    labels = list(range(PARALLEL_IMAGES))
    shape = DiTShape(config.num_tokens, config.d_model, config.n_layers, images=len(labels),
                     bytes_per_value=4)
    image_bytes = len(labels) * config.channels * config.image_size ** 2 * 4
    runs = []  # (key, label, world size, run, bytes the model says one rank sends per step)
    for world_size in (2, 4):
        for stale in (False, True):
            kind = "DistriFusion, warm-up 1" if stale else "synchronous"
            runs.append((f"dit_patch_parallel_{'distrifusion' if stale else 'synchronous'}",
                         f"patch parallel ({kind})",
                         world_size,
                         lambda n=world_size, stale=stale: patch_parallel_sample(
                             labels, n, steps=PARALLEL_STEPS, stale=stale)["kv_bytes"][0],
                         method_costs(shape, world_size, "DistriFusion")["bytes"]))
        for method, row in (("ulysses", "Ulysses"), ("ring", "ring attention")):
            runs.append((f"dit_sequence_parallel_{method}", f"sequence parallel ({row})",
                         world_size,
                         lambda n=world_size, method=method: sequence_parallel_sample(
                             labels, n, method, steps=PARALLEL_STEPS)["kv_bytes"][0],
                         method_costs(shape, world_size, row)["bytes"]))
        runs.append(("dit_pipefusion_4_patches", "PipeFusion (4 patches, warm-up 1)", world_size,
                     lambda n=world_size: pipefusion_sample(labels, n, patches=4,
                                                            steps=PARALLEL_STEPS)["bytes"][0],
                     method_costs(shape, world_size, "PipeFusion")["bytes"]))
    runs.append(("dit_cfg_parallel", "CFG parallel", 2,
                 lambda: cfg_parallel_sample(labels, steps=PARALLEL_STEPS)["bytes"][0],
                 image_bytes / 2 * 2))  # half of a two-part all-gather of the noise
    records = []
    with pinned_threads(THREADS):
        for key, label, world_size, run, per_step in runs:
            sent: list[float] = []

            def parallel(run: Any = run) -> float:
                start = time.perf_counter()
                sent[:] = [run()]
                return time.perf_counter() - start

            def single() -> float:
                start = time.perf_counter()
                sample(model, labels, steps=PARALLEL_STEPS)
                return time.perf_counter() - start

            times = measure_interleaved({"parallel": parallel, "single": single}, rounds,
                                        warmup=1)
            records.append(ratio_record(
                f"{key}_{PARALLEL_IMAGES}_images_{PARALLEL_STEPS}_steps",
                f"{label}, {world_size} ranks", "single-process sampler", times["parallel"],
                times["single"], device=device_name(), world_size=world_size, threads=THREADS,
                kv_bytes_per_rank=sent[0], kv_bytes_formula=per_step * PARALLEL_STEPS))
    return records
