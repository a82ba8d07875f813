"""Benchmark prompts: random token ids, a ShareGPT-shaped synthetic length mix, or JSONL prompts.

Every generator is seeded and returns ``BenchRequest``s; the same seed gives the same prompts, so
a PD run and a colocated run see identical work. Lengths come from ``seed`` alone and token
contents from (``seed``, ``content_seed``): the sweep gives each point its own content_seed, so
every point has the same length mix but fresh prompts (no prefix-cache hits from the point
before, which would flatter TTFT).

Random token ids are drawn from ``[SAFE_ID_LOW, 0.9 * vocab_size)``: special tokens sit at the
very start of a vocabulary (SmolLM2: 0..16, Llama-2: 0..2) or at its end (Llama-3: 128000+,
Qwen2.5: 151643+ with padding beyond), so that band avoids them for every model we serve.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAFE_ID_LOW = 100
SAFE_ID_HIGH_FRACTION = 0.9

# ShareGPT-like: lognormal lengths (long right tail), median = the given length.
SHAREGPT_INPUT_SIGMA = 1.0
SHAREGPT_OUTPUT_SIGMA = 0.7
SHAREGPT_MAX_FACTOR = 8  # clip at 8x the median

# Short common words: about one BPE token each (plus the space) in Llama/Qwen/SmolLM tokenizers.
_WORDS = ("the of and to in is was for on are as with his they at be this from have or by one had "
          "not but what all were when we there can an your which their said if do will each about "
          "how up out them then she many some so these would other into has more her two like him "
          "see time could no make than first been its who now people my made over did down only "
          "way find use may water long little very after words called just where most know").split()


@dataclass(frozen=True)
class BenchRequest:
    """One prompt to send: token ids (completions) or text, with its length and output budget."""
    prompt: list[int] | str
    prompt_len: int          # tokens (exact for ids, approximate for text)
    output_len: int          # max_tokens; with ignore_eos exactly this many are generated


def _lengths(rng: np.random.Generator, n: int, length: int, range_ratio: float) -> np.ndarray:
    """Uniform in [length * (1 - r), length * (1 + r)] (vLLM's range ratio), at least 1."""
    if range_ratio <= 0:
        return np.full(n, max(1, length), dtype=np.int64)
    low = max(1, int(math.floor(length * (1 - range_ratio))))
    high = max(low, int(math.ceil(length * (1 + range_ratio))))
    return rng.integers(low, high + 1, size=n)


def _safe_id_range(vocab_size: int) -> tuple[int, int]:
    high = int(vocab_size * SAFE_ID_HIGH_FRACTION)
    if high <= SAFE_ID_LOW + 1:
        raise ValueError(f"--vocab-size: {vocab_size} is too small for random prompts")
    return SAFE_ID_LOW, high


def _token_prompts(rng: np.random.Generator, input_lens: np.ndarray, output_lens: np.ndarray,
                   vocab_size: int) -> list[BenchRequest]:
    low, high = _safe_id_range(vocab_size)
    out = []
    for n_in, n_out in zip(input_lens.tolist(), output_lens.tolist()):
        ids = rng.integers(low, high, size=n_in).tolist()
        out.append(BenchRequest(prompt=ids, prompt_len=n_in, output_len=int(n_out)))
    return out


def _text_prompts(rng: np.random.Generator, input_lens: np.ndarray,
                  output_lens: np.ndarray) -> list[BenchRequest]:
    """Word salad of about ``n`` tokens each (for the chat endpoint, which takes text only)."""
    out = []
    for n_in, n_out in zip(input_lens.tolist(), output_lens.tolist()):
        words = rng.choice(len(_WORDS), size=n_in)
        text = " ".join(_WORDS[i] for i in words)
        out.append(BenchRequest(prompt=text, prompt_len=n_in, output_len=int(n_out)))
    return out


def _content_rng(seed: int, content_seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, content_seed, 0x5EED])


