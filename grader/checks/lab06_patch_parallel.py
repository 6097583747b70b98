"""Checks for Lab 6 (patch-parallel DiT sampling), called by the lab's hidden tests.

The oracles are the course's reference: its split and merge of the bands, its DDIM step (itself
checked against diffusers' ``DDIMScheduler.step`` in ``tests/test_diffusion.py``), the
single-process guided sampler, and DistriFusion's exchange (``course_reference.diffusion.
parallel.StaleKV``), which is deterministic: given the same trajectory of images, stale keys
and values of the previous step give exactly one answer, so a student's must equal it. The
patch-parallel loops are the runtime's (``course_runtime.patch_parallel``), the same for the
student's pieces and the reference's; the collectives each rank runs are counted there, so that
a blocking all-gather where DistriFusion overlaps one is seen, not only its effect on time.

Graded with the submission in a process of its own (``grader.isolated``): the ranks that run a
student's exchange are forked there (``run_there``), and only what they computed comes back.

The public tests compare with ``public_expectations()``: what the reference computes for their
cases, shipped with the lab as data. The hidden tests rerun those cases and more.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from course_reference.diffusion import parallel as ref
from course_reference.diffusion import quality
from course_reference.diffusion.sampling import ddim_step as reference_ddim_step
from course_reference.diffusion.sampling import guided_eps, sample
from course_runtime.diffusion import NoiseSchedule, ddim_timesteps
from course_runtime.models.dit import load
from course_runtime.patch_parallel import kv_bytes_per_step, sample_bands, trajectory_eps
from course_runtime.testing import assert_close, require, time_limit
from course_runtime.timing import pinned_threads
from grader.checks import check_ratio, forbid, run_there

ISOLATED = True  # graded with the submission in a process of its own (grader.isolated)

FORBIDDEN = [
    "course_reference.diffusion.parallel.split_band",
    "course_reference.diffusion.parallel.merge_bands",
    "course_reference.diffusion.parallel.gather_kv",
    "course_reference.diffusion.parallel.StaleKV.__call__",
    "course_reference.diffusion.parallel.patch_parallel_sample",
    "course_reference.diffusion.sampling.ddim_step",
    "course_reference.diffusion.sampling.sample",
    # diffusers ships with the course: its scheduler's step is the answer to q2
    "diffusers.schedulers.scheduling_ddim.DDIMScheduler.step",
]
REASON = ("Lab 6 asks you to write the bands, the DDIM step and the exchanges yourself; "
          "course_reference.diffusion and diffusers' scheduler are what your code is compared "
          "against, not part of it")

GUIDANCE = 2.0
PUBLIC_SPLIT = {"seed": 0, "cases": 4}
PUBLIC_DDIM = {"seed": 0, "cases": 6}
PUBLIC_TRAJECTORY = {"labels": [3, 7], "steps": 3, "seed": 1}
SAMPLES = {"labels": list(range(10)), "steps": 10, "seed": 3, "world_size": 2}
PUBLIC_SAMPLES = {"labels": [0, 1, 2, 3], "steps": 6, "seed": 2, "world_size": 2}
MEAN_ERROR_BOUND = 0.05  # DistriFusion at N = 2 after one warm-up step: about 0.02 measured
ACCURACY_BOUND = 0.7  # the single process: about 0.9; chance: 0.1


def guard(namespace: dict[str, Any] | None = None) -> Any:
    """Block the reference (and diffusers' DDIM step) while student code runs."""
    return forbid(FORBIDDEN, REASON, namespace)


@functools.lru_cache(maxsize=1)
def _model() -> Any:
    return load("dit")


# -- q1: the bands ---------------------------------------------------------------------------

def split_cases(seed: int, cases: int) -> list[dict[str, Any]]:
    """Images ``[B, C, H, W]`` (rectangular: the split is along the height) with a patch size
    and a world size that divides the rows of patches, from one rank to one row each; the
    first cases fixed, the rest drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(2, 1, 16, 1, 2, 16), (1, 1, 16, 1, 4, 12), (1, 2, 8, 2, 8, 6), (3, 1, 4, 4, 1, 2)]
    found = []
    for case in range(cases):
        if case < len(sizes):
            B, C, grid, patch, N, width = sizes[case]
        else:
            grid = [2, 4, 6, 8, 12, 16][int(torch.randint(0, 6, (), generator=g))]
            divisors = [n for n in range(1, grid + 1) if grid % n == 0]
            N = divisors[int(torch.randint(0, len(divisors), (), generator=g))]
            patch = int(torch.randint(1, 4, (), generator=g))
            B = int(torch.randint(1, 4, (), generator=g))
            C = int(torch.randint(1, 4, (), generator=g))
            width = int(torch.randint(1, 9, (), generator=g))
        images = torch.randn(B, C, grid * patch, width * patch, generator=g)
        bands = [ref.split_band(images, r, N, patch).clone() for r in range(N)]
        found.append({"images": images, "patch": patch, "world_size": N, "bands": bands})
    return found


def check_split_merge(split_band: Callable[..., Any], merge_bands: Callable[..., Any],
                      seed: int, cases: int, namespace: dict[str, Any] | None = None) -> None:
    """Each rank's band is its rows of patches, in pixels, and merging every rank's band gives
    the images back; a world size that does not divide the rows is a ``ValueError``."""
    require(split_band=split_band, merge_bands=merge_bands)
    for case in split_cases(seed, cases):
        images, patch, N = case["images"], case["patch"], case["world_size"]
        shape = tuple(images.shape)
        for r, want in enumerate(case["bands"]):
            with guard(namespace), time_limit(10, "split_band"):
                got = split_band(images.clone(), r, N, patch)
            assert_close(None if got is None else torch.as_tensor(got).numpy(), want.numpy(),
                         what=f"split_band(images of shape {shape}, rank {r}, world_size {N}, "
                              f"patch {patch}) (rank {r}'s rows of patches, in pixels)", atol=0)
        with guard(namespace), time_limit(10, "merge_bands"):
            got = merge_bands([band.clone() for band in case["bands"]])
        assert_close(None if got is None else torch.as_tensor(got).numpy(), images.numpy(),
                     what=f"merge_bands of the {N} bands of images of shape {shape} (the bands "
                          "top to bottom, in rank order)", atol=0)
    images = torch.zeros(1, 1, 6, 6)
    for N, why in ((4, "6 rows do not split over 4 ranks"), (0, "there is no rank")):
        try:
            with guard(namespace), time_limit(10, "split_band"):
                split_band(images, 0, N, 1)
        except ValueError:
            continue
        except Exception as error:  # noqa: BLE001 - named in the message
            raise AssertionError(f"split_band(images of 6 rows of patches, rank 0, world_size "
                                 f"{N}, patch 1) raised {type(error).__name__}: {why}, raise "
                                 "ValueError") from None
        raise AssertionError(f"split_band(images of 6 rows of patches, rank 0, world_size {N}, "
                             f"patch 1) returned: {why}, raise ValueError")


# -- q2: the DDIM step -----------------------------------------------------------------------

def ddim_cases(seed: int, cases: int) -> list[dict[str, Any]]:
    """Random steps: the first and last timesteps of the schedule, jumps of one and of
    hundreds, the last step to the clean image (``t_prev = -1``), and a clip that bites (large
    ``x``) or none."""
    g = torch.Generator().manual_seed(seed)
    abar = NoiseSchedule().alphas_cumprod
    fixed = [(999, 899, 1.0), (40, -1, 1.0), (0, -1, None), (500, 499, None), (999, -1, 0.5),
             (250, 0, 1.0)]
    found = []
    for case in range(cases):
        if case < len(fixed):
            t, t_prev, clip = fixed[case]
        else:
            t = int(torch.randint(1, 1000, (), generator=g))
            t_prev = int(torch.randint(-1, t, (), generator=g))
            clip = [None, 1.0, 0.5][int(torch.randint(0, 3, (), generator=g))]
        shape = (int(torch.randint(1, 4, (), generator=g)), 1, 4, 4)
        eps = torch.randn(shape, generator=g)
        x = torch.randn(shape, generator=g) * (1 + 3 * (case % 2))
        want = reference_ddim_step(eps, t, t_prev, x, abar, clip=clip, clipped_eps=True)
        found.append({"eps": eps, "t": t, "t_prev": t_prev, "x": x, "clip": clip,
                      "x_prev": want})
    return found


def check_ddim(ddim_step: Callable[..., Any], seed: int, cases: int,
               namespace: dict[str, Any] | None = None) -> None:
    """The student's step equals the reference's (DDIM with eta = 0, along the clipped
    prediction's noise when ``clip`` is given), and leaves its inputs as they were."""
    require(ddim_step=ddim_step)
    abar = NoiseSchedule().alphas_cumprod
    for case in ddim_cases(seed, cases):
        eps, x = case["eps"], case["x"]
        with guard(namespace), time_limit(10, "ddim_step"):
            got = ddim_step(eps.clone(), case["t"], case["t_prev"], x.clone(), abar.clone(),
                            clip=case["clip"])
        assert_close(None if got is None else torch.as_tensor(got).numpy(),
                     case["x_prev"].numpy(),
                     what=f"ddim_step from t={case['t']} to t_prev={case['t_prev']} with "
                          f"clip={case['clip']}", atol=1e-5, rtol=1e-5)


# -- the trajectories q3 and q4 are checked on ------------------------------------------------

@functools.lru_cache(maxsize=8)
def reference_trajectory(labels: tuple[int, ...], steps: int, seed: int
                         ) -> dict[str, torch.Tensor | list[int]]:
    """The single process's guided DDIM trajectory: the images ``xs[i]`` at each timestep and
    the guided noise predictions ``eps[i]`` there."""
    model = _model()
    labels_t = torch.tensor(labels, dtype=torch.long)
    abar = NoiseSchedule().alphas_cumprod
    timesteps = ddim_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), model.config.channels, model.config.image_size,
                    model.config.image_size, generator=g)
    xs, eps = [], []
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            e = guided_eps(model, x, t, labels_t, GUIDANCE)
            xs.append(x)
            eps.append(e)
            x = reference_ddim_step(e, t, t_prev, x, abar, clip=1.0, clipped_eps=True)
    return {"xs": torch.stack(xs), "timesteps": list(timesteps), "eps": torch.stack(eps)}


