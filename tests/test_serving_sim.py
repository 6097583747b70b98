"""The book's serving cost model and simulator, against PyTorch's FLOP counter, published model
sizes, queueing theory, and step-by-step recomputation."""

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from course_reference.serving.roofline import (
    H100_SXM,
    LLAMA2_7B,
    DecoderShape,
    decode_cost,
    step_cost,
)
from course_reference.serving.sim import (
    EngineCost,
    SimRequest,
    colocated,
    disaggregated,
    gamma_arrivals,
    pipeline_latencies,
    poisson_requests,
    simulate_engine,
    slo_attainment,
)
from course_runtime.models import GPT, DenseKVCache, GPTConfig
from course_runtime.models.cache import attention_reference

CFG = GPTConfig(vocab_size=80, d_model=64, n_layers=2, n_heads=4, context=128)


def _mm_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def test_tiny_gpt_shape_matches_the_model():
    torch.manual_seed(0)
    model = GPT(CFG)
    shape = DecoderShape.from_gpt(CFG)
    assert shape.weight_params == model.num_params()
    cache = DenseKVCache.for_model(model, batch=3, capacity=40)
    stored = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
    assert shape.kv_bytes_per_token * 3 * 40 == stored


@pytest.mark.parametrize("batch,context,new", [(3, 20, 1), (2, 0, 17)])
def test_matmul_flops_match_pytorchs_counter(batch, context, new):
    """Every linear layer's FLOPs (the counter does not see CPU attention, counted below)."""
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    cache = DenseKVCache.for_model(model, batch=batch, capacity=64)
    if context:
        with torch.no_grad():
            model(torch.randint(0, 80, (batch, context)), cache)
    counted = _mm_flops(lambda: model(torch.randint(0, 80, (batch, new)), cache))
    predicted = step_cost(DecoderShape.from_gpt(CFG), [(new, context)] * batch)
    assert predicted.matmul_flops == counted


def test_decode_attention_flops_match_the_explicit_formula():
    batch, context, Dh = 3, 25, CFG.d_model // CFG.n_heads
    q = torch.randn(batch, CFG.n_heads, 1, Dh)
    kv = torch.randn(batch, CFG.n_heads, context + 1, Dh)
    per_layer = _mm_flops(lambda: attention_reference(q, kv, kv, start=context))
    cost = decode_cost(DecoderShape.from_gpt(CFG), batch, context)
    assert cost.attention_flops == CFG.n_layers * per_layer


def test_llama2_7b_has_its_published_parameter_count():
    assert LLAMA2_7B.weight_params == 6_738_415_616      # the released checkpoint's count
    assert LLAMA2_7B.kv_bytes_per_token == 512 * 1024    # 2 x 32 layers x 4096 x 2 bytes


def test_decoding_one_sequence_is_far_below_the_ridge():
    assert H100_SXM.ridge == pytest.approx(989e12 / 3.35e12)
    single = decode_cost(LLAMA2_7B, 1, 512)
    assert 0.9 < single.intensity < 1.0                  # 2 FLOPs per 2-byte weight, minus KV
    assert single.bound(H100_SXM) == "memory"
    assert single.time(H100_SXM) == pytest.approx(single.bytes / 3.35e12)
    prefill = step_cost(LLAMA2_7B, [(4096, 0)])
    assert prefill.bound(H100_SXM) == "compute"


def test_bad_segments_are_named():
    with pytest.raises(ValueError, match="new=0"):
        step_cost(LLAMA2_7B, [(0, 5)])
    with pytest.raises(ValueError, match="at least one"):
        step_cost(LLAMA2_7B, [])


# ---- the engine simulator -------------------------------------------------------------------

COST = EngineCost(LLAMA2_7B, H100_SXM, mfu=0.5, mbu=0.8, overhead_s=1e-4)


@pytest.mark.parametrize("policy,budget", [("prefill-first", None), ("chunked", 10_000)])
def test_a_lone_request_takes_one_prefill_then_one_decode_per_token(policy, budget):
    r = SimRequest(0, arrival=1.5, prompt_len=300, output_len=6)
    served = simulate_engine([r], COST, policy=policy, token_budget=budget)[0]
    t = 1.5 + COST.step_time([(300, 0)])
    expected = [t]
    for i in range(1, 6):
        t += COST.step_time([(1, 300 + i - 1)])
        expected.append(t)
    assert served.token_times == pytest.approx(expected, rel=1e-12)