def random_requests(num: int, input_len: int, output_len: int, *, range_ratio: float = 0.0,
                    vocab_size: int = 32000, seed: int = 0, content_seed: int = 0,
                    as_text: bool = False) -> list[BenchRequest]:
    """``num`` prompts of random token ids (or word salad) with fixed or ranged lengths."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio: must be in [0, 1), got {range_ratio}")
    rng = np.random.default_rng(seed)
    input_lens = _lengths(rng, num, input_len, range_ratio)
    output_lens = _lengths(rng, num, output_len, range_ratio)
    content = _content_rng(seed, content_seed)
    if as_text:
        return _text_prompts(content, input_lens, output_lens)
    return _token_prompts(content, input_lens, output_lens, vocab_size)


def _lognormal_lengths(rng: np.random.Generator, n: int, median: int, sigma: float) -> np.ndarray:
    raw = rng.lognormal(mean=math.log(max(1, median)), sigma=sigma, size=n)
    return np.clip(np.rint(raw), 4, max(4, SHAREGPT_MAX_FACTOR * median)).astype(np.int64)


def sharegpt_synthetic_requests(num: int, input_len: int, output_len: int, *, vocab_size: int = 32000,
                                seed: int = 0, content_seed: int = 0,
                                as_text: bool = False) -> list[BenchRequest]:
    """ShareGPT-shaped mix: lognormal input/output lengths (median = the given lengths, long tail).

    The real ShareGPT set cannot be downloaded here; its length histogram is roughly lognormal
    (many short turns, a tail of long ones), which is what stresses prefill/decode interference.
    """
    rng = np.random.default_rng(seed)
    input_lens = _lognormal_lengths(rng, num, input_len, SHAREGPT_INPUT_SIGMA)
    output_lens = _lognormal_lengths(rng, num, output_len, SHAREGPT_OUTPUT_SIGMA)
    content = _content_rng(seed, content_seed)
    if as_text:
        return _text_prompts(content, input_lens, output_lens)
    return _token_prompts(content, input_lens, output_lens, vocab_size)


def _jsonl_request(line: str, lineno: int, default_output_len: int) -> BenchRequest:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"--dataset-path: line {lineno}: not JSON ({e})") from e
    if not isinstance(rec, dict) or "prompt" not in rec:
        raise ValueError(f"--dataset-path: line {lineno}: needs a 'prompt' (text or token ids)")
    prompt = rec["prompt"]
    if isinstance(prompt, list):
        if not all(isinstance(t, int) for t in prompt):
            raise ValueError(f"--dataset-path: line {lineno}: a list prompt must hold token ids")
        prompt_len = len(prompt)
    elif isinstance(prompt, str):
        prompt_len = int(rec.get("prompt_len") or max(1, round(len(prompt) / 4)))  # ~4 chars/token
    else:
        raise ValueError(f"--dataset-path: line {lineno}: 'prompt' must be a string or a list of ids")
    output_len = int(rec.get("output_len") or rec.get("max_tokens") or default_output_len)
    return BenchRequest(prompt=prompt, prompt_len=prompt_len, output_len=output_len)


def jsonl_requests(path: str | Path, num: int, default_output_len: int, *,
                   seed: int = 0) -> list[BenchRequest]:
    """Prompts from a JSONL file: one ``{"prompt": str | [ids], "output_len"?: int}`` a line.

    Takes the first ``num`` records; fewer records than ``num`` are cycled (seeded shuffle).
    """
    lines = [(i + 1, ln) for i, ln in enumerate(Path(path).read_text().splitlines()) if ln.strip()]
    if not lines:
        raise ValueError(f"--dataset-path: {path} holds no prompts")
    reqs = [_jsonl_request(ln, i, default_output_len) for i, ln in lines]
    if len(reqs) >= num:
        return reqs[:num]
    rng = np.random.default_rng(seed)
    extra = [reqs[i] for i in rng.integers(0, len(reqs), size=num - len(reqs))]
    return reqs + extra