@functools.lru_cache(maxsize=8)
def reference_stale_eps(labels: tuple[int, ...], steps: int, seed: int, world_size: int,
                        warmup: int) -> torch.Tensor:
    """DistriFusion's noise predictions along the single process's trajectory (the
    reference's exchange on the runtime's loop)."""
    traj = reference_trajectory(labels, steps, seed)
    return trajectory_eps(traj["xs"], traj["timesteps"], labels, world_size, guidance=GUIDANCE,
                          warmup=warmup, stale_kv=ref.StaleKV)["eps"]


def _compare_steps(got: Any, want: torch.Tensor, what: str, warmup: int) -> None:
    got = None if got is None else torch.as_tensor(got)
    if got is None or tuple(got.shape) != tuple(want.shape):
        raise AssertionError(f"{what}: expected noise predictions of shape {tuple(want.shape)}, "
                             f"got {None if got is None else tuple(got.shape)}")
    for i in range(want.shape[0]):
        kind = "a warm-up step, fresh" if i < warmup else "a stale step"
        assert_close(got[i].numpy(), want[i].numpy(), what=f"{what}, step {i} ({kind})",
                     atol=1e-4, rtol=1e-4)


def _check_bytes(kv_bytes: Sequence[float], images: int, world_size: int, steps: int,
                 what: str) -> None:
    want = kv_bytes_per_step(_model(), images, world_size) * steps
    for rank, sent in enumerate(kv_bytes):
        if not np.isclose(sent, want, rtol=1e-6):
            raise AssertionError(
                f"{what}: rank {rank} sent {sent:,.0f} bytes, expected {want:,.0f} (each block's "
                f"keys and values of every token once per step: (N - 1) / N of 2 x {2 * images} "
                f"rows x tokens x d_model floats, x {_model().config.n_layers} blocks x "
                f"{steps} steps)")


