"""Stop strings and the choice output: nothing after a stop string ever reaches the client."""

from __future__ import annotations

import pytest

from pdserve.protocol import TokenOut
from pdserve.router.output import ChoiceOutput
from pdserve.router.stop import StopStrings


def test_find_earliest_stop_in_new_text():
    stops = StopStrings(["\nUser:", "END"])
    assert stops.find("hello END and \nUser:", 0) == 6
    assert stops.find("abc", 0) is None
    # A match that ended before the new text was already handled: search starts near new_from.
    assert stops.find("xxEND" + "y" * 10, 12) is None
    assert StopStrings([]).find("anything", 0) is None


@pytest.mark.parametrize("text, releasable", [
    ("hello", 5), ("hello\n", 5), ("hello\nUs", 5), ("hello\nUser", 5), ("hello\nUx", 8), ("EN", 0), ("E", 0),
])
def test_releasable_holds_back_possible_stop_prefixes(text, releasable):
    assert StopStrings(["\nUser:", "END"]).releasable(text) == releasable


def _feed(tokenizer, stops, pieces, finish_last="length", **kw):
    out = ChoiceOutput(0, tokenizer, StopStrings(stops), lambda t: tokenizer.decode([t]), **kw)
    deltas = []
    ids = [tokenizer.encode(p) for p in pieces]
    for i, chunk in enumerate(ids):
        last = i == len(ids) - 1
        deltas.append(out.add(TokenOut(rid="r", token_ids=chunk, finish_reason=finish_last if last else None)))
        if out.is_finished:
            break
    return out, deltas


def test_stop_string_split_across_tokens(tokenizer):
    # Token by token, "Paris" arrives in pieces; no piece of it may be streamed.
    pieces = [tokenizer.decode([t]) for t in tokenizer.encode("The capital is Paris, of course")]
    out, deltas = _feed(tokenizer, ["Paris"], pieces)
    streamed = "".join(d.text for d in deltas)
    assert streamed == "The capital is "
    assert out.finish_reason == "stop" and deltas[-1].finish_reason == "stop"
    assert all("P" not in d.text for d in deltas)
    assert out.num_tokens == len(tokenizer.encode("The capital is Paris"))


def test_held_text_is_released_when_it_turns_out_harmless(tokenizer):
    pieces = [tokenizer.decode([t]) for t in tokenizer.encode("Par is not Paris")]
    out, deltas = _feed(tokenizer, ["Paris"], pieces)
    assert "".join(d.text for d in deltas) == "Par is not "
    # And at the natural end, a held-back prefix is released.
    out, deltas = _feed(tokenizer, ["Paris"], ["It is Pa"])
    assert "".join(d.text for d in deltas) == "It is Pa" and out.finish_reason == "length"


def test_stop_token_is_counted_not_shown(tokenizer):
    out = ChoiceOutput(0, tokenizer, StopStrings([]), str)
    ids = tokenizer.encode("Hi there")
    d1 = out.add(TokenOut(rid="r", token_ids=ids))
    d2 = out.add(TokenOut(rid="r", token_ids=[ids[0]], finish_reason="stop", matched_stop=ids[0]))
    assert d1.text + d2.text == "Hi there" and d2.finish_reason == "stop" and out.num_tokens == len(ids) + 1


def test_multibyte_characters_are_not_split(tokenizer):
    text = "Café 東京 🙂"
    ids = tokenizer.encode(text)
    out = ChoiceOutput(0, tokenizer, StopStrings(["京"]), str)
    streamed = "".join(out.add(TokenOut(rid="r", token_ids=[t])).text for t in ids)
    assert "\ufffd" not in streamed and streamed == "Café 東"[:len(streamed)]
    assert out.text == "Café 東" and out.finish_reason == "stop"
