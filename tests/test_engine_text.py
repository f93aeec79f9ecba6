"""The streaming text pipeline: UTF-8 safety, <think> splitting, stop sequences, at every split point."""

from __future__ import annotations

import itertools

import pytest

from engine.text import StopMatcher, TextPipeline, ThinkSplitter


def run_pipeline(chunks: list[bytes], stops=("\n\n",), start_in_thinking=False):
    p = TextPipeline(stops, start_in_thinking=start_in_thinking)
    emitted: list[tuple[str, str]] = []
    for c in chunks:
        emitted += p.feed(c)
        if p.stopped:
            break
    if not p.stopped:
        emitted += p.finish()
    content = "".join(t for ch, t in emitted if ch == "content")
    thinking = "".join(t for ch, t in emitted if ch == "thinking")
    assert content == p.content
    assert thinking == p.thinking
    assert all(t for _, t in emitted), "no empty pieces"
    return p, content, thinking


def splits(data: bytes, parts: int):
    """Every way to cut ``data`` into ``parts`` pieces (empty pieces allowed)."""
    for cuts in itertools.combinations_with_replacement(range(len(data) + 1), parts - 1):
        bounds = (0, *cuts, len(data))
        yield [data[a:b] for a, b in zip(bounds, bounds[1:])]


THINK_TEXT = "<think>let me see\nok</think>\n\nThe answer is 42.".encode()


@pytest.mark.parametrize("parts", [2, 3])
def test_think_split_at_every_point(parts):
    for chunks in splits(THINK_TEXT, parts):
        p, content, thinking = run_pipeline(chunks)
        assert thinking == "let me see\nok", chunks
        assert content == "The answer is 42.", chunks
        assert p.stopped is None


def test_think_started_by_template():
    _, content, thinking = run_pipeline([b"reasoning", b"</thi", b"nk>Hello"], start_in_thinking=True)
    assert (thinking, content) == ("reasoning", "Hello")


def test_unclosed_think_is_thinking():
    _, content, thinking = run_pipeline([b"<think>still going"])
    assert (thinking, content) == ("still going", "")


def test_partial_tag_that_is_not_a_tag_is_released():
    _, content, _ = run_pipeline([b"a <thin", b"g> b"])
    assert content == "a <thing> b"
    _, content, _ = run_pipeline([b"ends with <thi"])
    assert content == "ends with <thi"


def test_utf8_split_across_tokens_at_every_point():
    text = "héllo wörld — 你好 👋"
    data = text.encode()
    for chunks in splits(data, 3):
        _, content, _ = run_pipeline(chunks, stops=())
        assert content == text


def test_invalid_utf8_is_replaced_not_raised():
    _, content, _ = run_pipeline([b"ok \xff\xfe done"], stops=())
    assert content == "ok \ufffd\ufffd done"


@pytest.mark.parametrize("parts", [2, 3])
def test_stop_sequence_split_at_every_point(parts):
    data = b"First paragraph.\n\nSecond paragraph."
    for chunks in splits(data, parts):
        p, content, _ = run_pipeline(chunks)
        assert content == "First paragraph.", chunks
        assert p.stopped == "\n\n"


def test_stop_prefix_held_then_released():
    m = StopMatcher(["\n\n", "END"])
    assert m.feed("abc\n") == "abc"
    assert m.feed("x") == "\nx"
    assert m.feed("EN") == ""
    assert m.flush() == "EN"
    assert m.stopped is None


def test_earliest_stop_wins():
    m = StopMatcher(["world", "lo w"])
    assert m.feed("hello world") == "hel"
    assert m.stopped == "lo w"


def test_stops_do_not_apply_to_thinking():
    _, content, thinking = run_pipeline([b"<think>a\n\nb</think>c\n\nd"])
    assert thinking == "a\n\nb"
    assert content == "c"


def test_multi_stop_and_multibyte_stop():
    data = "answer: 5 ✓ more".encode()
    for chunks in splits(data, 3):
        p, content, _ = run_pipeline(chunks, stops=("✓", "zzz"))
        assert content == "answer: 5 "
        assert p.stopped == "✓"


def test_think_splitter_alone():
    s = ThinkSplitter()
    out = s.feed("x<th") + s.feed("ink>y</think>  z") + s.flush()
    assert out == [("content", "x"), ("thinking", "y"), ("content", "z")]