# -- q3: the synchronous exchange ------------------------------------------------------------

def check_gather(gather_kv: Callable[..., Any], world_sizes: Sequence[int],
                 labels: Sequence[int], steps: int, seed: int,
                 namespace: dict[str, Any] | None = None) -> None:
    """With every band's fresh keys and values, the merged noise predictions along the single
    process's trajectory equal the single process's, and each rank sends the formula's bytes."""
    require(gather_kv=gather_kv)
    traj = reference_trajectory(tuple(labels), steps, seed)
    for N in world_sizes:
        what = f"patch parallel on {N} ranks with your gather_kv"
        with guard(namespace):
            got = run_there(trajectory_eps, traj["xs"], traj["timesteps"], list(labels), N,
                            guidance=GUIDANCE, warmup=steps, gather_kv=gather_kv, timeout=120)
        _compare_steps(got["eps"], traj["eps"], what + " (against the single process)", steps)
        _check_bytes(got["kv_bytes"], len(labels), N, steps, what)


# -- q4: DistriFusion ------------------------------------------------------------------------

def check_stale(StaleKV: Callable[..., Any], cases: Sequence[tuple[int, int]],
                labels: Sequence[int], steps: int, seed: int,
                namespace: dict[str, Any] | None = None) -> None:
    """For each ``(world_size, warmup)``: along the single process's trajectory, the merged
    noise predictions equal DistriFusion's (fresh warm-up steps, then this band's fresh keys
    and values with the other bands' from the previous step); the warm-up steps alone gather
    blocking, every later one in the background (``comm.all_gather_async``), and each rank
    sends the formula's bytes."""
    require(StaleKV=StaleKV)
    traj = reference_trajectory(tuple(labels), steps, seed)
    blocks = _model().config.n_layers
    for N, warmup in cases:
        want = reference_stale_eps(tuple(labels), steps, seed, N, warmup)
        what = f"DistriFusion on {N} ranks, {warmup} warm-up step{'s' * (warmup > 1)}"
        with guard(namespace):
            got = run_there(trajectory_eps, traj["xs"], traj["timesteps"], list(labels), N,
                            guidance=GUIDANCE, warmup=warmup, stale_kv=StaleKV, timeout=120)
        _compare_steps(got["eps"], want, what, warmup)
        expected_calls = {"all_gather": blocks * warmup,
                          "all_gather_async": blocks * (steps - warmup)}
        for rank, calls in enumerate(got["calls"]):
            calls = {name: count for name, count in calls.items() if count}
            if calls.get("all_gather", 0) > blocks * warmup:
                raise AssertionError(
                    f"{what}: rank {rank} ran {calls['all_gather']} blocking all-gathers, "
                    f"expected {blocks * warmup} (one per block in each warm-up step): after "
                    "the warm-up, start each gather with comm.all_gather_async and wait for it "
                    "one step later, so that it overlaps the step's compute")
            if calls != {name: count for name, count in expected_calls.items() if count}:
                raise AssertionError(f"{what}: rank {rank} ran the collectives {calls}, expected "
                                     f"{expected_calls}")
        _check_bytes(got["kv_bytes"], len(labels), N, steps, what)


