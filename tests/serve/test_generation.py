"""How a generated sequence hands out its text (serve/generation.py), with a byte-level tokenizer
whose tokens split UTF-8 characters: never half a character, never a prefix of a stop string that
may still complete, a stop string cut exactly where it starts whichever tokens it spans, and the
deltas joined equal to the whole text."""

from __future__ import annotations

import pytest

from routetune.serve.generation import Event, Sampling, Sequence, Token


class ByteTokenizer:
    """Token i is byte i; decoding replaces an incomplete UTF-8 sequence, as byte-level BPE does."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def _run(text: str, stop=(), max_tokens=100, eos_after: int | None = None) -> tuple[list[Event], Sequence]:
    events: list[Event] = []
    seq = Sequence([1], Sampling(max_tokens, stop=tuple(stop)), None, 0, events.append, ByteTokenizer())
    data = text.encode()
    for i, b in enumerate(data):
        seq.add(Token(b, "", 0.0), eos=False)
        if seq.done:
            break
    if not seq.done:
        seq.add(Token(0, "", 0.0), eos=True)
    return events, seq


def test_a_multi_byte_character_is_never_split_across_deltas():
    events, _ = _run("café ünïcødé 日本")
    assert all("\ufffd" not in e.text for e in events)
    assert "".join(e.text for e in events) == "café ünïcødé 日本"
    assert len([e for e in events if e.text]) > 3  # handed out as it was generated, not at the end


@pytest.mark.parametrize("stop", ["é ü", "ünï", "本", "c"])
def test_a_stop_string_cuts_exactly_where_it_starts(stop):
    text = "café ünïcødé 日本 and more"
    events, seq = _run(text, stop=[stop])
    joined = "".join(e.text for e in events)
    assert joined == text[:text.find(stop)] and events[-1].finish == "stop"
    assert all("\ufffd" not in e.text for e in events)


def test_the_start_of_a_stop_string_is_held_back_until_it_cannot_complete():
    events, _ = _run("abcXYabcXYZdef", stop=["XYZ"])
    assert "".join(e.text for e in events) == "abcXYabc"
    handed = ""
    for e in events[:-1]:
        handed += e.text
        assert not handed.endswith(("X", "XY")), handed  # what may begin the stop string waits


def test_max_tokens_ends_with_length_and_counts_tokens():
    events, seq = _run("abcdef", max_tokens=4)
    assert "".join(e.text for e in events) == "abcd"
    assert events[-1].finish == "length" and events[-1].completion_tokens == 4


def test_end_of_sequence_ends_with_stop_and_is_not_counted():
    events, _ = _run("héllo")
    assert "".join(e.text for e in events) == "héllo"
    assert events[-1].finish == "stop" and events[-1].completion_tokens == len("héllo".encode())
