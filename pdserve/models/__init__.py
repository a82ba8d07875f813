"""Model classes, looked up by the HF ``architectures`` name of a checkpoint."""

from __future__ import annotations

from pdserve.models.arch import SUPPORTED_ARCHITECTURES, ModelArch

__all__ = ["ModelArch", "get_model_class", "MODEL_REGISTRY"]


def _llama():
    from pdserve.models.llama import LlamaForCausalLM
    return LlamaForCausalLM


# HF architectures name -> factory of the class implementing it (imported lazily).
MODEL_REGISTRY = {name: _llama for name in SUPPORTED_ARCHITECTURES}


def get_model_class(architecture: str):
    if architecture not in MODEL_REGISTRY:
        raise ValueError(f"--model-path: unsupported architecture {architecture!r} "
                         f"(supported: {', '.join(MODEL_REGISTRY)})")
    return MODEL_REGISTRY[architecture]()
