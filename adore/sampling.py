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


def pick_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """logits [V] -> token id. temperature 0 is greedy (argmax, lowest id on ties).

    Whatever the temperature, the probabilities stay finite: the logits are shifted so that their
    maximum is 0 before dividing (so nothing overflows to inf), and a row that still holds no usable
    probability (NaN logits from the model) falls back to the argmax instead of failing the step.
    """
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    x = logits.float()
    z = (x - x.max()) / max(float(temperature), 1e-30)
    probs = torch.softmax(z, dim=-1)
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0.0:
        return int(torch.argmax(logits))
    if top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = (torch.cumsum(sp, 0) - sp) >= top_p
        sp = sp.masked_fill(drop, 0.0)
        return int(si[torch.multinomial(sp, 1, generator=gen)])
    return int(torch.multinomial(probs, 1, generator=gen))


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
