"""``ModelArch``: the few numbers a decoder model is built from, read from an HF config dict.

One frozen dataclass for every supported family (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5,
Qwen3). It accepts both spellings of RoPE settings: transformers 4's ``rope_theta`` +
``rope_scaling`` and transformers 5's ``rope_parameters``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# HF ``architectures`` name -> the family traits that differ (everything else is Llama).
SUPPORTED_ARCHITECTURES: dict[str, dict[str, bool]] = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"attention_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True},
}

MODEL_TYPE_TO_ARCHITECTURE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

ROPE_TYPES = ("default", "llama3", "linear", "freq_factors")  # freq_factors: GGUF rope_freqs


@dataclass(frozen=True)
class ModelArch:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None  # sorted (key, value) pairs, hashable
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads {self.num_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_kv_heads}")
        rope_type = self.rope_type
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"--model-path: RoPE scaling type {rope_type!r} is not supported "
                             f"(supported: {', '.join(ROPE_TYPES)})")

    @property
    def rope_type(self) -> str:
        return str(self.rope_scaling_dict.get("rope_type") or self.rope_scaling_dict.get("type") or "default")

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> "ModelArch":
        architecture = _architecture(d)
        traits = SUPPORTED_ARCHITECTURES[architecture]
        num_heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        rope_theta, scaling = _rope(d)
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=architecture,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(d.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", traits.get("attention_bias", False))),
            qk_norm=traits.get("qk_norm", False),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _architecture(d: dict[str, Any]) -> str:
    names = d.get("architectures") or []
    if not names and d.get("model_type") in MODEL_TYPE_TO_ARCHITECTURE:
        names = [MODEL_TYPE_TO_ARCHITECTURE[d["model_type"]]]
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    shown = ", ".join(names) or f"model_type={d.get('model_type')!r}"
    raise ValueError(f"--model-path: unsupported architecture {shown} "
                     f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")


def _rope(d: dict[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(rope_theta, scaling) from either ``rope_parameters`` (v5) or ``rope_theta``/``rope_scaling``."""
    params = dict(d.get("rope_parameters") or {})
    legacy = dict(d.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", d.get("rope_theta", 10000.0)))
    scaling = {**legacy, **params}
    kind = scaling.get("rope_type") or scaling.get("type")
    if not kind or kind == "default":
        return theta, None
    return theta, tuple(sorted((k, _hashable(v)) for k, v in scaling.items()))


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v
