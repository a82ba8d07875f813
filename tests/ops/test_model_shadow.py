"""Issue 14: a file or folder named like a built-in model in the working directory does not shadow it,
and errors about the model's own tokenizer name the flag the user gave (--model-path)."""

from __future__ import annotations

import os

import pytest

from pdserve.config import ModelConfig, RouterConfig
from pdserve.model_pull import resolve_model_path, smollm2_path
from pdserve.tokenizer import load_tokenizer


@pytest.fixture
def shadowed_cwd(tmp_path, monkeypatch, smollm2_path):
    (tmp_path / "smollm2").mkdir()                      # an unrelated folder that happens to be called smollm2
    (tmp_path / "smollm2" / "notes.txt").write_text("not a model")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_builtin_name_wins_over_a_folder_of_that_name(shadowed_cwd):
    assert resolve_model_path("smollm2") == smollm2_path(None)
    assert os.path.isfile(resolve_model_path("smollm2"))


def test_router_starts_with_default_model_beside_a_smollm2_folder(shadowed_cwd):
    from pdserve.router.server import build_router

    router = build_router(RouterConfig(registry_url=None), ModelConfig())   # what `pdserve up` / `router` do
    assert router.tokenizer.encode("Paris")                                # the real SmolLM2 tokenizer
    assert router.served_model_name == "smollm2"


def test_explicit_path_to_that_folder_is_used_and_errors_name_model_path(shadowed_cwd):
    path = resolve_model_path("./smollm2")
    assert os.path.samefile(path, shadowed_cwd / "smollm2")
    with pytest.raises(ValueError, match=r"^--model-path: no tokenizer.json in"):
        load_tokenizer(path)
    with pytest.raises(ValueError, match=r"^--tokenizer-path: no tokenizer.json in"):
        load_tokenizer(smollm2_path(None), tokenizer_path=str(shadowed_cwd / "smollm2"))
