"""adore/evaluation.py, the scoring of bench/ and jobs/: per-prompt BLEU statistics add up to corpus
BLEU, the paired bootstrap reports a zero gap for identical sides and a clear one for a side that is
worse, ROUGE-L stems, and the prompt sets are spread as each caller expects."""

import pytest

from adore.config import UserError
from adore.evaluation import bleu_from_stats, bleu_stats, paired_bootstrap, spread_spans

sacrebleu = pytest.importorskip("sacrebleu")

REFS = ["the cat sat on the mat and looked at the dog", "it was a truth universally acknowledged",
        "she walked to the village in the rain", "nothing could be more delightful than the ball"]


def _per_prompt(cands):
    return {"bleu_stats": [bleu_stats(c, r) for c, r in zip(cands, REFS)],
            "rougeL": [float(c == r) for c, r in zip(cands, REFS)],
            "bertscore_f1": [float(c == r) for c, r in zip(cands, REFS)]}


def test_summed_bleu_statistics_equal_corpus_bleu():
    import torch

    cands = ["the cat sat on a mat and looked at a dog", REFS[1], "she ran to the town in the rain", "no"]
    stats = torch.tensor([bleu_stats(c, r) for c, r in zip(cands, REFS)]).sum(0)
    assert bleu_from_stats(stats) == pytest.approx(sacrebleu.corpus_bleu(cands, [REFS]).score)


def test_paired_bootstrap_zero_for_identical_sides_and_negative_for_worse():
    good = _per_prompt(REFS)
    bad = _per_prompt(["the dog", REFS[1], "rain", "the ball"])
    same = paired_bootstrap(good, good, n=200)
    assert all(v == [0.0, 0.0, 0.0] for v in same.values())
    worse = paired_bootstrap(bad, good, n=200)
    assert worse["bleu"][0] < 0 and worse["bleu"][1] <= worse["bleu"][0] <= worse["bleu"][2]
    assert worse["rougeL"][0] == pytest.approx(-75.0)


def test_rouge_l_uses_the_stemmer():
    pytest.importorskip("rouge_score")
    from adore.evaluation import rouge_l

    assert rouge_l(["she walks to the villages"], ["she walked to the village"]) == [1.0]


def test_spread_spans_layouts():
    ids = list(range(100))
    # bench/: disjoint spans from 0, (len - span) // n apart
    assert [s[0] for s in spread_spans(ids, 4, 10)] == [0, 22, 44, 66]
    with pytest.raises(UserError, match="too short"):
        spread_spans(ids, 11, 10)
    # jobs/: first at 0, last ending at the end, overlapping when the text is short
    assert [s[0] for s in spread_spans(ids, 4, 10, reach_end=True)] == [0, 30, 60, 90]
    assert [s[0] for s in spread_spans(ids, 3, 60, reach_end=True)] == [0, 20, 40]
    assert spread_spans(ids, 1, 10, reach_end=True) == [ids[:10]]
    assert all(len(s) == 10 for s in spread_spans(ids, 4, 10) + spread_spans(ids, 4, 10, reach_end=True))
    with pytest.raises(UserError, match="fewer than"):
        spread_spans(ids, 2, 101, reach_end=True)
