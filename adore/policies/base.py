"""The KV policy interface.

A policy decides, after each step, which of a sequence's cached tokens to keep: the engine asks for
a score per slot (higher = keep) and keeps the `budget` best, one decision for all layers. The engine
calls the same hooks for every policy and never asks which one it has (as a kvpress press owns its
`score`):

    bind(model, info, embed, device)      once, before the cache is built (a learned scorer loads here)
    state_dims()                          per-position and per-row feature sizes the cache must hold
    prefill_scores(cache, rows, lengths, queries, keys)  scores of new prompts' positions [k, P]
    step_scores(cache, n, cur_tok, cur_pos)  scores of every position for this step's tokens [n, P]
    choose_rebuild(cache, n, pos_scores)  released positions to rebuild [n, r] and their validity
    observe(cache, n, cur_pos, queries, pos_scores)  after the layers: the scores the cut uses
    keep_scores(view)                     [n, C]: which cached slots to keep

`queries` are the current token's queries of every layer ([L, n, Hq, D]), captured only for a policy
whose `needs_queries` is set; `rebuild_source` says whether a rebuilt token's K/V comes back from the
cache's second tier ("stored") or is computed again by running the token as a query row.

Per-sequence values (controller features and state) live in rows of the engine's SlotCache, so
sequences can join, leave and move between rows freely; the policy decides what goes there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import AdoreConfig
from ..models import ModelInfo

# Score offset that puts a protected class of tokens above every unprotected one. Scores are float64:
# in float32, 1e9 + 12 == 1e9 and protected tokens would tie.
BIG = 1e12


@dataclass
class SlotView:
    """What a policy may look at when scoring the first n rows' slots.

    pos:        [n, C] int    position of the token in each slot, -1 if empty
    cur_pos:    [n] int       position of the current token
    mass:       [n, C] float  attention each slot received, accumulated over steps (h2o)
    pos_scores: [n, P] float  controller score of every position (adore only), else None
    """

    pos: torch.Tensor
    cur_pos: torch.Tensor
    mass: torch.Tensor
    pos_scores: torch.Tensor | None = None


@dataclass
class Policy:
    cfg: AdoreConfig
    name: ClassVar[str] = "base"
    bounded: ClassVar[bool] = True  # False: never releases (full attention)
    needs_mass: ClassVar[bool] = False
    uses_controller: ClassVar[bool] = False
    # The AdoreConfig fields this policy reads besides cache_size (jobs/grid.py records these per cell).
    knobs: ClassVar[tuple[str, ...]] = ()

    @property
    def budget(self) -> int | None:
        return self.cfg.cache_size if self.bounded else None

    @property
    def rebuild(self) -> int:
        """Most released tokens rebuilt per step (query rows beside the current token)."""
        return 0

    @property
    def top_k(self) -> int | None:
        """Keys each query row keeps; baselines attend densely to what they keep."""
        return None

    def capacity(self, max_seq_len: int) -> int:
        """Slots a sequence needs: the budget plus room for one step's new rows (SlotCache allocates
        one more, its trash slot: see SlotCache.slots_allocated)."""
        return max_seq_len if self.budget is None else self.budget + self.rebuild + 1

    @property
    def static(self) -> bool:
        """Whether the cache membership at every step is a function of the token sequence alone (not
        of the LLM's attention or of rebuilt K/V): then adore/train/streameval.py can evaluate a
        whole stream in one masked forward."""
        return not self.needs_mass

    def keep_scores(self, view: SlotView) -> torch.Tensor:
        """[n, C] higher = keep. Only occupied slots are compared."""
        raise NotImplementedError

    # -- hooks a learned or rebuilding policy overrides (the baselines need none) ---------------
    def bind(self, model, info: ModelInfo, embed, device) -> None:
        """Called once by the engine with the model, its ModelInfo, its token embedding and the device."""

    def state_dims(self) -> tuple[int, int]:
        """(features per position, state per row) the SlotCache keeps for this policy."""
        return 0, 0

    @property
    def needs_queries(self) -> bool:
        """Whether the engine must capture the current token's queries for `observe`."""
        return False

    @property
    def rebuild_source(self) -> str:
        return "recompute"

    @property
    def store_size(self) -> int:
        """Released tokens' K/V the cache keeps per sequence (its second tier)."""
        return 0

    def prefill_scores(self, cache, rows: slice, lengths: list[int], queries: torch.Tensor | None = None,
                       keys: torch.Tensor | None = None) -> torch.Tensor | None:
        """k new prompts in cache rows `rows` (k consecutive rows), of lengths [k] (P = the longest), their
        token ids already in cache.tok_at; with needs_queries also their last tokens' queries
        [L, k, Hq, D] and every layer's keys [L, k, Hkv, >= P, D] (key j of a row is its position j,
        j < its length). Scores of their positions [k, P] (-inf past a prompt's end), or None."""
        return None

    def observe(self, cache, n: int, cur_pos: torch.Tensor, queries: torch.Tensor | None,
                pos_scores: torch.Tensor | None) -> torch.Tensor | None:
        """Called after the layers ran this step's tokens; returns the scores [n, P] that decide the
        cut (by default the step's own)."""
        return pos_scores

    def step_scores(self, cache, n: int, cur_tok: torch.Tensor, cur_pos: torch.Tensor) -> torch.Tensor | None:
        """This step's current tokens cur_tok [n] at cur_pos [n]: scores of every position [n, P]."""
        return None

    def choose_rebuild(self, cache, n: int, pos_scores: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Released positions to bring back: positions [n, r], valid [n, r]. Recomputed ones run as
        query rows beside the current token (called before the layers); stored ones are copied back
        from the second tier (called after the layers, with the scores `observe` returned)."""
        return nothing_rebuilt(cache, n)

    def describe(self) -> dict:
        return {"policy": self.name, "cache_size": self.budget, "top_k": self.top_k,
                "rebuild": self.rebuild}


def nothing_rebuilt(cache, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """No rebuild this step: positions [n, 0], valid [n, 0]."""
    dev = cache.pos.device
    return torch.zeros(n, 0, dtype=torch.long, device=dev), torch.zeros(n, 0, dtype=torch.bool, device=dev)


def recent(view: SlotView, n_recent: int) -> torch.Tensor:
    """[n, C] bool: the slot holds one of the last n_recent positions (the current one included)."""
    return view.pos > (view.cur_pos[:, None] - n_recent)


def select_keep(policy: Policy, view: SlotView, valid: torch.Tensor) -> torch.Tensor:
    """[n, C] bool: the occupied slots to keep, the `budget` best by the policy's scores
    (all of them when a row holds no more than the budget)."""
    s = policy.keep_scores(view).masked_fill(~valid, float("-inf"))
    k = min(policy.budget, s.shape[1])
    return torch.zeros_like(valid).scatter_(1, s.topk(k, dim=1).indices, True) & valid
