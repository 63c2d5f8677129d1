"""Token choice (greedy, temperature, top-p, seeded) and incremental detokenization with stop strings."""

from __future__ import annotations

import torch


def make_generator(seed: int | None, device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                  uniform: torch.Tensor) -> torch.Tensor:
    """Sampled token ids for a batch of rows, in batched ops without a device-to-host sync.

    Parameters
    ----------
    logits : [n, V]
    temperature : [n] > 0 (greedy rows take the argmax without coming here)
    top_p : [n] in (0, 1]: each row samples from the smallest prefix of its sorted probabilities
        whose mass reaches top_p (always at least one token)
    uniform : [n] in [0, 1), drawn from each row's own seeded generator (`draw_uniforms`), so a
        request's tokens depend on its seed only, not on the rows beside it

    Returns
    -------
    [n] long. The logits are shifted so that their maximum is 0 before dividing, so no temperature
    overflows to inf; a row with no usable probability (NaN logits from the model) takes its argmax.
    """
    x = logits.float()
    z = (x - x.max(-1, keepdim=True).values) / temperature.float().clamp(min=1e-30)[:, None]
    probs = torch.softmax(z, dim=-1)
    bad = ~(torch.isfinite(probs).all(-1) & (probs.sum(-1) > 0))
    sp, si = torch.sort(probs.nan_to_num(0.0), dim=-1, descending=True)
    sp = sp.masked_fill((torch.cumsum(sp, -1) - sp) >= top_p.float()[:, None], 0.0)
    mass = torch.cumsum(sp, -1)
    # inverse CDF: the first sorted token whose cumulative mass exceeds u * (the kept mass)
    at = torch.searchsorted(mass, (uniform.float() * mass[:, -1])[:, None], right=True)
    tok = si.gather(1, at.clamp(max=logits.shape[-1] - 1))[:, 0]
    return torch.where(bad, torch.argmax(logits, dim=-1), tok)


def draw_uniforms(gens: list[torch.Generator], device) -> torch.Tensor:
    """[len(gens)] one uniform in [0, 1) from each row's generator (no sync: values stay on device)."""
    return torch.stack([torch.rand((), generator=g, device=device) for g in gens])


class Detokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a multi-byte character,
    and holds back text that could still become a stop string."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tok, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix, self.read = 0, 0  # ids[prefix:read] were decoded last time as context
        self.text = ""  # all text decoded so far (complete characters)
        self.sent = 0  # characters already handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Add a token; return the new text that is safe to show."""
        self.ids.append(token_id)
        # Decode a sliding tail with some context, so that tokenizers that merge spaces across tokens
        # still give the right delta, and an incomplete UTF-8 sequence waits for the next token.
        before = self.tok.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = self.tok.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        for s in self.stop:
            i = self.text.find(s, max(0, self.sent - len(s)))
            if i != -1:
                self.text, self.stopped = self.text[:i], True
                break
        hold = 0 if self.stopped else self._hold()
        end = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent : end], end
        return out

    def _hold(self) -> int:
        """Characters at the end of the text that are a prefix of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    best = max(best, k)
                    break
        return best

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out
