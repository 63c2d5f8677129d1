"""The offline long-context retrieval generator (adore/retrieval.py): reproducible, the asked length,
the needle where it was asked for, and string-match scoring."""

from __future__ import annotations

import pytest

from adore.retrieval import TASKS, make_samples, score, sentences


@pytest.fixture(scope="module")
def text():
    from pathlib import Path

    return (Path(__file__).resolve().parents[1] / "data" / "austen" / "emma.txt").read_text()


@pytest.mark.parametrize("task", TASKS)
def test_samples_are_reproducible_sized_and_placed(tiny, text, task):
    _, tok, _ = tiny
    a = make_samples(tok, text, tasks=[task], lengths=[768, 2048], depths=[0.0, 0.5, 1.0], per_cell=2, seed=3)
    b = make_samples(tok, text, tasks=[task], lengths=[768, 2048], depths=[0.0, 0.5, 1.0], per_cell=2, seed=3)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert len({s.prompt for s in a}) == len(a)  # every cell and repeat differs
    c = make_samples(tok, text, tasks=[task], lengths=[768], depths=[0.5], per_cell=1, seed=4)
    assert c[0].prompt != a[2].prompt
    targets = [n for n in (768, 2048) for _ in range(3 * 2)]  # order: task, length, depth, repeat
    for s, target in zip(a, targets):
        assert s.prompt_ids == tok.encode(s.prompt, add_special_tokens=True)
        assert 0.8 * target <= s.length <= target, (s.length, target)
        body = s.prompt.split("\n\n")[1]
        first = min(body.find(x) for x in _needle_marks(s))
        slack = max(len(x) for x in sentences(body)) / len(body) + 0.02  # needles go between sentences
        assert abs(first / len(body) - s.depth) <= slack, (first / len(body), s.depth, slack)
        assert all(ans in s.prompt for ans in s.answers)


def _needle_marks(s):
    return {"passkey": ["The pass key is"], "niah_single": ["special magic number"],
            "niah_multikey": [f"numbers for {s.prompt.split('magic number for ')[-1].split()[0]} is"],
            "variable_track": ["VAR "]}[s.task]


def test_scoring(tiny, text):
    _, tok, _ = tiny
    key, chain = make_samples(tok, text, tasks=["passkey", "variable_track"], lengths=[768], depths=[0.5],
                              per_cell=1)
    assert score(key, f" {key.answers[0]}. Remember it.") == 1.0
    assert score(key, " 12.") == 0.0
    assert score(chain, " ".join(chain.answers[:2])) == 0.5


def test_sentences_and_errors(tiny, text):
    _, tok, _ = tiny
    assert all(s and "\n" not in s for s in sentences(text))
    with pytest.raises(ValueError, match="too short"):
        make_samples(tok, text, tasks=["niah_multikey"], lengths=[40], depths=[0.5], per_cell=1)
    with pytest.raises(ValueError, match="unknown retrieval task"):
        make_samples(tok, text, tasks=["nope"], lengths=[768], depths=[0.5], per_cell=1)
