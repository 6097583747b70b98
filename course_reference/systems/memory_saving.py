"""Saving activation memory: counting what autograd keeps, recomputation, and offloading.

- Autograd keeps, for every operation of the forward pass, the tensors its backward will need.
  ``SavedTensorCounter`` sees each of them through ``torch.autograd.graph.saved_tensors_hooks``
  and adds up the distinct storages they live in: the activation memory of a training step.
- Recomputation (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost", section 4):
  keep only the input of every segment of k layers and recompute the segment's activations
  during the backward pass. With ``torch.utils.checkpoint`` in its non-reentrant form, a hook
  outside the checkpoint sees only the segment's inputs: everything inside is packed by the
  checkpoint's own hooks and recomputed later.
- Offloading (Rhu et al. 2016, vDNN): move saved tensors to host memory after the forward pass
  has used them and bring them back for the backward pass. ``OffloadSavedTensors`` does this
  with the same hooks, and counts what it moved.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _storage(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


class SavedTensorCounter:
    """Within ``with SavedTensorCounter(ignore=model.parameters()) as saved:``, record every tensor
    autograd saves for the backward pass. ``saved.bytes`` counts each storage once (a ReLU's
    output and the next layer's input are the same memory) and leaves out the ignored tensors'
    storages (parameters are memory too, but not activation memory)."""

    def __init__(self, ignore: Iterable[torch.Tensor] = ()):
        self._ignored = {_storage(t)[0] for t in ignore}
        self.storages: dict[int, int] = {}
        self.tensors = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        pointer, nbytes = _storage(t)
        if pointer not in self._ignored:
            self.storages[pointer] = nbytes
            self.tensors += 1
        return t

    @property
    def bytes(self) -> int:
        """Distinct bytes held for the backward pass."""
        return sum(self.storages.values())

    def __enter__(self) -> SavedTensorCounter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def run_stack(layers: Sequence[nn.Module], x: torch.Tensor,
              checkpoint_every: int | None = None) -> torch.Tensor:
    """Apply ``layers`` in order. With ``checkpoint_every = k``, each run of k consecutive layers
    is one non-reentrant checkpoint: only its input is kept, the rest is recomputed in the
    backward pass (with the same random numbers, so dropout masks agree)."""
    if checkpoint_every is None:
        for layer in layers:
            x = layer(x)
        return x
    if checkpoint_every < 1:
        raise ValueError(f"run_stack: checkpoint_every must be a positive number of layers, "
                         f"got {checkpoint_every}")
    for start in range(0, len(layers), checkpoint_every):
        segment = nn.Sequential(*layers[start:start + checkpoint_every])
        x = checkpoint(segment, x, use_reentrant=False)
    return x


def checkpointed_peak_bytes(num_layers: int, every: int, input_bytes: int,
                            segment_bytes: int) -> int:
    """Peak activation memory with a checkpoint every ``every`` layers (Chen et al. 2016,
    section 4.1): the ⌈n/k⌉ segment inputs kept through the whole step, plus the activations of
    the one segment being recomputed during its backward. Minimal near k = √n."""
    return math.ceil(num_layers / every) * input_bytes + segment_bytes


class OffloadSavedTensors:
    """Within ``with OffloadSavedTensors(device="cpu") as offload:``, saved tensors of at least
    ``min_bytes`` are copied to ``device`` (host memory, vDNN's offload) when saved and copied
    back to where they came from when the backward pass needs them. Smaller tensors stay: their
    transfer would cost more in latency than they free. Parameters (``ignore``) stay too: they
    are kept anyway. A tensor saved by two operations (a ReLU's output, the next layer's input)
    is moved once. Counts ``bytes_moved`` and ``bytes_kept``."""

    def __init__(self, device: str | torch.device = "cpu", min_bytes: int = 0,
                 ignore: Iterable[torch.Tensor] = ()):
        self.device = torch.device(device)
        self.min_bytes = min_bytes
        self._ignored = {_storage(t)[0] for t in ignore}
        self.bytes_moved = 0
        self.bytes_kept = 0
        # Host copies by the id of the original tensor, dropped when the original dies: an
        # address or an id may be reused by a later tensor, and must never find a stale copy.
        self._moved: dict[int, torch.Tensor] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> tuple[torch.device | None, torch.Tensor]:
        nbytes = t.numel() * t.element_size()
        if _storage(t)[0] in self._ignored or nbytes < self.min_bytes:
            self.bytes_kept += nbytes
            return None, t
        if id(t) in self._moved:
            return t.device, self._moved[id(t)]
        self.bytes_moved += nbytes
        # copy=True: even when host and device are the same (on a CPU-only machine) the packed
        # tensor must not share the original's memory, or nothing would have been freed.
        moved = t.to(self.device, copy=True)
        self._moved[id(t)] = moved
        weakref.finalize(t, self._moved.pop, id(t), None)
        return t.device, moved

    @staticmethod
    def _unpack(packed: tuple[torch.device | None, torch.Tensor]) -> torch.Tensor:
        home, t = packed
        return t if home is None else t.to(home)

    def __enter__(self) -> OffloadSavedTensors:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
