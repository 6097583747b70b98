"""Train the course's tiny DiT on the bundled digits, on a CPU, reproducibly.

    python -m course_reference.diffusion.train [--steps N] [--threads T]

A DDPM noise predictor (Ho et al., 2020): each step draws images, timesteps and noise, and
regresses the noise added; the label is replaced by the null class one time in ten, so that the
same model serves classifier-free guidance. The weights shipped are an exponential moving average
of the trained ones (decay 0.999), which samples far better than the last step's after a short
run. Seeded, one thread by default: the same machine and library versions give the same weights.
Writes ``course_runtime/assets/weights/dit.safetensors`` and ``dit.json`` (configuration and the
facts of the run).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from torch.nn import functional as F  # noqa: N812

from course_runtime.diffusion import NoiseSchedule, digit_images
from course_runtime.models.dit import WEIGHTS_DIR, DiT, DiTConfig, save
from course_runtime.models.train import learning_rate

CONFIG = DiTConfig()  # 16x16 digits in patches of 1: 256 tokens of width 64, 4 blocks
STEPS, BATCH, PEAK_LR, EMA, LABEL_DROP = 4000, 64, 1e-3, 0.999, 0.1
WARMUP = 200  # steps of linear warm-up, then cosine decay to a tenth (as the GPTs' schedule)


def train(steps: int = STEPS, seed: int = 0, threads: int = 1, out: Path = WEIGHTS_DIR,
          name: str = "dit", progress: bool = True) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    images, labels = digit_images(CONFIG.image_size)
    schedule = NoiseSchedule()
    abar = schedule.alphas_cumprod
    model = DiT(CONFIG)
    ema = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    start, losses = time.perf_counter(), []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="DiT", unit="step")
    for step in range(steps):
        index = torch.randint(len(labels), (BATCH,), generator=g)
        x0, y = images[index], labels[index].clone()
        y[torch.rand(BATCH, generator=g) < LABEL_DROP] = CONFIG.num_classes
        t = torch.randint(schedule.num_train_timesteps, (BATCH,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, y), noise)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, PEAK_LR, warmup=WARMUP)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - EMA)
        losses.append(loss.item())
        if bar is not None:
            bar.update()
            if step % 100 == 0:
                bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}")
    if bar is not None:
        bar.close()
    facts = {"train_seconds": round(time.perf_counter() - start, 1), "steps": steps,
             "batch": BATCH, "seed": seed, "threads": threads,
             "params": sum(p.numel() for p in model.parameters()),
             "final_loss": round(sum(losses[-200:]) / len(losses[-200:]), 4),
             "data": f"sklearn load_digits, all {len(labels)} images, bilinear to "
                     f"{CONFIG.image_size}x{CONFIG.image_size}, in [-1, 1]"}
    save(ema, name, out, **facts)
    return facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    args = parser.parse_args(argv)
    print(train(args.steps, args.seed, args.threads, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
