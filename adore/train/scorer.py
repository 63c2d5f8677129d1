"""Train the v2 controller (adore/scorer.py) to predict the attention a token will receive.

For each training segment, one dense forward gives A [T, T]: the attention of every query averaged
over layers and heads (labels.averaged_attention_rows, the signal AdorePolicy.observe reads from
the cache and the second tier, which together hold the whole history). Then, at a step t:

    features  ema_d(i, t) = d * ema_d(i, t - 1) + (1 - d) * A[t, i]  for each decay d, i <= t
              (what the policy keeps per position), and the distance t - i
    label     the attention i receives from the next `horizon` queries: sum_{s=t+1..t+h} A[s, i]

and the loss is listwise: the cross-entropy between softmax(scores over i <= t) and the labels
normalised over i <= t, so the scorer learns to rank positions the way future attention does,
which is all that choosing m of them needs. Steps t before the budget never cut, so rows start at
`--rows-from` (the budget m).

    python -m adore.train.scorer --text-files a.txt b.txt --heldout-file c.txt --out scorer.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from ..scorer import LearnedScorer, ScorerConfig
from .labels import averaged_attention_rows, collect_qk, segments


@dataclass
class ScorerTrainConfig:
    horizon: int = 4  # queries after t whose attention is the label (bench/release_rules: keeping
    # by the next 4 queries' attention beats the next 32's)
    rows_from: int = 192  # the first step t trained on (the budget: earlier steps never cut)
    row_stride: int = 8  # every row_stride-th step t is a training row
    steps: int = 1500
    batch: int = 32  # rows per optimiser step
    lr: float = 3e-3
    seed: int = 0


@torch.no_grad()
def attention_matrix(model, ids: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """ids [T] -> A [T, T] float32: causal attention of each query averaged over layers and heads."""
    q, k, scale = collect_qk(model, ids, list(range(model.config.num_hidden_layers)))
    T = ids.shape[0]
    return torch.cat([averaged_attention_rows(q, k, scale, t0, min(T, t0 + chunk)) for t0 in range(0, T, chunk)])


def rows_of(A: torch.Tensor, decays: tuple[float, ...], cfg: ScorerTrainConfig) -> dict:
    """Training rows of one segment: features ema [R, T, F], label [R, T] and the step t of each row
    (positions after t are masked by the trainer)."""
    T = A.shape[0]
    steps = list(range(cfg.rows_from, T - cfg.horizon, cfg.row_stride))
    ema = torch.zeros(T, len(decays))
    future = torch.cumsum(A.flip(0), 0).flip(0)  # future[s, i] = sum_{s' >= s} A[s', i]
    feats, labels = [], []
    want = set(steps)
    for t in range(T):
        for f, d in enumerate(decays):
            ema[:, f] = d * ema[:, f] + (1 - d) * A[t]
        if t in want:
            feats.append(ema.clone())
            labels.append(future[t + 1] - future[t + 1 + cfg.horizon] if t + 1 + cfg.horizon < T else future[t + 1])
    return {"ema": torch.stack(feats), "label": torch.stack(labels), "t": torch.tensor(steps)}


def listwise_loss(scorer: LearnedScorer, ema: torch.Tensor, label: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_i p(i) log softmax(score)_i over positions i <= t, p = label / its sum."""
    T = ema.shape[1]
    pos = torch.arange(T)
    dist = t[:, None] - pos[None, :]
    s = scorer(ema, dist).masked_fill(dist < 0, float("-inf"))
    p = label.masked_fill(dist < 0, 0.0)
    p = p / p.sum(1, keepdim=True).clamp(min=1e-12)
    return -(p * torch.log_softmax(s, 1).masked_fill(dist < 0, 0.0)).sum(1).mean()


def recall_at(scorer: LearnedScorer | None, data: dict, m: int, decays: tuple[float, ...]) -> float:
    """Share of the next `horizon` queries' attention that falls on the m positions the scorer keeps
    (None: the hand-set rule `scorer=attention`, log ema_0.5), averaged over rows."""
    ema, label, t = data["ema"], data["label"], data["t"]
    dist = t[:, None] - torch.arange(ema.shape[1])[None, :]
    with torch.no_grad():
        s = scorer(ema, dist) if scorer is not None else torch.log(ema[..., decays.index(0.5)] + 1e-6)
    s = s.masked_fill(dist < 0, float("-inf"))
    keep = s.topk(m, 1).indices
    return float((label.gather(1, keep).sum(1) / label.sum(1).clamp(min=1e-12)).mean())


