"""Why decoding is memory-bound: FLOPs and bytes of one step of a decoder, on a roofline.

A step of a decoder-only Transformer multiplies every weight matrix by the batch's new tokens
(2 FLOPs per weight per token) and reads every weight once, whatever the batch; attention adds
4 FLOPs per layer, model dimension and (query, key) pair, and reads the cached keys and values.
The roofline (Williams, Waterman and Patterson, CACM 2009) then bounds the step's time by
``max(FLOPs / peak FLOP/s, bytes / memory bandwidth)``. Decoding one token per sequence does about
one multiply-add per weight byte read, far left of a GPU's ridge point, so its time is the time to
read the weights and the cache: batching is how a server buys FLOPs that are otherwise idle.

Hardware figures are published peaks (datasheets), not measurements; the page that uses them says
so. Model shapes are the published ones of the model they name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    """Peak dense FLOP/s and memory bandwidth (bytes/s) of one accelerator."""

    name: str
    peak_flops: float
    mem_bandwidth: float

    @property
    def ridge(self) -> float:
        """FLOPs per byte above which a kernel is compute-bound: peak / bandwidth."""
        return self.peak_flops / self.mem_bandwidth


# NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense BF16 tensor-core peak (1979 with 2:4 sparsity),
# 3.35 TB/s of HBM3 bandwidth.
H100_SXM = Hardware("H100 SXM (BF16 dense)", 989e12, 3.35e12)


@dataclass(frozen=True)
class DecoderShape:
    """What the cost of a decoder step depends on.

    matmul_params: weights that multiply activations (every linear layer and the output
    projection; not norms, and not the embedding lookup unless it is tied to the output layer).
    weight_params: weights a step reads (all of them). kv_dim: width of the keys (= values) one
    layer stores per token, n_kv_heads * head_dim (smaller than d_model with grouped-query
    attention). attn_dim: width over which queries meet keys, n_heads * head_dim.
    """

    name: str
    n_layers: int
    attn_dim: int
    kv_dim: int
    matmul_params: int
    weight_params: int
    bytes_per_value: int = 2

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of one token over all layers."""
        return 2 * self.n_layers * self.kv_dim * self.bytes_per_value

    @classmethod
    def from_gpt(cls, config: object, name: str = "tiny GPT", bytes_per_value: int = 4
                 ) -> DecoderShape:
        """The course's GPT (``course_runtime.models.GPTConfig``): per layer a fused QKV
        (3 d²), an output projection (d²) and a 4x MLP (8 d²); tied embedding and output."""
        d, L, V = config.d_model, config.n_layers, config.vocab_size
        matmul = 12 * d * d * L + V * d
        norms = 2 * d * (2 * L + 1)                     # LayerNorm weight and bias
        return cls(name, L, d, d, matmul, matmul + norms, bytes_per_value)


# Llama-2-7B (Touvron et al., 2023, Table 1 and the released config): 32 layers, d = 4096,
# 32 heads (no grouped-query attention at 7B), SwiGLU MLP of width 11008, vocabulary 32000,
# untied input and output embeddings; served in 16-bit.
_D, _L, _F, _V = 4096, 32, 11008, 32000
LLAMA2_7B = DecoderShape("Llama-2-7B", _L, _D, _D,
                         matmul_params=_L * (4 * _D * _D + 3 * _D * _F) + _V * _D,
                         weight_params=_L * (4 * _D * _D + 3 * _D * _F + 2 * _D) + 2 * _V * _D
                         + _D)


@dataclass(frozen=True)
class StepCost:
    """FLOPs and bytes of one model step."""

    matmul_flops: float
    attention_flops: float
    weight_bytes: float
    kv_bytes: float

    @property
    def flops(self) -> float:
        return self.matmul_flops + self.attention_flops

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOPs per byte moved."""
        return self.flops / self.bytes

    def time(self, hw: Hardware) -> float:
        """Roofline lower bound on the step's time on ``hw`` (seconds)."""
        return max(self.flops / hw.peak_flops, self.bytes / hw.mem_bandwidth)

    def bound(self, hw: Hardware) -> str:
        return "compute" if self.intensity >= hw.ridge else "memory"


def step_cost(shape: DecoderShape, segments: list[tuple[int, int]]) -> StepCost:
    """Cost of one step that processes, for each ``(new, context)`` in ``segments``, ``new``
    tokens of a sequence that already holds ``context`` tokens in its cache.

    Decoding is ``(1, context)``; a prefill (or a prefill chunk) is ``(prompt, 0)`` (or
    ``(chunk, done)``). The new token i of a segment attends to ``context + i + 1`` keys; the
    segment reads the keys and values of all ``context + new`` tokens and writes ``new`` of them.
    """
    if not segments:
        raise ValueError("step_cost: a step needs at least one (new, context) segment")
    for new, context in segments:
        if new < 1 or context < 0:
            raise ValueError(f"step_cost: segment (new={new}, context={context}) needs new >= 1 "
                             "and context >= 0")
    tokens = sum(new for new, _ in segments)
    pairs = sum(new * context + new * (new + 1) // 2 for new, context in segments)
    kv_tokens = sum(context + 2 * new for new, context in segments)   # read all, write new
    return StepCost(2 * shape.matmul_params * tokens,
                    4 * shape.n_layers * shape.attn_dim * pairs,
                    shape.weight_params * shape.bytes_per_value,
                    kv_tokens * shape.kv_bytes_per_token)


def decode_cost(shape: DecoderShape, batch: int, context: int) -> StepCost:
    """One decoding step of ``batch`` sequences that each hold ``context`` tokens."""
    return step_cost(shape, [(1, context)] * batch)
