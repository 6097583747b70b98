"""The course's checkpoints: float16 safetensors weights, with their configuration and the facts
of their training as JSON beside them (``assets/weights``)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "assets" / "weights"


def save(model: torch.nn.Module, name: str, directory: Path = WEIGHTS_DIR,
         **extra: object) -> None:
    """Weights as float16 safetensors (half the bytes; the model computes in float32) and the
    config (``model.config``, a dataclass) as JSON, with any ``extra`` facts (validation loss,
    training time) beside it."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float16).contiguous()
               for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / f"{name}.safetensors"))
    meta = {"config": asdict(model.config), **extra}
    (directory / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")


def load_meta(name: str, directory: Path = WEIGHTS_DIR) -> dict:
    """The JSON written beside a checkpoint: its config and training facts."""
    path = directory / f"{name}.json"
    if not path.exists():
        known = sorted(p.stem for p in directory.glob("*.safetensors"))
        raise FileNotFoundError(f"no checkpoint named {name!r} in {directory}; "
                                f"shipped checkpoints: {known}")
    return json.loads(path.read_text())


def load_weights(model: torch.nn.Module, name: str, directory: Path = WEIGHTS_DIR,
                 device: torch.device | str = "cpu") -> torch.nn.Module:
    """``model`` (built from the checkpoint's config) with its weights, in float32, in eval
    mode."""
    from safetensors.torch import load_file

    state = load_file(str(directory / f"{name}.safetensors"))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(device).eval()
