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
