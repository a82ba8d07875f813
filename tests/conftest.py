"""Fixtures shared by every test level."""

from __future__ import annotations

import os

import pytest

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Triton kernels run through the interpreter on CPU (tests/kernels). TRITON_INTERPRET must be set
# before anything imports triton -- transformers does, during collection of other test folders.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The real SmolLM2-135M-Instruct GGUF (fetched by `pdserve model pull smollm2` on first use)."""
    from pdserve.model_pull import resolve_model_path
    path = resolve_model_path("smollm2", None)
    assert os.path.isfile(path), path
    return path


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' own implementation of the same GGUF, fp32 on CPU: the parity oracle."""
    import torch
    from transformers import AutoModelForCausalLM
    folder, name = os.path.split(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval()


# -- the parity cases: prompts of 5 to 1,200 real-text tokens and transformers' greedy answers --

from tests.parity_cases import PARITY_LENGTHS, PARITY_NEW_TOKENS, PARITY_TEXT  # noqa: E402


@pytest.fixture(scope="session")
def parity_prompts(smollm2_path) -> list[list[int]]:
    from pdserve.tokenizer import load_tokenizer
    ids = load_tokenizer(smollm2_path).encode(PARITY_TEXT * 40)
    prompts = [ids[(i * 37) % 200:(i * 37) % 200 + n] for i, n in enumerate(PARITY_LENGTHS)]
    assert [len(p) for p in prompts] == PARITY_LENGTHS
    return prompts


@pytest.fixture(scope="session")
def parity_expected(hf_smollm2, parity_prompts) -> list[tuple[list[int], list[float]]]:
    """(greedy tokens, their logprobs) from transformers for each parity prompt."""
    import torch
    results = []
    for p in parity_prompts:
        with torch.no_grad():
            out = hf_smollm2.generate(torch.tensor([p]), max_new_tokens=PARITY_NEW_TOKENS, do_sample=False,
                                      output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        tokens = out.sequences[0, len(p):].tolist()
        lps = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, tokens)]
        results.append((tokens, lps))
    return results
