"""Batch-1 steps through the fused GEMVs (kernels/gemv.py via ``LlamaForCausalLM.enable_fused_gemv``)
give the unfused model's tokens and logprobs, for Llama, Qwen2 (q/k/v bias) and Qwen3 (q/k norm)
layers; on CPU the kernels run through the Triton interpreter."""

from __future__ import annotations

import json

import pytest

BASE = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32", "tie_word_embeddings": False}
ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _runner(tmp_path, model_type: str):
    from pdserve.config import engine_config
    from pdserve.runtime.model_runner import ModelRunner

    folder = tmp_path / model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**BASE, "architectures": [ARCHS[model_type]],
                                                    "model_type": model_type}))
    cfg = engine_config(model_path=str(folder), load_format="dummy", dtype="float32", device="cpu",
                        attention_backend="triton", max_total_tokens=256, page_size=4, context_length=128,
                        disable_radix_cache=True)
    return ModelRunner(cfg)


def _generate(runner) -> tuple[list[int], list[float]]:
    from pdserve.runtime.engine import EngineCore
    from pdserve.sampling_params import SamplingParams

    core = EngineCore(runner.cfg, runner, overlap=False)
    req = core.add_request("r0", list(range(3, 14)),
                           SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True, logprobs=True))
    while core.has_work:
        core.step()
    core.drain()
    assert core.kv.num_free == core.kv.num_pages
    return req.output_ids, req.logprobs


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_fused_gemv_matches_unfused_model(tmp_path, model_type, monkeypatch):
    import pdserve.kernels.gemv as gemv

    runner = _runner(tmp_path, model_type)
    assert not runner.fused_gemv  # CPU: off unless asked
    expected_ids, expected_lp = _generate(runner)
    calls = []
    real = gemv.fused_gemv
    monkeypatch.setattr(gemv, "fused_gemv", lambda *a, **k: calls.append(k) or real(*a, **k))
    assert runner.model.enable_fused_gemv() is None
    got_ids, got_lp = _generate(runner)
    assert got_ids == expected_ids
    assert got_lp == pytest.approx(expected_lp, abs=1e-4)
    # 5 batch-1 decode steps x 2 layers x 4 GEMVs (the 11-token prefill is not batch-1), and the
    # LM head for each of the 6 tokens (one row of logits after the prefill too)
    assert len(calls) == 5 * 2 * 4 + 6
    assert sum("residual" in k for k in calls) == 5 * 2 * 2 and sum(k.get("silu_out", False) for k in calls) == 5 * 2


def test_fused_gemv_refuses_int8_and_honours_the_flag(tmp_path):
    from pdserve.config import engine_config

    runner = _runner(tmp_path, "llama")
    runner.model.quantize_("w8a8_int8")
    assert runner.model.enable_fused_gemv() == "int8 weights" and not runner.model.model.fused_gemv
    assert engine_config(model_path="x", disable_fused_gemv=True).kernel.disable_fused_gemv


def test_fused_gemv_refuses_tensor_parallel():
    """Under TP the O and down outputs are partial sums: the residual add must follow the all-reduce."""
    import torch

    from pdserve.models.arch import ModelArch
    from pdserve.models.llama import LlamaForCausalLM

    arch = ModelArch.from_hf_config({**BASE, "architectures": ["LlamaForCausalLM"]})
    model = LlamaForCausalLM(arch, torch.float32, "cpu", tp_rank=0, tp_size=2)
    assert model.enable_fused_gemv().startswith("tensor parallel") and not model.model.fused_gemv


def test_triton_rotary_paths_match_the_torch_rotation(tmp_path, monkeypatch):
    """With the cos/sin cache the GPU builds, a Qwen3 model (q/k norm: the path that hands rotary to
    the attention backend) rotates in ``rope_store_kv`` for the prefill and inside decode attention
    for each decode step (``DecodeRope``); tokens and logprobs equal the torch rotation's."""
    import torch

    runner = _runner(tmp_path, "qwen3")
    expected_ids, expected_lp = _generate(runner)
    import pdserve.kernels.backend as backend

    fused = []
    real = backend.decode_attention
    monkeypatch.setattr(backend, "decode_attention", lambda *a, **k: fused.append(k.get("rope")) or real(*a, **k))
    rotary = runner.model.model.rotary_emb
    rotary.cos_sin = torch.cat([rotary.cos, rotary.sin], dim=-1).contiguous()
    got_ids, got_lp = _generate(runner)
    assert len(fused) == 5 * 2 and all(r is not None for r in fused)  # 5 decode steps x 2 layers
    assert got_ids == expected_ids
    assert got_lp == pytest.approx(expected_lp, abs=1e-4)
