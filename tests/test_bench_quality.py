"""bench/quality.py's scoring: per-prompt BLEU statistics add up to corpus BLEU, and the paired
bootstrap reports a zero gap for identical sides and a clear one for a side that is worse."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
quality = pytest.importorskip("quality")
sacrebleu = pytest.importorskip("sacrebleu")

REFS = ["the cat sat on the mat and looked at the dog", "it was a truth universally acknowledged",
        "she walked to the village in the rain", "nothing could be more delightful than the ball"]


def _per_prompt(cands):
    return {"bleu_stats": [quality.bleu_stats(c, r) for c, r in zip(cands, REFS)],
            "rougeL": [float(c == r) for c, r in zip(cands, REFS)],
            "bertscore_f1": [float(c == r) for c, r in zip(cands, REFS)]}


def test_summed_bleu_statistics_equal_corpus_bleu():
    import torch

    cands = ["the cat sat on a mat and looked at a dog", REFS[1], "she ran to the town in the rain", "no"]
    stats = torch.tensor([quality.bleu_stats(c, r) for c, r in zip(cands, REFS)]).sum(0)
    assert quality.bleu_from_stats(stats) == pytest.approx(sacrebleu.corpus_bleu(cands, [REFS]).score)


def test_paired_bootstrap_zero_for_identical_sides_and_negative_for_worse():
    good = _per_prompt(REFS)
    bad = _per_prompt(["the dog", REFS[1], "rain", "the ball"])
    same = quality.paired_bootstrap(good, good, n=200)
    assert all(v == [0.0, 0.0, 0.0] for v in same.values())
    worse = quality.paired_bootstrap(bad, good, n=200)
    assert worse["bleu"][0] < 0 and worse["bleu"][1] <= worse["bleu"][0] <= worse["bleu"][2]
    assert worse["rougeL"][0] == pytest.approx(-75.0)
