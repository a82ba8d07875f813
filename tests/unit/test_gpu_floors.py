"""The CPU-side logic of the GPU scripts (scripts/gpu/floors.py and what uses it): sizing from the
card's memory, ratios against measured floors, OOM classification, time budgets, and the parity
verdict. No GPU: the numbers are the cards' (H100 80 GB, H200 141 GB) as the driver reports them."""

import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "gpu"))

import floors  # noqa: E402
from engine_bench import ARCHS, Report, guard, section  # noqa: E402
from floors import (GiB, Budget, Floors, classify_failure, decode_floor_ms, failure_note, graph_bucket_floor,  # noqa: E402
                    pd_sizing, plan_batches, prefill_floor_ms, resident_weight_bytes, kv_bytes_per_token)
from gpu_parity import top1_summary, verdict  # noqa: E402

from pdserve.runtime.cuda_graph import graph_buckets  # noqa: E402

H100 = int(79.19 * GiB)    # torch.cuda.mem_get_info total of an H100 80GB HBM3
H200 = int(139.8 * GiB)
LLAMA_8B = ARCHS["llama-3.1-8b"]
TOKENS_PER_SEQ = 2096      # engine_bench: 2k context + warm-up + steps, whole 16-token pages


def card(copy_tb_s: float, tflops: float, total: int = H200) -> Floors:
    return Floors("test card", total, total, copy_tb_s * 1e12, tflops * 1e12, "bfloat16", 8192, 2 * GiB)


def test_h100_cannot_hold_the_batch_256_pool_so_it_runs_at_the_largest_bucket_that_fits():
    plans = plan_batches(LLAMA_8B, 2, [1, 8, 64, 256], TOKENS_PER_SEQ, H100)
    assert [(p.asked, p.batch) for p in plans] == [(1, 1), (8, 8), (64, 64), (256, 192)]
    assert [p.note for p in plans[:3]] == ["", "", ""]
    assert "bs=256" in plans[3].note and "ran bs=192" in plans[3].note
    usable = H100 * floors.USABLE_FRACTION
    assert floors.batch_bytes(LLAMA_8B, 2, 192, TOKENS_PER_SEQ) <= usable
    assert floors.batch_bytes(LLAMA_8B, 2, 224, TOKENS_PER_SEQ) > usable  # the next bucket up does not fit
    # the pool of the issue: 65.5 GiB of KV beside 15 GiB of weights
    assert 256 * TOKENS_PER_SEQ * kv_bytes_per_token(LLAMA_8B, 2) / GiB == pytest.approx(65.5)
    assert resident_weight_bytes(LLAMA_8B, 2) / GiB == pytest.approx(14.96, abs=0.01)


def test_h200_runs_every_batch_as_asked_and_a_tiny_card_runs_none():
    assert [(p.asked, p.batch, p.note) for p in plan_batches(LLAMA_8B, 2, [1, 8, 64, 256], TOKENS_PER_SEQ, H200)] \
        == [(1, 1, ""), (8, 8, ""), (64, 64, ""), (256, 256, "")]
    (plan,) = plan_batches(LLAMA_8B, 2, [1], TOKENS_PER_SEQ, 16 * GiB)
    assert plan.batch is None and "nothing fits" in plan.note
    # two asked batches that size down to the same one run once
    assert [p.batch for p in plan_batches(LLAMA_8B, 2, [224, 256], TOKENS_PER_SEQ, H100)] == [192]


def test_sized_down_batches_are_graph_buckets():
    buckets = graph_buckets(512)
    for b in range(1, 300):
        down = graph_bucket_floor(b)
        assert down in buckets and down <= b
        assert all(x <= down or x > b for x in buckets), b


def test_floors_scale_with_the_measured_rates():
    h200, h100 = card(4.3, 790), card(3.0, 780)
    # docs/benchmarks.md session 4: the H200's batch-1 floor 3.553 ms, prefill 18.44 / 77.94 ms
    assert decode_floor_ms(LLAMA_8B, 2, 1, 2048, h200) == pytest.approx(3.553, abs=1e-3)
    assert prefill_floor_ms(LLAMA_8B, 1024, h200) == pytest.approx(18.44, abs=0.01)
    assert prefill_floor_ms(LLAMA_8B, 4096, h200) == pytest.approx(77.94, abs=0.01)
    assert decode_floor_ms(LLAMA_8B, 2, 64, 2048, h100) == pytest.approx(
        decode_floor_ms(LLAMA_8B, 2, 64, 2048, h200) * 4.3 / 3.0)
    assert floors.fraction_of_floor(4.263, 3.553) == pytest.approx(0.8334, abs=1e-4)
    assert floors.fraction_of_floor(None, 3.553) is None
    meta = h100.meta()
    assert meta["hbm_tb_s"] == 3.0 and meta["peak_tflops"] == 780.0 and meta["gpu"] == "test card"


def test_measured_floors_on_cpu_are_positive_and_named():
    f = floors.measure_floors(torch.device("cpu"))
    assert f.device_name == "cpu" and f.copy_bytes_per_s > 0 and f.matmul_flops > 0 and f.total_bytes > 0
    json.dumps(f.meta())


def _wrapped_capture_failure(cause: Exception) -> RuntimeError:
    try:
        try:
            raise cause
        except Exception as e:  # as ModelRunner._capture_graphs wraps it
            raise RuntimeError(f"CUDA graph capture failed, decode ({type(e).__name__}: {e}); "
                               "run with --disable-cuda-graph to run eagerly") from e
    except RuntimeError as wrapped:
        return wrapped


