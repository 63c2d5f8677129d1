"""The v2 controller: a small learned scorer over the attention each past token has received.

The paper's controller (adore/controller.py) reads token embeddings and positions only, so it cannot
see what the model attends to. This one reads the model's own signal, which decoding already has:
every step the current token's queries meet every cached and stored key (AdorePolicy.observe), and
each position keeps decayed averages of the attention it received, at a few decay rates. From those,
its distance to the current token and whether it is one of the first tokens (sinks), an MLP predicts
how much attention the token will receive over the next steps: its training label is that future
mass (adore/train/scorer.py), the quantity a bounded cache should keep.

    score(i, t) = MLP(log ema_d(i, t) for d in decays, distance_features(t - i), sink(i))

It can represent StreamingLLM (sinks + distance), H2O-like accumulated attention (a slow decay) and
the hand-set rule `scorer=attention` (log ema_0.5) exactly, so training can only choose among them
or mix them. Cost per step: the MLP over [n, P] positions (a few thousand FLOPs each).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import load_module, save_module
from .controller import DIST_FEATURES, distance_features

EPS = 1e-6  # inside log(ema + EPS): a token that has received nothing scores log(EPS)


@dataclass
class ScorerConfig:
    decays: tuple[float, ...] = (0.0, 0.3, 0.5, 0.7, 0.9, 0.98)  # received-attention averages kept per position
    hidden: int = 32
    sinks: int = 4  # positions below this get the sink feature


class LearnedScorer(nn.Module):
    def __init__(self, cfg: ScorerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n_in = len(cfg.decays) + DIST_FEATURES + 1
        self.mlp = nn.Sequential(nn.Linear(n_in, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, 1))

    @property
    def n_features(self) -> int:
        """Per-position state the cache keeps: one decayed average per decay."""
        return len(self.cfg.decays)

    def forward(self, ema: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """Scores of past positions.

        Parameters
        ----------
        ema : [..., P, F] the decayed received attention of positions 0..P-1 (F = len(decays))
        dist : [..., P] current position - position (negative: ahead, scored anyway; callers mask)

        Returns
        -------
        [..., P] float32 (higher: keep)
        """
        P = ema.shape[-2]
        sink = (torch.arange(P, device=ema.device) < self.cfg.sinks).float().expand(dist.shape)
        x = torch.cat([torch.log(ema.float() + EPS), distance_features(dist), sink[..., None]], -1)
        return self.mlp(x)[..., 0]

    def save(self, path: str, extra: dict | None = None) -> None:
        save_module(self, "adore_scorer", self.cfg, path, extra)

    @classmethod
    def load(cls, path: str, device="cpu") -> LearnedScorer:
        return load_module(lambda cfg: cls(ScorerConfig(**{**cfg, "decays": tuple(cfg["decays"])})),
                           "adore_scorer", path, device)
