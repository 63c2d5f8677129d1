"""StreamingLLM (Xiao et al. 2023): the first `sink_tokens` tokens (attention sinks) + the most recent."""

from __future__ import annotations

from dataclasses import dataclass

from .base import BIG, Policy, SlotView


@dataclass
class SinkPolicy(Policy):
    name = "sink"
    knobs = ("sink_tokens",)

    def keep_scores(self, view: SlotView):
        return view.pos.double() + BIG * (view.pos < self.cfg.sink_tokens)