# -- q5: measured --------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def single_process_images(labels: tuple[int, ...], steps: int, seed: int) -> torch.Tensor:
    with pinned_threads(1):
        return sample(_model(), list(labels), steps=steps, guidance=GUIDANCE, seed=seed)


def _student_pieces(split_band: Any, merge_bands: Any, ddim_step: Any, StaleKV: Any
                    ) -> dict[str, Any]:
    return {"split_band": split_band, "merge_bands": merge_bands, "ddim_step": ddim_step,
            "stale_kv": StaleKV}


def _sample_yours(pieces: dict[str, Any], labels: Sequence[int], steps: int, seed: int,
                  world_size: int, namespace: dict[str, Any] | None) -> dict[str, Any]:
    with guard(namespace):
        return run_there(sample_bands, list(labels), world_size, steps=steps, guidance=GUIDANCE,
                         seed=seed, warmup=1, timeout=180, **pieces)


def _check_images(images: Any, single: torch.Tensor, labels: Sequence[int], what: str) -> float:
    images = None if images is None else torch.as_tensor(images)
    if images is None or tuple(images.shape) != tuple(single.shape):
        raise AssertionError(f"{what}: expected images of shape {tuple(single.shape)}, got "
                             f"{None if images is None else tuple(images.shape)}")
    error = float((images - single).abs().mean())
    if not np.isfinite(error) or error > MEAN_ERROR_BOUND:
        raise AssertionError(f"{what}: the images differ from the single process's by {error:.3f} "
                             f"per pixel on average (bound {MEAN_ERROR_BOUND}; DistriFusion after "
                             f"one warm-up step: about 0.02)")
    return error


def check_samples(split_band: Any, merge_bands: Any, ddim_step: Any, StaleKV: Any,
                  namespace: dict[str, Any] | None = None) -> dict[str, float]:
    """Your pieces on the runtime's sampler, DistriFusion on 2 ranks after one warm-up step:
    the digits are close to the single process's (a bound on the mean distance per pixel),
    still labelled as asked by the course's digit classifier, and each rank sent the formula's
    bytes."""
    require(split_band=split_band, merge_bands=merge_bands, ddim_step=ddim_step, StaleKV=StaleKV)
    labels, steps, seed, N = (SAMPLES[k] for k in ("labels", "steps", "seed", "world_size"))
    single = single_process_images(tuple(labels), steps, seed)
    got = _sample_yours(_student_pieces(split_band, merge_bands, ddim_step, StaleKV), labels,
                        steps, seed, N, namespace)
    what = f"your DistriFusion sampler on {N} ranks"
    error = _check_images(got["images"], single, labels, what)
    accuracy = quality.accuracy(torch.as_tensor(got["images"]), labels)
    print(f"{what}: {error:.4f} from the single process per pixel; {accuracy:.0%} of the digits "
          f"labelled as asked (single process: {quality.accuracy(single, labels):.0%})")
    if accuracy < ACCURACY_BOUND:
        raise AssertionError(f"{what}: only {accuracy:.0%} of the samples are labelled as the "
                             f"digit asked for by the course's classifier (bound "
                             f"{ACCURACY_BOUND:.0%})")
    _check_bytes(got["kv_bytes"], len(labels), N, steps, what)
    return {"error": error, "accuracy": accuracy}


