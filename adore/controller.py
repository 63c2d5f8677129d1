"""The GRU controller: scores how useful each past token will be to the current one.

When token i arrives, a GRU reads its embedding (the LLM's frozen table, projected down) and its
position features, and gives a state h_i. From h_i we keep, per token, a small key k_i and a prior
b_i (intrinsic importance: sink tokens, punctuation, names). The current token t's state gives a
query q_t, and

    score(i, t) = <q_t, k_i> / sqrt(d) + b_i + f(t - i)

where f is a small MLP of log-distance features. Labels (training, adore/train/): "i is in the top-K
of t's full attention". The per-token cost is one GRU cell and three small linears: negligible beside
a decoder layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import load_module, save_module


@dataclass
class ControllerConfig:
    embed_dim: int  # the LLM's hidden size (input embeddings)
    proj_dim: int = 64
    hidden_dim: int = 64
    score_dim: int = 32
    pos_features: int = 16
    dist_hidden: int = 16


def position_features(pos: torch.Tensor, n: int) -> torch.Tensor:
    """Sinusoids of log(1 + position): [...] int -> [..., n] float. Log scale so that the features
    separate the first tokens (sinks) sharply and still vary over thousands of positions."""
    x = torch.log1p(pos.float().clamp(min=0))[..., None]
    freqs = torch.arange(n // 2, device=pos.device, dtype=torch.float32)
    ang = x * (2.0 ** (freqs - 2))
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


DIST_FEATURES = 8


def distance_features(dist: torch.Tensor) -> torch.Tensor:
    """[...] int distances (t - i >= 0) -> [..., DIST_FEATURES] float: log-distance, its inverse, and
    steps at 1, 4, 16, 64, 128, 256 tokens (the budget's scale), so f(t - i) can bend sharply there."""
    d = dist.float().clamp(min=0)
    steps = [(d < b).float() for b in (1, 4, 16, 64, 128, 256)]
    return torch.stack([torch.log1p(d) / 8.0, 1.0 / (1.0 + d), *steps], -1)


class Controller(nn.Module):
    def __init__(self, cfg: ControllerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(cfg.embed_dim, cfg.proj_dim)
        self.gru = nn.GRUCell(cfg.proj_dim + cfg.pos_features, cfg.hidden_dim)
        self.key = nn.Linear(cfg.hidden_dim, cfg.score_dim)
        self.query = nn.Linear(cfg.hidden_dim, cfg.score_dim)
        self.prior = nn.Linear(cfg.hidden_dim, 1)
        self.dist = nn.Sequential(nn.Linear(DIST_FEATURES, cfg.dist_hidden), nn.Tanh(), nn.Linear(cfg.dist_hidden, 1))
        self.reset_to_prior()

    @torch.no_grad()
    def reset_to_prior(self) -> None:
        """An untrained controller that behaves like StreamingLLM: recent tokens and the first ones
        score high, the query term is small. Training moves it from there."""
        for m in (self.key, self.query):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        nn.init.zeros_(self.prior.weight)
        nn.init.zeros_(self.prior.bias)
        # f(d) ~ -4 tanh(log(1+d)/8): recency. The other hidden units start small but not at zero
        # (all-zero units would get no gradient and stay dead when training starts from here).
        nn.init.normal_(self.dist[0].weight, std=0.1)
        nn.init.zeros_(self.dist[0].bias)
        self.dist[0].weight[0].zero_()
        self.dist[0].weight[0, 0] = -1.0
        nn.init.normal_(self.dist[2].weight, std=0.01)
        self.dist[2].weight[0, 0] = 4.0
        nn.init.zeros_(self.dist[2].bias)

    @property
    def state_dim(self) -> int:
        return self.cfg.hidden_dim

    def init_state(self, batch: int, device, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(batch, self.cfg.hidden_dim, device=device, dtype=dtype)

    def step(self, emb: torch.Tensor, pos: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One token per sequence: emb [B, E] (LLM embeddings), pos [B], h [B, H] -> new h [B, H]."""
        x = torch.cat([self.proj(emb.float()), position_features(pos, self.cfg.pos_features)], -1)
        return self.gru(x, h)

    def run(self, emb: torch.Tensor, pos: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """A whole sequence: emb [T, E], pos [T] -> states [T, H] (prefill)."""
        return self.run_batch(emb[None], pos[None], None if h is None else h.view(1, -1))[0]

    def run_batch(self, emb: torch.Tensor, pos: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """Many sequences at once: emb [B, T, E], pos [B, T], h [B, H] or None -> states [B, T, H].

        The same GRU cell as `step`, run by torch's fused recurrent loop (training, prefill)."""
        from torch import _VF

        B = emb.shape[0]
        h0 = (self.init_state(B, emb.device) if h is None else h.float()).view(1, B, -1).contiguous()
        x = torch.cat([self.proj(emb.float()), position_features(pos, self.cfg.pos_features)], -1)
        g = self.gru
        out, _ = _VF.gru(x, h0, [g.weight_ih, g.weight_hh, g.bias_ih, g.bias_hh], True, 1, 0.0,
                         self.training, False, True)
        return out

    def token_features(self, h: torch.Tensor) -> torch.Tensor:
        """What is stored per token: h [..., H] -> [..., S + 1] (key, prior)."""
        return torch.cat([self.key(h), self.prior(h)], -1)

    def query_features(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., H] -> q [..., S]"""
        return self.query(h)

    def score(self, q: torch.Tensor, feats: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """score(i, t) = <q_t, k_i> / sqrt(S) + b_i + f(t - i): the one formula that serving (one
        query per sequence, adore/policies/adore.py) and training (many query rows per sequence,
        adore/train/controller.pair_scores) both call.

        Parameters
        ----------
        q : [B, R, S] queries of R rows per sequence, or [B, S] (one row per sequence: decode)
        feats : [B, N, S+1] stored token features (key, prior), see `token_features`
        dist : t - i, broadcastable to [B, R, N] ([R, N] when every sequence shares its rows),
            or [B, N] with a [B, S] q

        Returns
        -------
        [B, R, N] scores, or [B, N] for a [B, S] q. Nothing is masked: rows decide what t - i < 0 means.
        """
        one_row = q.dim() == 2
        if one_row:
            q, dist = q[:, None], dist[:, None]
        k, prior = feats[..., :-1], feats[..., -1]
        s = torch.einsum("brs,bns->brn", q, k) / math.sqrt(k.shape[-1]) + prior[:, None]
        s = s + self.dist(distance_features(dist)).squeeze(-1)
        return s[:, 0] if one_row else s

    def pair_scores(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Scores of query rows against every token of whole sequences, by `score` (training, metrics).

        h [B, T, H] states from `run_batch`, rows [R] query positions -> [B, R, T], -inf after each
        row's position (token i > t is not in t's past)."""
        dist = rows[:, None] - torch.arange(h.shape[1], device=h.device)[None, :]  # [R, T], shared by the batch
        s = self.score(self.query_features(h[:, rows]), self.token_features(h), dist)
        return s.masked_fill((dist < 0)[None], float("-inf"))

    # -- checkpoints: safetensors weights, config in the metadata --------------------------------
    def save(self, path: str, extra: dict | None = None) -> None:
        save_module(self, "adore_controller", self.cfg, path, extra)

    @classmethod
    def load(cls, path: str, device="cpu") -> Controller:
        return load_module(lambda cfg: cls(ControllerConfig(**cfg)), "adore_controller", path, device)