def test_chunked_steps_respect_the_budget_and_every_request_finishes():
    requests = poisson_requests(20, 60, seed=1)
    trace: list[dict] = []
    served = simulate_engine(requests, COST, policy="chunked", token_budget=256,
                             kv_capacity_tokens=60_000, trace=trace)
    assert max(s["prefill_tokens"] + s["decode_tokens"] for s in trace) <= 256
    for r in requests:
        times = served[r.id].token_times
        assert len(times) == r.output_len
        assert times[0] > r.arrival and np.all(np.diff(times) > 0)


def test_prefill_first_stalls_a_running_decode_and_chunking_does_not():
    """A long prompt arriving mid-decode holds up the running request for its whole prefill
    unless the prompt is cut into chunks that ride along with the decode."""
    short = SimRequest(0, 0.0, prompt_len=16, output_len=200)
    long = SimRequest(1, 0.3, prompt_len=8000, output_len=2)
    whole_prefill = COST.step_time([(8000, 0)])
    stalled = simulate_engine([short, long], COST, policy="prefill-first")[0]
    assert stalled.max_gap >= whole_prefill
    budget = 512
    chunked = simulate_engine([short, long], COST, policy="chunked", token_budget=budget)[0]
    worst_step = COST.step_time([(1, 216), (budget - 1, 8000 - budget + 1)])
    assert chunked.max_gap <= worst_step < whole_prefill / 5


def test_disaggregated_first_token_is_the_prefill_alone_then_the_transfer():
    r = SimRequest(0, 0.0, prompt_len=1000, output_len=4)
    link = 25e9
    served = disaggregated([r], COST, 1, 1, link_bandwidth=link)[0]
    prefill = COST.step_time([(1000, 0)])
    assert served.ttft == pytest.approx(prefill)
    handoff = prefill + 1000 * LLAMA2_7B.kv_bytes_per_token / link
    assert served.token_times[1] == pytest.approx(handoff + COST.step_time([(1, 1000)]))
    assert len(served.token_times) == 4


def test_colocated_round_robin_and_attainment():
    requests = poisson_requests(5, 40, seed=2)
    served = colocated(requests, COST, 2, policy="prefill-first")
    assert sorted(served) == [r.id for r in requests]
    assert slo_attainment(served, 1e9, 1e9) == 1.0
    assert slo_attainment(served, 0.0, 1e9) == 0.0


def test_kv_capacity_is_enforced():
    big = SimRequest(0, 0.0, prompt_len=900, output_len=200)
    with pytest.raises(ValueError, match="needs 1100 KV slots"):
        simulate_engine([big], COST, kv_capacity_tokens=1000)
    with pytest.raises(ValueError, match="token_budget"):
        simulate_engine([big], COST, policy="chunked")
    with pytest.raises(ValueError, match="unknown policy"):
        simulate_engine([big], COST, policy="fastest")


# ---- AlpaServe's queues --------------------------------------------------------------------

def test_single_stage_queue_matches_pollaczek_khinchine():
    """Poisson arrivals, deterministic service s, load rho: mean wait rho s / (2 (1 - rho))."""
    rate, s = 0.8, 1.0
    arrivals = gamma_arrivals(rate, 1.0, 200_000, seed=3)
    latency = pipeline_latencies(arrivals, [s])
    rho = rate * s
    assert np.mean(latency) - s == pytest.approx(rho * s / (2 * (1 - rho)), rel=0.05)


def test_equal_deterministic_stages_never_queue_after_the_first():
    arrivals = gamma_arrivals(1.5, 3.0, 2000, seed=4)
    one = pipeline_latencies(arrivals, [0.5])
    two = pipeline_latencies(arrivals, [0.5, 0.5])
    assert np.allclose(two, one + 0.5)


def test_gamma_arrivals_have_the_requested_rate_and_burstiness():
    arrivals = gamma_arrivals(4.0, 3.0, 50_000, seed=5)
    gaps = np.diff(arrivals)
    assert len(arrivals) / 50_000 == pytest.approx(4.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.1)
