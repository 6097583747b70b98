"""An analytical model of one DiT denoising step split over N devices, method by method.

Per step, for ``rows`` images through the network (twice the images with classifier-free
guidance), ``p`` tokens per image, hidden size ``hs`` and ``L`` blocks:

- FLOPs: each block's matrix products cost ``2 x 12 p hs^2`` per image (Q, K, V and the output
  projection ``4 hs^2``, the MLP ``8 hs^2`` at ratio 4) and its attention ``2 x 2 p^2 hs``
  (scores and the weighted sum); the adaLN, embedding and head layers are per image or per
  token and far smaller, and left out (the tests measure how small with torch's FLOP counter);
- bytes each rank sends, with ring collectives (a rank sends ``(N - 1) / N`` of an all-gather's
  or an all-to-all's output, twice that for an all-reduce): the coefficients of xDiT's table
  (``2 O(p hs) L`` for DistriFusion and ring attention, ``4/N O(p hs) L`` for Ulysses,
  ``4 O(p hs) L`` for tensor parallelism, ``2 O(p hs)`` for PipeFusion) with their constants;
- memory per rank: parameters (all, or a 1/N share), and the key-value buffer a method keeps
  between steps (DistriFusion: every block's keys and values of every token; PipeFusion: those
  of its own blocks), which is xDiT's "extra buffer" column.

Latency is compute over N devices at one efficiency plus the communication at one bandwidth,
overlapped for the methods that hide it (DistriFusion, ring attention, PipeFusion) and added
for the others. Like Part III's training model, it ranks methods and shows where time goes; it
does not predict to 5 %.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DiTShape:
    tokens: int
    hidden: int
    layers: int
    images: int = 1
    guidance: bool = True
    mlp_ratio: int = 4
    bytes_per_value: int = 2  # bf16 on a GPU; the course's CPU runs are float32 (4)

    @property
    def rows(self) -> int:
        return self.images * (2 if self.guidance else 1)

    @property
    def params(self) -> int:
        """The blocks' weights: Q, K, V, output, the MLP and the adaLN's six modulations."""
        h = self.hidden
        return self.layers * ((4 + 2 * self.mlp_ratio) * h * h + 6 * h * h)


@dataclass(frozen=True)
class Devices:
    count: int
    peak_flops: float  # per device, in the serving precision
    efficiency: float  # the fraction of peak a DiT's matrix products reach
    bandwidth: float  # bytes/s each device sends
    memory_bytes: float


def flops_per_step(shape: DiTShape) -> dict[str, float]:
    """Matrix-product and attention FLOPs of one denoising step (every row, every block)."""
    p, h, L = shape.tokens, shape.hidden, shape.layers
    linear = 2 * (4 + 2 * shape.mlp_ratio) * p * h * h * L * shape.rows
    attention = 2 * 2 * p * p * h * L * shape.rows
    return {"linear": float(linear), "attention": float(attention),
            "total": float(linear + attention)}


METHODS = ("single device", "tensor parallel", "DistriFusion", "ring attention", "Ulysses",
           "PipeFusion")
OVERLAPPED = {"DistriFusion", "ring attention", "PipeFusion"}


def method_costs(shape: DiTShape, n: int, method: str, patches: int | None = None
                 ) -> dict[str, float]:
    """Bytes one rank sends per step, its parameter bytes and its key-value buffer bytes kept
    between steps, for ``method`` on ``n`` devices (PipeFusion: ``patches`` pipelined patches,
    ``n`` by default)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    b = shape.bytes_per_value
    activation = shape.rows * shape.tokens * shape.hidden * b  # one [rows, p, hs] tensor
    share = (n - 1) / n
    params = shape.params * b
    kv_all = 2 * activation * shape.layers  # every block's keys and values, every token
    if method == "single device" or n == 1:
        return {"bytes": 0.0, "params": float(params), "kv_buffer": 0.0}
    if method == "tensor parallel":  # two all-reduces of the activations per block
        return {"bytes": 2 * 2 * share * activation * shape.layers, "params": params / n,
                "kv_buffer": 0.0}
    if method == "DistriFusion":  # an all-gather of the keys and values per block
        return {"bytes": 2 * share * activation * shape.layers, "params": float(params),
                "kv_buffer": float(kv_all)}
    if method == "ring attention":  # the keys and values go once round the ring per block
        return {"bytes": 2 * share * activation * shape.layers, "params": float(params),
                "kv_buffer": 0.0}
    if method == "Ulysses":  # all-to-alls of Q, K, V in and of the output back, 1/N each
        return {"bytes": 4 * share * activation / n * shape.layers, "params": float(params),
                "kv_buffer": 0.0}
    # PipeFusion: each patch's activations leave this stage once per step (and the last stage's
    # go back to the first for the next step): one activation's worth per rank.
    del patches  # the bytes do not depend on how many patches the step is cut into
    return {"bytes": float(activation), "params": params / n, "kv_buffer": kv_all / n}


def latency(shape: DiTShape, devices: Devices, method: str, steps: int = 50,
            patches: int | None = None) -> dict[str, float]:
    """Seconds for ``steps`` denoising steps: compute split over the devices, communication at
    the devices' bandwidth, hidden behind the compute where the method overlaps them."""
    n = 1 if method == "single device" else devices.count
    compute = flops_per_step(shape)["total"] / (n * devices.peak_flops * devices.efficiency)
    costs = method_costs(shape, n, method, patches)
    comm = costs["bytes"] / devices.bandwidth
    if method == "PipeFusion":  # the pipeline fills once per step for M patches on N stages
        m = patches or n
        compute *= (m + n - 1) / m
    step = max(compute, comm) if method in OVERLAPPED else compute + comm
    return {"seconds": steps * step, "compute_s": steps * compute, "comm_s": steps * comm,
            "memory": costs["params"] + costs["kv_buffer"]}


def dit_xl_1024() -> DiTShape:
    """DiT-XL/2 (Peebles and Xie) on a 1024x1024 image: a 128x128 latent in patches of 2, 4,096
    tokens of width 1,152, 28 blocks, with guidance."""
    return DiTShape(tokens=(1024 // 8 // 2) ** 2, hidden=1152, layers=28)


__all__ = ["METHODS", "OVERLAPPED", "DiTShape", "Devices", "dit_xl_1024", "flops_per_step",
           "latency", "method_costs"]
