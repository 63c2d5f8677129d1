"""Train the GRU controller on attention labels (adore/train/labels.py).

Each step takes a batch of labelled sequences, runs the controller over every token (one fused GRU
pass), scores a random subset of query rows against every earlier token,

    s(i, t) = <q_t, k_i> / sqrt(d) + b_i + f(t - i)          [B, rows, T]

and minimises class-weighted BCE against "i is in the top-K of t's full attention" (positives are
rare: K of t + 1 tokens, so they weigh neg/pos). An optional listwise term (cross-entropy between the
true averaged attention of row t and softmax_i s(i, t)) rewards ranking heavy tokens first. A
validation split drives early stopping; metrics are in adore/train/metrics.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..controller import Controller, ControllerConfig
from .labels import dense_labels
from .metrics import evaluate


@dataclass
class TrainConfig:
    steps: int = 600  # most optimizer steps
    batch: int = 4  # sequences per step
    rows: int = 256  # query rows scored per sequence and step
    lr: float = 3e-3
    weight_decay: float = 1e-4
    listwise: float = 0.0  # weight of the listwise attention cross-entropy (0: BCE only)
    val_frac: float = 0.15
    eval_every: int = 50
    patience: int = 4  # evaluations without improvement before stopping
    seed: int = 0
    row_min: int = 0  # query rows are drawn from [row_min, T): e.g. the budget m, where release decides
    top_k: int = 96  # K of the labels (<= the dataset's keep)
    budget: int = 192  # m for the coverage metrics
    rebuild: int = 8  # R for the simulated ADORE cache in the metrics


def class_weight(T: int, top_k: int) -> float:
    """neg / pos over all (t, i <= t) pairs of a T-token sequence with top_k positives per row."""
    t = torch.arange(T, dtype=torch.float64)
    pos = torch.clamp(t + 1, max=top_k)
    return float((t + 1 - pos).sum() / pos.sum())


def batch_loss(ctrl, emb, idx, val, rows, top_k: int, pos_weight: float, listwise: float):
    """emb [B, T, E], idx/val [B, T, keep], rows [R] -> (loss, bce) scalars."""
    B, T, _ = emb.shape
    pos = torch.arange(T)[None].expand(B, T)
    h = ctrl.run_batch(emb, pos)
    s = ctrl.pair_scores(h, rows)  # [B, R, T]
    valid = torch.isfinite(s)
    y = dense_labels(idx[:, rows], top_k, T).float()
    w = torch.where(y > 0, pos_weight, 1.0) * valid
    bce = F.binary_cross_entropy_with_logits(s.masked_fill(~valid, 0.0), y, weight=w, reduction="sum")
    bce = bce / w.sum()
    loss = bce
    if listwise > 0:
        p = torch.zeros(B, len(rows), T + 1)
        ii = idx[:, rows].long()
        p.scatter_add_(-1, torch.where(ii >= 0, ii, T), val[:, rows].float())
        p = p[..., :T] / p[..., :T].sum(-1, keepdim=True).clamp(min=1e-9)
        logq = torch.log_softmax(s, -1).masked_fill(~valid, 0.0)
        loss = loss + listwise * -(p * logq).sum(-1).mean()
    return loss, bce


def train_controller(data: dict, embed: torch.nn.Module, cfg: TrainConfig,
                     ctrl_cfg: ControllerConfig | None = None, progress: bool = True,
                     heldout: dict | None = None, init: Controller | None = None) -> tuple[Controller, dict]:
    """Train on a label dataset (labels.build_dataset / load_dataset); embed: the LLM's input
    embedding (frozen); init: a controller to fine-tune instead of a fresh one (ctrl_cfg ignored).
    Returns the best controller (by validation loss; init's own counts too) and a report dict."""
    torch.manual_seed(cfg.seed)
    ids, idx, val = data["ids"].long(), data["idx"], data["val"]
    N, T = ids.shape
    if cfg.top_k > idx.shape[-1]:
        raise ValueError(f"top_k {cfg.top_k} > the labels' stored keep {idx.shape[-1]}")
    if not 0 <= cfg.row_min < T:
        raise ValueError(f"row_min {cfg.row_min} must be in [0, {T}) for {T}-token sequences")
    with torch.no_grad():
        emb = embed(ids).float()
    perm = torch.randperm(N)
    n_val = max(1, round(N * cfg.val_frac)) if N > 1 else 0
    va, tr = perm[:n_val], perm[n_val:] if N > 1 else perm
    if init is not None:
        ctrl = Controller(init.cfg)
        ctrl.load_state_dict(init.state_dict())
    else:
        ctrl = Controller(ctrl_cfg or ControllerConfig(embed_dim=emb.shape[-1]))
    opt = torch.optim.AdamW(ctrl.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # OneCycleLR divides by zero when pct_start * total_steps == 1 (a warm-up of zero length): 10 steps
    warm = 0.1 if abs(0.1 * cfg.steps - 1.0) > 1e-9 else 0.15
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=warm)
    pw = class_weight(T, cfg.top_k)
    best, best_state, bad, history = float("inf"), None, 0, []
    if init is not None:  # the starting point is a candidate too: fine-tuning must not make it worse
        best = validation_loss(ctrl, emb, idx, val, va if n_val else tr, cfg, pw)
        best_state = {k: v.clone() for k, v in ctrl.state_dict().items()}
        history.append({"step": 0, "val_loss": round(best, 5)})
    t0 = time.time()
    bar = tqdm(range(1, cfg.steps + 1), desc="controller", unit="step", disable=not progress)
    for step in bar:
        ctrl.train()
        b = tr[torch.randint(len(tr), (min(cfg.batch, len(tr)),))]
        rows = torch.randint(cfg.row_min, T, (min(cfg.rows, T - cfg.row_min),))
        loss, bce = batch_loss(ctrl, emb[b], idx[b], val[b], rows, cfg.top_k, pw, cfg.listwise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ctrl.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            vl = validation_loss(ctrl, emb, idx, val, va if n_val else tr, cfg, pw)
            history.append({"step": step, "train_loss": round(loss.item(), 5), "val_loss": round(vl, 5)})
            if vl < best - 1e-4:
                best, bad = vl, 0
                best_state = {k: v.clone() for k, v in ctrl.state_dict().items()}
            else:
                bad += 1
                if bad >= cfg.patience:
                    break
    if best_state is not None:
        ctrl.load_state_dict(best_state)
    ctrl.eval()
    report = {"train_config": asdict(cfg), "controller_config": asdict(ctrl.cfg), "init": init is not None,
              "sequences": {"train": len(tr), "val": n_val, "tokens_per_sequence": T},
              "label_config": data.get("config", {}), "pos_weight": round(pw, 3),
              "best_val_loss": round(best, 5), "history": history,
              "train_seconds": round(time.time() - t0, 1)}
    sets = {"val": (emb[va], idx[va], val[va], ids[va])} if n_val else {}
    if heldout is not None:
        with torch.no_grad():
            hids = heldout["ids"].long()
            sets["heldout"] = (embed(hids).float(), heldout["idx"], heldout["val"], hids)
    for name, (e, ix, vv, _) in sets.items():
        report[f"{name}_metrics"] = evaluate(ctrl, e, ix, vv, cfg.top_k, cfg.budget, cfg.rebuild)
    return ctrl, report


@torch.no_grad()
def validation_loss(ctrl, emb, idx, val, which, cfg: TrainConfig, pos_weight: float) -> float:
    """Mean BCE (plus the listwise term) over fixed query rows of the validation sequences."""
    ctrl.eval()
    T = emb.shape[1]
    g = torch.Generator().manual_seed(1234)
    rows = cfg.row_min + torch.randperm(T - cfg.row_min, generator=g)[: min(T - cfg.row_min, 512)].sort().values
    tot = 0.0
    for j in which.tolist():
        loss, _ = batch_loss(ctrl, emb[j : j + 1], idx[j : j + 1], val[j : j + 1], rows, cfg.top_k,
                             pos_weight, cfg.listwise)
        tot += loss.item()
    return tot / max(1, len(which))


def save_checkpoint(ctrl: Controller, report: dict, path: str) -> None:
    """Weights (+ config) to `path` (.safetensors) and the report next to it (.json)."""
    ctrl.save(path, extra={k: report[k] for k in ("train_config", "label_config") if k in report})
    with open(path.removesuffix(".safetensors") + ".json", "w") as f:
        json.dump(report, f, indent=1)
