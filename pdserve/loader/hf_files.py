"""HF checkpoint folders: config.json + safetensors (single or sharded) or pytorch_model*.bin."""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator

import torch


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"--model-path: {folder} has no config.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def weight_files(folder: str, load_format: str) -> tuple[str, list[str]]:
    """("safetensors" | "pt", files). Sharded checkpoints are listed through their index file."""
    if load_format in ("auto", "safetensors"):
        files = _indexed(folder, "model.safetensors.index.json") or sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if files:
            return "safetensors", files
        if load_format == "safetensors":
            raise ValueError(f"--load-format safetensors: no *.safetensors in {folder}")
    files = _indexed(folder, "pytorch_model.bin.index.json") or sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin")))
    if not files:
        raise ValueError(f"--model-path: no weights (*.safetensors or pytorch_model*.bin) in {folder}; "
                         f"use --load-format dummy for random weights")
    return "pt", files


def _indexed(folder: str, index_name: str) -> list[str]:
    path = os.path.join(folder, index_name)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if missing:
        raise ValueError(f"--model-path: {index_name} names missing shard(s): {', '.join(missing)}")
    return [os.path.join(folder, s) for s in shards]


def iter_weights(kind: str, files: list[str], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor in ``dtype``) one tensor at a time (safetensors are memory-mapped)."""
    if kind == "safetensors":
        from safetensors import safe_open

        for path in files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name).to(dtype)
        return
    for path in files:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for name, tensor in state.items():
            yield name, tensor.to(dtype)
        del state


def files_identity(files: list[str]) -> list[str]:
    from pdserve.loader.gguf_file import file_identity

    return [file_identity(path) for path in files]