def train(data: dict, held: dict | None, scfg: ScorerConfig, cfg: ScorerTrainConfig, m: int) -> tuple:
    torch.manual_seed(cfg.seed)
    scorer = LearnedScorer(scfg)
    opt = torch.optim.Adam(scorer.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    R = data["ema"].shape[0]
    for _ in tqdm(range(cfg.steps), desc="train scorer"):
        idx = torch.randint(0, R, (cfg.batch,))
        loss = listwise_loss(scorer, data["ema"][idx], data["label"][idx], data["t"][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    scorer.eval()
    report = {"train_loss_last": float(loss.detach())}
    for name, d in (("train", data), ("heldout", held)):
        if d is not None:
            report[f"{name}_recall_at_m"] = {"learned": recall_at(scorer, d, m, scfg.decays)}
            if 0.5 in scfg.decays:
                report[f"{name}_recall_at_m"]["ema_0.5"] = recall_at(None, d, m, scfg.decays)
    return scorer, report


def collect(model, seqs: list[torch.Tensor], decays, cfg: ScorerTrainConfig, desc: str,
            cache_dir: str | None = None) -> dict:
    """Training rows of every segment; with cache_dir, each segment's A is kept there (fp16, by the
    hash of its ids and the model's name) so that runs with other decays or horizons skip the forward."""
    parts = []
    for ids in tqdm(seqs, desc=desc):
        path = None
        if cache_dir:
            key = hashlib.sha1(ids.numpy().tobytes() + str(model.config._name_or_path).encode()).hexdigest()[:16]
            path = os.path.join(cache_dir, f"attention-{key}.pt")
        if path and os.path.exists(path):
            A = torch.load(path).float()
        else:
            A = attention_matrix(model, ids)
            if path:
                os.makedirs(cache_dir, exist_ok=True)
                torch.save(A.half(), path)
        parts.append(rows_of(A, decays, cfg))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def main(argv: list[str] | None = None) -> int:
    from ..models import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text-files", nargs="+", required=True)
    p.add_argument("--heldout-file", default=None, help="text whose first --per-text segments report recall")
    p.add_argument("--per-text", type=int, default=4, help="segments per text file, spread over it")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--budget", type=int, default=192, help="m for the recall figures")
    p.add_argument("--decays", default=",".join(map(str, ScorerConfig().decays)))
    for f, v in asdict(ScorerTrainConfig()).items():
        p.add_argument("--" + f.replace("_", "-"), type=type(v), default=v)
    p.add_argument("--attention-cache", default=None, help="folder keeping each segment's attention matrix")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True, help="checkpoint (.safetensors); the report goes to .json beside it")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    cfg = ScorerTrainConfig(**{f: getattr(a, f) for f in asdict(ScorerTrainConfig())})
    scfg = ScorerConfig(decays=tuple(float(x) for x in a.decays.split(",")))
    model, tok, _ = load_model(a.model)

    def read(path):
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    seqs = segments(tok, [read(x) for x in a.text_files], a.seq_len, per_text=a.per_text)
    data = collect(model, seqs, scfg.decays, cfg, "attention (train)", a.attention_cache)
    held = None
    if a.heldout_file:
        hseqs = segments(tok, [read(a.heldout_file)], a.seq_len, per_text=2)
        held = collect(model, hseqs, scfg.decays, cfg, "attention (held out)", a.attention_cache)
    scorer, report = train(data, held, scfg, cfg, a.budget)
    report.update({"command": "python -m adore.train.scorer " + " ".join(sys.argv[1:] if argv is None else argv),
                   "model": a.model, "text_files": [os.path.basename(x) for x in a.text_files],
                   "heldout_file": a.heldout_file and os.path.basename(a.heldout_file), "segments": len(seqs),
                   "rows": int(data["ema"].shape[0]), "config": asdict(cfg), "scorer": asdict(scfg),
                   "seconds": round(time.time() - t0, 1)})
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    scorer.save(a.out, {"model": a.model, "train": asdict(cfg)})
    with open(os.path.splitext(a.out)[0] + ".json", "w") as fh:
        json.dump(report, fh, indent=2)
    print(json.dumps({k: v for k, v in report.items() if "recall" in k or k == "seconds"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
