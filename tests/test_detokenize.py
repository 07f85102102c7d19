"""Streaming detokenisation (issue 21): pieces concatenate exactly to the non-streamed text, multi-byte
characters split across ids, stop strings spanning ids, invalid byte runs, special ids; and constant work per
token. The real Qwen2 vocabulary's cases are in test_real_vocab.py."""

import random

import pytest
from tiny import tiny_tokenizer

from qwen2audio.engine.detokenize import Detokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def reference(tok, ids, stop):
    """The non-streamed answer: decode a growing prefix until a stop string appears, cut at its leftmost one."""
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k])
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            return text[: min(hits)], True
    return tok.decode(ids), False


def stream(tok, ids, stop=()):
    d = Detokenizer(tok, list(stop))
    pieces = []
    for i in ids:
        pieces.append(d.push(i))
        if d.stopped:
            break
    pieces.append(d.flush())
    return pieces, d


def test_multibyte_characters_split_across_ids(tok):
    text = "hello 你好 wörld 😀🎉 done"
    ids = tok.encode(text)
    assert len(ids) > len(text.split()) + 8  # the tiny vocabulary spells CJK and emoji byte by byte
    pieces, d = stream(tok, ids)
    assert "".join(pieces) == text == d.text
    assert all("\ufffd" not in p for p in pieces)
    # a piece is handed out as soon as its character is complete: the emoji's 4 byte ids give one piece
    assert "😀" in pieces


def test_random_ids_concatenate_to_decode(tok):
    """Any id sequence (invalid UTF-8 runs, special tokens, a trailing partial character) streams to decode(ids)."""
    rng = random.Random(0)
    specials = [tok.im_end_id, tok.audio_id, tok.endoftext_id]
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        if rng.random() < 0.3:
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
        pieces, _ = stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids), ids


def test_stop_strings_spanning_ids_are_cut_and_never_shown(tok):
    text = "the dog barks twice. 你好世界 and then stops here. end"
    ids = tok.encode(text)
    for stop in (["stops here"], ["你好世"], ["twice. 你"], [" end"], ["barks", "dog"], ["zzz"], ["e", "the dog"]):
        expected, hit = reference(tok, ids, stop)
        pieces, d = stream(tok, ids, stop)
        assert "".join(pieces) == expected == d.text, stop
        assert d.stopped == hit
        shown = ""
        for p in pieces:  # no prefix of the stop string is ever handed out ahead of the cut
            shown += p
            assert expected.startswith(shown)
    assert sum(len(tok.encode(s)) > 1 for s in ("stops here", "你好世", "twice. 你")) == 3  # they span ids


def test_random_stop_strings_match_the_reference(tok):
    rng = random.Random(1)
    words = "ab ba aab abab 你好 好你 ö ab你".split()
    for _ in range(150):
        text = "".join(rng.choice(words + [" "]) for _ in range(rng.randrange(1, 15)))
        ids = tok.encode(text)
        full = tok.decode(ids)
        stop = [full[i: i + rng.randrange(1, 5)] for i in (rng.randrange(len(full)) for _ in range(rng.randrange(1, 3)))]
        stop += ["".join(rng.choice("ab你好") for _ in range(rng.randrange(1, 4)))]
        expected, hit = reference(tok, ids, stop)
        pieces, d = stream(tok, ids, stop)
        assert "".join(pieces) == expected, (text, stop)
        assert d.stopped == hit


def test_held_back_stop_prefix_is_released_at_the_end(tok):
    ids = tok.encode("say stop")
    pieces, d = stream(tok, ids, ["stopping"])
    assert not d.stopped and "".join(pieces) == "say stop"
    assert pieces[-1].endswith("stop")  # held back until flush: it could have become "stopping"


def test_work_per_token_does_not_grow_with_the_answer(tok):
    """Decoding cost is per token, not per answer length: pushing the 4,001st..4,200th ids costs about what
    the first 200 cost (re-decoding every id each time made it ~20x more)."""
    import time

    ids = tok.encode("the dog barks twice. 你好世界 and then. " * 200)[:4200]
    d = Detokenizer(tok, ["\n\nUser:", "Observation:"])
    costs = []
    for start in (0, 4000):
        t0 = time.process_time()
        for _ in range(5):  # the same slice again is fine: what matters is how much text is already there
            for i in ids[start: start + 200]:
                d.push(i)
        costs.append(time.process_time() - t0)
        for i in ids[200:4000] if start == 0 else []:
            d.push(i)
    assert costs[1] < 4 * costs[0] + 0.01, costs
