"""``load_model``: a ModelConfig -> a ready model, its tokenizer and identity.

Formats: GGUF (dequantized to --dtype, config and tokenizer from metadata), HF folders
(config.json + safetensors, sharded or not; pytorch_model*.bin as a fallback) and ``dummy``
(random weights from config.json, seeded by --random-seed). Every error a user can cause is a
one-line ``ValueError`` naming the flag to fix.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from pdserve.config import ModelConfig
from pdserve.models import get_model_class
from pdserve.models.arch import ModelArch
from pdserve.tokenizer import Tokenizer, load_tokenizer

__all__ = ["LoadedModel", "load_model", "resolve_dtype", "resolve_device"]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    arch: ModelArch
    tokenizer: Tokenizer | None  # None for a dummy/HF folder without tokenizer files
    dtype: torch.dtype
    fingerprint: str             # equal on two nodes <=> same architecture, weights and dtype
    context_length: int
    eos_token_ids: list[int]
    model_path: str = ""         # the resolved local path
    load_seconds: float = 0.0


def resolve_dtype(model_cfg: ModelConfig, device: torch.device | str) -> torch.dtype:
    if model_cfg.dtype != "auto":
        return getattr(torch, model_cfg.dtype)
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def resolve_device(model_cfg: ModelConfig) -> torch.device:
    if model_cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if model_cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested but no GPU is available")
    return torch.device(model_cfg.device)


def load_model(model_cfg: ModelConfig, device: torch.device | str, *, tp_rank: int = 0, tp_size: int = 1,
               tp_group=None, parallel=None) -> LoadedModel:
    """``parallel`` (``runtime.parallel.ParallelGroups``) overrides ``tp_*``: this rank's shard of
    a node's tensor-parallel / DP-attention layout."""
    from pdserve.model_pull import resolve_model_path

    start = time.perf_counter()
    device = torch.device(device)
    dtype = resolve_dtype(model_cfg, device)
    path = resolve_model_path(model_cfg.model_path, model_cfg.download_dir, model_cfg.revision)
    gguf_path = _gguf_file(path, model_cfg.load_format)
    if gguf_path is not None:
        config, weights, identity = _gguf_source(gguf_path, model_cfg, dtype, device)
    else:
        config, weights, identity = _hf_source(path, model_cfg, dtype, device)
    arch = ModelArch.from_hf_config(config)
    context_length = model_cfg.context_length or arch.max_position_embeddings
    extra = {}
    if parallel is not None:
        tp = parallel.mlp_tp
        tp_rank, tp_size, tp_group = tp.rank, tp.size, tp.group
        extra = {"attn_tp": parallel.attn_tp, "dp": parallel.dp}
    model = get_model_class(arch.architecture)(arch, dtype, device, tp_rank, tp_size, tp_group,
                                               max_positions=context_length, **extra)
    model.load_weights(weights)
    if model_cfg.quantization:
        model.quantize_(model_cfg.quantization)
    model.eval()
    tokenizer = _tokenizer(gguf_path or path, model_cfg)
    eos = list(tokenizer.eos_token_ids) if tokenizer and tokenizer.eos_token_ids else list(arch.eos_token_ids)
    return LoadedModel(model=model, arch=arch, tokenizer=tokenizer, dtype=dtype,
                       fingerprint=fingerprint(arch, identity, dtype, model_cfg.quantization),
                       context_length=context_length,
                       eos_token_ids=eos, model_path=gguf_path or path,
                       load_seconds=time.perf_counter() - start)


def _gguf_file(path: str, load_format: str) -> str | None:
    """The .gguf file to read, or None for an HF folder."""
    if os.path.isfile(path):
        if path.endswith(".gguf") or load_format == "gguf":
            return path
        raise ValueError(f"--model-path: {path} is a file but not a .gguf; pass a folder or a GGUF file")
    if os.path.isfile(os.path.join(path, "config.json")) and load_format != "gguf":
        return None
    found = sorted(glob.glob(os.path.join(path, "*.gguf")))
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ValueError(f"--model-path: {path} holds several .gguf files; name one")
    raise ValueError(f"--model-path: {path} has neither config.json nor a .gguf file")


def _gguf_source(path: str, model_cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
    from pdserve.loader.dummy import dummy_weights
    from pdserve.loader.gguf_file import file_identity, gguf_hf_config, gguf_tensors, open_gguf

    if model_cfg.load_format not in ("auto", "gguf", "dummy"):
        raise ValueError(f"--load-format {model_cfg.load_format}: {path} is a GGUF file")
    reader = open_gguf(path)
    config = gguf_hf_config(reader)
    if model_cfg.load_format == "dummy":
        arch = ModelArch.from_hf_config(config)
        return config, dummy_weights(arch, model_cfg.random_seed, dtype, device), [f"dummy:{model_cfg.random_seed}"]
    return config, gguf_tensors(reader, config, dtype), [file_identity(path)]


def _hf_source(path: str, model_cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
    from pdserve.loader.dummy import dummy_weights
    from pdserve.loader.hf_files import files_identity, iter_weights, read_config, weight_files

    config = read_config(path)
    if model_cfg.load_format == "dummy":
        arch = ModelArch.from_hf_config(config)
        return config, dummy_weights(arch, model_cfg.random_seed, dtype, device), [f"dummy:{model_cfg.random_seed}"]
    kind, files = weight_files(path, model_cfg.load_format)
    return config, iter_weights(kind, files, dtype), files_identity(files)


def _tokenizer(path: str, model_cfg: ModelConfig) -> Tokenizer | None:
    if model_cfg.tokenizer_path is None and os.path.isdir(path) and not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return None  # e.g. a bare config.json for --load-format dummy: nodes are token-in/token-out
    return load_tokenizer(path, model_cfg.tokenizer_path, cache_dir=model_cfg.download_dir)


def fingerprint(arch: ModelArch, identity: list[str], dtype: torch.dtype, quantization: str | None = None) -> str:
    """Same on every TP rank and TP size: built from the full (unsharded) HF shapes."""
    from pdserve.loader.dummy import hf_weight_shapes

    shapes = hf_weight_shapes(arch)
    fields = {"arch": dataclasses.asdict(arch), "shapes": shapes, "weights": identity, "dtype": str(dtype)}
    if quantization:  # absent when off, so unquantized fingerprints are unchanged
        fields["quantization"] = quantization
    blob = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def iter_checkpoint(path: str, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named tensors of a GGUF file or HF folder (for tools and tests)."""
    gguf_path = _gguf_file(path, "auto")
    if gguf_path is not None:
        from pdserve.loader.gguf_file import gguf_hf_config, gguf_tensors, open_gguf
        reader = open_gguf(gguf_path)
        yield from gguf_tensors(reader, gguf_hf_config(reader), dtype)
        return
    from pdserve.loader.hf_files import iter_weights, weight_files
    yield from iter_weights(*weight_files(path, "auto"), dtype)
