"""``--quantization w8a8_int8`` on the real SmolLM2 GGUF against the fp32 engine (CPU).

What int8 may change: SmolLM2-135M has activation outliers, and per-token int8 moves its
first-token logits by up to ~1 nat in the top-1 - top-2 margin (measured over 16 chat prompts:
|change| <= 0.98, 12 of 16 first tokens equal; every flip was at an fp32 margin below 0.31).
So the test asks for the same first token wherever fp32 is not close to a tie (margin > 1.5 nats),
for most first tokens overall, and for answers that still carry the facts fp32 gives. (Not every
fact survives: int8 answers the boiling point of water with "1.83 degrees Celsius" in this batch,
where fp32 says 100 °C; docs/benchmarks.md records it.)
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

QUESTIONS = ["Who wrote Hamlet?", "Explain gravity in one sentence.", "What is 12 times 12?",
             "Name a color of the rainbow.", "How do I sort a list in Python?", "Why is the sky blue?",
             "Tell me a joke about cats.", "What is the boiling point of water?", "Who painted the Mona Lisa?",
             "How many legs does a spider have?", "What is photosynthesis?", "Write a haiku about the sea."]
FACTS = {"Who painted the Mona Lisa?": "Leonardo", "Who wrote Hamlet?": "Shakespeare"}
CLEAR_MARGIN = 1.5  # nats between fp32's top-1 and top-2 first tokens
PARAMS = {"temperature": 0, "max_new_tokens": 16, "logprobs": True, "top_logprobs": 2}


def _answers(smollm2_path, **flags) -> list[dict]:
    from pdserve import Engine
    engine = Engine(model_path=smollm2_path, max_total_tokens=8192, **flags)
    prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    return engine.generate(prompts, PARAMS)


@pytest.fixture(scope="module")
def fp32(smollm2_path):
    return _answers(smollm2_path)


@pytest.fixture(scope="module")
def int8(smollm2_path):
    return _answers(smollm2_path, quantization="w8a8_int8")


def test_first_tokens_agree_unless_fp32_is_near_a_tie(fp32, int8):
    same = [f["token_ids"][0] == q["token_ids"][0] for f, q in zip(fp32, int8)]
    for question, f, ok in zip(QUESTIONS, fp32, same):
        (_, top1), (_, top2) = f["top_logprobs"][0]
        if top1 - top2 > CLEAR_MARGIN:
            assert ok, f"{question!r}: fp32 margin {top1 - top2:.2f} nats, int8 chose another first token"
    assert sum(same) >= len(QUESTIONS) * 2 // 3, same


def test_quantized_answers_carry_the_facts(int8):
    by_question = dict(zip(QUESTIONS, int8))
    for question, fact in FACTS.items():
        assert fact in by_question[question]["text"], (question, by_question[question]["text"])
    assert all(len(a["token_ids"]) > 0 and a["text"].strip() for a in int8)