def test_an_oom_is_told_from_a_capture_failure():
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert classify_failure(oom) == "OOM"
    captured_oom = _wrapped_capture_failure(torch.OutOfMemoryError("Tried to allocate 1.00 GiB"))
    assert classify_failure(captured_oom) == "OOM"
    assert failure_note(captured_oom).startswith("OOM during CUDA graph capture: OutOfMemoryError")
    assert classify_failure(_wrapped_capture_failure(ValueError("bad stream"))) == "capture failed"
    assert classify_failure(RuntimeError("CUDA error: out of memory")) == "OOM"
    assert classify_failure(RuntimeError("triton: cudaErrorMemoryAllocation")) == "OOM"
    assert classify_failure(ValueError("--ctx: too long")) == "error"


def test_an_oom_is_a_row_of_its_own_and_other_errors_are_errors():
    report = Report(None)
    with guard(report, "m pdserve+graph decode bs=256", ("m", "pdserve+graph", "decode bs=256")):
        raise torch.OutOfMemoryError("CUDA out of memory")
    with guard(report, "m pdserve eager decode bs=8", ("m", "pdserve eager", "decode bs=8")):
        raise ValueError("wrong shape")
    oom, err = report.rows
    assert oom.ms is None and oom.note.startswith("OOM") and oom.case == "decode bs=256"
    assert err.note.startswith("error: ValueError")
    assert len(report.ooms) == 1 and len(report.errors) == 1


def test_a_section_over_its_time_is_a_timeout_row_and_later_sections_still_run():
    report, budget = Report(None), Budget(30)
    ran = []

    def slow():
        for b in (1, 8):  # the row guard must not swallow the section's deadline
            with guard(report, f"row {b}", ("m", "impl", f"decode bs={b}")):
                time.sleep(5)
            ran.append(b)

    t0 = time.monotonic()
    section(report, budget, "m pdserve", 1 / 30, slow)  # 1 s of 30
    assert time.monotonic() - t0 < 3 and ran == []
    (row,) = report.rows
    assert row.note.startswith("TIMEOUT") and row.ms is None
    section(report, budget, "m transformers", 0.5, lambda: ran.append("next"))
    assert ran == ["next"]


def test_budget_shares_and_skips():
    now = [0.0]
    budget = Budget(100, clock=lambda: now[0])
    assert budget.section_s(0.35) == 35
    now[0] = 80
    assert budget.section_s(0.35) == 20          # never more than is left
    assert budget.section_s(0.5, at_least=60) == 0  # the compile section needs 60 s: skipped
    report = Report(None)
    now[0] = 100
    section(report, budget, "m transformers", 0.2, lambda: pytest.fail("ran past the budget"))
    assert "m transformers" in report.meta["skipped"][0]


def test_pd_sizing_shares_the_card_and_refuses_what_cannot_fit():
    weights, kv = resident_weight_bytes(LLAMA_8B, 2), kv_bytes_per_token(LLAMA_8B, 2)
    assert pd_sizing(weights, kv, 8192, 4864, 4, H200) == (0.225, 8192, "")
    assert pd_sizing(weights, kv, 8192, 4864, 2, H100) == (0.45, 8192, "")
    frac, ctx, note = pd_sizing(weights, kv, 131072, 4864, 2, H100)
    assert frac == 0.45 and 4864 <= ctx < 131072 and ctx % 1024 == 0 and note.startswith("CONTEXT 131072 ->")
    assert 2 * ctx * kv <= 0.45 * H100 - weights - floors.RESERVE_BYTES
    with pytest.raises(ValueError, match=r"^CONTEXT: 4 node\(s\) on a 79 GiB card"):
        pd_sizing(weights, kv, 8192, 4864, 4, H100)   # four 8B nodes on one H100


def _prompt(equal: bool, agree: float = 1.0, ties: int = 0) -> dict:
    return {"prompt_len": 100, "greedy_equal": equal, "first_diff": None if equal else 5,
            "hf_margin_at_first_diff": None if equal else 0.7, "rel_diff": 0.01, "top1_agree": agree,
            "positions": 32, "ties": [{}] * ties, "disagreements": []}


def _result(dtype: str, prompts: list[dict]) -> dict:
    return {"model": "m", "dtype": dtype, "capture_error": None, "graph_vs_eager_tokens_equal": True,
            "prompts": prompts}


def test_parity_verdict_requires_fp32_greedy_equality():
    assert verdict(_result("float32", [_prompt(True)] * 3), 0.1) == []
    problems = verdict(_result("float32", [_prompt(True), _prompt(False)]), 0.1)
    assert len(problems) == 1 and "greedy token 5 differs" in problems[0]
    bf16 = _result("bfloat16", [_prompt(False, agree=0.9375, ties=1)] * 3)  # bf16 greedy may drift: not judged
    assert verdict(bf16, 0.1) == []
    bf16["fp32"] = _result("float32", [_prompt(True), _prompt(True), _prompt(False)])
    assert [p.split(":")[0] for p in verdict(bf16, 0.1)] == ["fp32"]
    line = top1_summary(bf16)
    assert "bfloat16 top-1 agreement with transformers: 90/96 = 93.8% (3 of the misses near-ties)" in line
    assert line.endswith("fp32 greedy tokens equal to transformers: 2/3 prompts")
