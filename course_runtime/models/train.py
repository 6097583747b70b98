"""Train the course's two tiny GPTs on Moby-Dick, on a CPU, reproducibly.

    python -m course_runtime.models.train --which target     # the model that decides
    python -m course_runtime.models.train --which draft      # the cheap one that guesses

Both share the character tokenizer (written to assets/weights/tokenizer.json). The target is deep
and the draft has a single layer: when decoding one token at a time on a CPU, time grows with the
number of layers far more than with their width, and speculative decoding pays off only when a
draft step costs a small fraction of a target step (Leviathan et al., ICML 2023, Theorem 3.8).

Everything is seeded and runs on one thread (on a shared machine, several threads spend their time
waiting for each other): the same machine and library versions give the same weights. Training uses
bfloat16 autocast, which the Xeon CPUs the course was built on run on their matrix units; the
weights are kept in float32 and shipped in float16. The losses written beside the weights are
measured after that rounding, on the held-out last 5 % of the book.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch.nn import functional as F  # noqa: N812

from .gpt import GPT, WEIGHTS_DIR, GPTConfig, load, save
from .tokenizer import CharTokenizer, load_corpus, split_corpus

CONTEXT = 256
SIZES = {
    # name: (d_model, n_layers, n_heads, steps, batch, peak learning rate)
    "target": (192, 8, 6, 1500, 8, 2e-3),
    "draft": (128, 1, 4, 1500, 8, 3e-3),
}


def encoded_splits(tokenizer: CharTokenizer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and validation token ids (uint8: the vocabulary is under 256 symbols)."""
    train, val = split_corpus(load_corpus())
    tokenizer = tokenizer or CharTokenizer.load()
    return (torch.tensor(tokenizer.encode(train), dtype=torch.uint8),
            torch.tensor(tokenizer.encode(val), dtype=torch.uint8))


@torch.no_grad()
def evaluate(model: GPT, ids: torch.Tensor, windows: int = 32, length: int = CONTEXT) -> float:
    """Mean next-token cross-entropy (nats) over ``windows`` evenly spaced windows of ``ids``.

    The windows are fixed, so two models are always compared on the same characters.
    """
    starts = torch.linspace(0, len(ids) - length - 1, windows).long()
    batch = torch.stack([ids[s:s + length + 1] for s in starts.tolist()]).long()
    was_training = model.training
    model.eval()
    logits = model(batch[:, :-1])
    model.train(was_training)
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()


def learning_rate(step: int, steps: int, peak: float, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(which: str, steps: int | None = None, seed: int = 0, threads: int = 1,
          out: Path = WEIGHTS_DIR, log_every: int = 50) -> dict[str, float]:
    """Train one checkpoint and write it to ``out``; returns its training facts."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    d_model, n_layers, n_heads, default_steps, batch, peak = SIZES[which]
    steps = default_steps if steps is None else steps
    tokenizer = CharTokenizer.from_text(load_corpus())
    tokenizer.save(out / "tokenizer.json")
    train_ids, val_ids = encoded_splits(tokenizer)
    config = GPTConfig(tokenizer.vocab_size, d_model, n_layers, n_heads, CONTEXT)
    model = GPT(config)
    matrices = [p for p in model.parameters() if p.dim() == 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1},
                                   {"params": others, "weight_decay": 0.0}],
                                  lr=peak, betas=(0.9, 0.95), fused=True)
    generator = torch.Generator().manual_seed(seed)
    print(f"{which}: {model.num_params():,} parameters, {steps} steps of {batch}x{CONTEXT}")
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, peak)
        offsets = torch.randint(0, len(train_ids) - CONTEXT - 1, (batch,), generator=generator)
        chunk = torch.stack([train_ids[o:o + CONTEXT + 1] for o in offsets.tolist()]).long()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"  step {step:5d}  loss {loss.item():.3f}  "
                  f"{time.perf_counter() - start:6.0f} s", flush=True)
    seconds = time.perf_counter() - start
    save(model, which, out, train_seconds=round(seconds, 1), steps=steps, batch=batch,
         seed=seed, threads=threads, params=model.num_params())
    shipped = load(which, out)  # the float16-rounded weights, as users get them
    facts = {"val_loss": round(evaluate(shipped, val_ids), 4),
             "train_loss": round(evaluate(shipped, train_ids), 4)}
    save(shipped, which, out, train_seconds=round(seconds, 1), steps=steps, batch=batch,
         seed=seed, threads=threads, params=model.num_params(), **facts)
    print(f"{which}: {seconds:.0f} s, train loss {facts['train_loss']:.3f}, "
          f"val loss {facts['val_loss']:.3f} (chance: ln {tokenizer.vocab_size} = "
          f"{math.log(tokenizer.vocab_size):.3f})")
    return {"seconds": seconds, **facts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--which", choices=sorted(SIZES), required=True)
    parser.add_argument("--steps", type=int, default=None, help="default: the shipped recipe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    args = parser.parse_args(argv)
    train(args.which, args.steps, args.seed, args.threads, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
