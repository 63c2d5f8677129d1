"""Controller labels from full attention: which earlier tokens each query attends to most.

For a sequence ids [T], the label of (query t, token i <= t) is "i is among the top-K entries of t's
full-attention weights averaged over layers and heads". We store, per query, the `keep` (>= K)
largest averaged weights and their positions: the first K are the positive labels, the rest give
attention-mass coverage figures at a budget m (keep = m).

Streaming: one dense forward stores each layer's post-RoPE queries and keys ([L, H, T, D], linear in
T); a second pass walks query chunks of `chunk` rows, summing softmax(q k^T) over layers and heads
for that chunk only, so at most [H, chunk, T] attention is held at a time, never T x T per layer.
Long texts are cut into independent segments of `seq_len` tokens, each starting at position 0 like
`adore ppl`'s streams.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from ..attention import attention_scale, causal_attention, decoder_parts, run_layers


@dataclass
class LabelConfig:
    top_k: int = 96  # K: positives per query
    keep: int = 192  # weights stored per query (>= top_k): coverage at budget m = keep
    layers: str = "all"  # "all", or a python slice "a:b" of layer indices to average over
    chunk: int = 256  # query rows per attention chunk
    seq_len: int = 2048  # segment length for long texts

    def layer_ids(self, n_layers: int) -> list[int]:
        if self.layers == "all":
            return list(range(n_layers))
        a, _, b = self.layers.partition(":")
        return list(range(n_layers))[slice(int(a) if a else None, int(b) if b else None)]


@torch.no_grad()
def collect_qk(model, ids: torch.Tensor, layer_ids: list[int]):
    """Dense causal forward of ids [T]; returns q [L', Hq, T, D], k [L', Hkv, T, D] (post-RoPE) of
    the layers layer_ids and the attention scale."""
    scale = attention_scale(model)
    qs, ks = [], []

    def attend(i, q, k, v):
        if i in layer_ids:
            qs.append(q[0])
            ks.append(k[0])
        return causal_attention(q, k, v, scale)

    pos = torch.arange(ids.shape[0], device=ids.device)[None]
    run_layers(model, decoder_parts(model)[0](ids[None]), pos, attend, n_layers=max(layer_ids) + 1)
    return torch.stack(qs), torch.stack(ks), scale


def averaged_attention_rows(q: torch.Tensor, k: torch.Tensor, scale: float, t0: int, t1: int) -> torch.Tensor:
    """Mean over layers and heads of the causal attention of queries t0..t1-1 over all T keys.

    q [L, Hq, T, D], k [L, Hkv, T, D] -> [t1 - t0, T] float32 (zeros after each query's position)."""
    L, Hq, T, _ = q.shape
    G = Hq // k.shape[1]
    rows = torch.arange(t0, t1, device=q.device)
    future = torch.arange(T, device=q.device)[None, :] > rows[:, None]
    acc = torch.zeros(t1 - t0, T, device=q.device)
    for layer in range(L):
        kk = k[layer].repeat_interleave(G, 0)  # [Hq, T, D]
        s = torch.matmul(q[layer, :, t0:t1].float(), kk.float().transpose(-1, -2)) * scale
        acc += torch.softmax(s.masked_fill(future, float("-inf")), -1).sum(0)
    return acc / (L * Hq)


@torch.no_grad()
def attention_topk(model, ids: torch.Tensor, cfg: LabelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels of one sequence ids [T]: idx [T, keep] int16 (positions, -1 where t < keep - 1 leaves
    fewer tokens) and val [T, keep] float16 (averaged weights), each row sorted by weight desc."""
    lids = cfg.layer_ids(model.config.num_hidden_layers)
    q, k, scale = collect_qk(model, ids, lids)
    T = ids.shape[0]
    keep = min(cfg.keep, T)
    idx = torch.full((T, cfg.keep), -1, dtype=torch.int16)
    val = torch.zeros(T, cfg.keep, dtype=torch.float16)
    for t0 in range(0, T, cfg.chunk):
        t1 = min(T, t0 + cfg.chunk)
        a = averaged_attention_rows(q, k, scale, t0, t1)
        rows = torch.arange(t0, t1)
        a = a.masked_fill(torch.arange(T)[None] > rows[:, None], -1.0)  # future never ranks
        top = a.topk(keep, dim=-1)
        ok = top.values >= 0
        idx[t0:t1, :keep] = torch.where(ok, top.indices, -1).to(torch.int16).cpu()
        val[t0:t1, :keep] = top.values.clamp(min=0).to(torch.float16).cpu()
    return idx, val


def segments(tok, texts: list[str], seq_len: int, max_segments: int | None = None,
             per_text: int | None = None) -> list[torch.Tensor]:
    """Cut each text's tokens into segments of seq_len ([seq_len] long each), spread evenly over the
    text when per_text limits how many a text gives."""
    out = []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        n = len(ids) // seq_len
        starts = [i * seq_len for i in range(n)]
        if per_text is not None and n > per_text:
            starts = [starts[round(j * (n - 1) / max(1, per_text - 1))] for j in range(per_text)]
        out += [torch.tensor(ids[s : s + seq_len]) for s in starts]
    return out[:max_segments] if max_segments else out


def self_generated(model, tok, prompts: list[torch.Tensor], new_tokens: int, batch: int = 64,
                   progress: bool = True) -> list[torch.Tensor]:
    """Each prompt followed by the model's own greedy continuation under full attention
    ([len(prompt) + new_tokens] each): the text a served model attends over while it generates,
    which (greedy, small model) repeats itself far more than the books it was prompted from."""
    from ..config import AdoreConfig, SamplingParams
    from ..engine import Engine
    from ..policies import make_policy

    eng = Engine(model, tok, make_policy("full", AdoreConfig()), max_batch=min(batch, len(prompts)),
                 max_seq_len=max(len(p) for p in prompts) + new_tokens + 1)
    with tqdm(total=len(prompts) * new_tokens, desc="generate", unit="tok", disable=not progress) as bar:
        outs = eng.generate([p.tolist() for p in prompts], SamplingParams(max_tokens=new_tokens, ignore_eos=True),
                            progress=lambda o: bar.update(len(o)))
    return [torch.cat([p, torch.tensor(o.token_ids, dtype=p.dtype)]) for p, o in zip(prompts, outs)]


def build_dataset(model, seqs: list[torch.Tensor], cfg: LabelConfig, progress: bool = True) -> dict:
    """Labels for many segments: {"ids" [N, T] int32, "idx" [N, T, keep] int16, "val" [N, T, keep]
    float16}, plus the config (as `save_dataset` stores it)."""
    dev = next(model.parameters()).device
    idx, val = [], []
    for s in tqdm(seqs, desc="labels", unit="seq", disable=not progress):
        i, v = attention_topk(model, s.to(dev), cfg)
        idx.append(i)
        val.append(v)
    return {"ids": torch.stack(seqs).to(torch.int32), "idx": torch.stack(idx), "val": torch.stack(val),
            "config": asdict(cfg)}


def save_dataset(data: dict, path: str) -> None:
    import json

    from safetensors.torch import save_file

    save_file({k: data[k].contiguous() for k in ("ids", "idx", "val")}, path,
              {"label_config": json.dumps(data["config"])})


def load_dataset(path: str) -> dict:
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    data = load_file(path)
    data["config"] = json.loads(meta.get("label_config", "{}"))
    return data


def dense_labels(idx: torch.Tensor, top_k: int, T: int) -> torch.Tensor:
    """idx [..., Tq, keep] positions -> [..., Tq, T] bool: the first top_k positions of each row."""
    top = idx[..., :top_k].long()
    out = torch.zeros(*top.shape[:-1], T + 1, dtype=torch.bool)
    out.scatter_(-1, torch.where(top >= 0, top, T), True)
    return out[..., :T]