def check_speed(split_band: Any, merge_bands: Any, ddim_step: Any, StaleKV: Any, bound: float,
                rounds: int = 3, namespace: dict[str, Any] | None = None) -> float:
    """The denoising loop's time with your pieces over the reference's, on the same runtime
    loop (2 ranks, one thread each), the fastest of ``rounds`` interleaved runs each; every
    timed run of yours is first checked against the single process's images. Prints the
    speed-up over the single process too (on a 2-core machine, below 1: see the handout)."""
    require(split_band=split_band, merge_bands=merge_bands, ddim_step=ddim_step, StaleKV=StaleKV)
    labels, steps, seed, N = (SAMPLES[k] for k in ("labels", "steps", "seed", "world_size"))
    single = single_process_images(tuple(labels), steps, seed)
    pieces = _student_pieces(split_band, merge_bands, ddim_step, StaleKV)
    reference = {"split_band": ref.split_band, "merge_bands": ref.merge_bands,
                 "ddim_step": ref._ddim_step, "stale_kv": ref.StaleKV}
    yours, theirs, alone = [], [], []
    for i in range(rounds):
        got = _sample_yours(pieces, labels, steps, seed, N, namespace)
        _check_images(got["images"], single, labels, f"your sampler in timed run {i + 1}")
        yours.append(float(got["seconds"]))
        theirs.append(float(sample_bands(labels, N, steps=steps, guidance=GUIDANCE, seed=seed,
                                         warmup=1, timeout=180, **reference)["seconds"]))
        with pinned_threads(1):
            start = time.perf_counter()
            sample(_model(), labels, steps=steps, guidance=GUIDANCE, seed=seed)
            alone.append(time.perf_counter() - start)
    print(f"speed-up over the single process (one thread): {min(alone) / min(yours):.2f}x on "
          f"{N} ranks")
    return check_ratio(yours, theirs, what=f"DistriFusion sampler ({steps} steps, {N} ranks)",
                       peer_name="the reference", bound=bound, unit="run", fastest=True)


def public_expectations() -> dict[str, Any]:
    """What the public tests compare with, computed by the reference when the lab is assigned:
    q1's bands, q2's steps, q3's and q4's noise predictions along a short trajectory, and q5's
    single-process images."""
    traj = reference_trajectory(tuple(PUBLIC_TRAJECTORY["labels"]), PUBLIC_TRAJECTORY["steps"],
                                PUBLIC_TRAJECTORY["seed"])
    stale = reference_stale_eps(tuple(PUBLIC_TRAJECTORY["labels"]), PUBLIC_TRAJECTORY["steps"],
                                PUBLIC_TRAJECTORY["seed"], 2, 1)
    p = PUBLIC_SAMPLES
    return {
        "q1_split": [{"images": c["images"].tolist(), "patch": c["patch"],
                      "world_size": c["world_size"], "bands": [b.tolist() for b in c["bands"]]}
                     for c in split_cases(**PUBLIC_SPLIT)],
        "q2_ddim": [{"eps": c["eps"].tolist(), "t": c["t"], "t_prev": c["t_prev"],
                     "x": c["x"].tolist(), "clip": c["clip"], "x_prev": c["x_prev"].tolist()}
                    for c in ddim_cases(**PUBLIC_DDIM)],
        "q3_q4_trajectory": {"labels": PUBLIC_TRAJECTORY["labels"], "xs": traj["xs"].tolist(),
                             "timesteps": traj["timesteps"], "eps": traj["eps"].tolist(),
                             "stale_eps": stale.tolist(), "world_size": 2, "warmup": 1,
                             "guidance": GUIDANCE},
        "q5_samples": {**p, "guidance": GUIDANCE, "bound": MEAN_ERROR_BOUND,
                       "single": single_process_images(tuple(p["labels"]), p["steps"],
                                                       p["seed"]).tolist()},
    }


__all__ = ["check_ddim", "check_gather", "check_samples", "check_speed", "check_split_merge",
           "check_stale", "ddim_cases", "public_expectations", "reference_stale_eps",
           "reference_trajectory", "split_cases"]
