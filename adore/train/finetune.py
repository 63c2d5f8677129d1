"""Stage 1: QLoRA fine-tuning with top-K attention, so the model tolerates sparse attention.

The base model's Linear layers become bitsandbytes nf4 `Linear4bit` (frozen), LoRA adapters (peft) are
trained on them, and every attention row keeps only its top-K keys per head during training (the
same rule as the engine's slot attention: scores below the K-th largest allowed one are masked, ties
kept). The loss is next-token cross-entropy on the text (the paper's stage 1), or with `distill` the
KL divergence from the same base model's dense-attention predictions: the adapter then learns to make
top-K attention say what full attention would have said, which is what fidelity to the served base
model asks for (cross-entropy also moves the model toward the training text). The adapter is saved
with peft (`adapter_model.safetensors` + `adapter_config.json`) plus `adore_finetune.json`;
`apply_adapter` merges it into a loaded model's weights, so the engine, which calls q_proj/k_proj/...
directly, runs the adapted model unchanged.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm import tqdm

from ..kernels import keep_top_k
from ..models import ModelInfo

ATTN_NAME = "adore_topk"
# attention module -> the K its rows keep (None: dense causal), set by set_topk_attention. Keyed by the
# module (weakly: a dropped model leaves no entry) so that the K is ours, not an attribute on the
# transformers model or its config, and a layer can have its own.
_TOP_K: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class FinetuneConfig:
    top_k: int | None = 96  # keys per query row in training (None: dense)
    seq_len: int = 512
    steps: int = 200
    batch: int = 1
    lr: float = 2e-4
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    quantize: bool = True  # nf4 base (QLoRA); False: LoRA on the full-precision base
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    seed: int = 0
    # loss: False = next-token cross-entropy on the text (the paper's stage 1); True = KL divergence
    # from the base model's own dense-attention next-token distribution, so the adapter learns to
    # make top-K attention reproduce what full attention would have said (fidelity to the base model)
    distill: bool = False
    # with distill: weight of an argmax-margin term (see distill_loss). Greedy decoding follows only
    # the argmax, so this spends the adapter's capacity on the near-ties that flip it rather than on
    # the whole distribution's tail
    hard: float = 0.0


def topk_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kw):
    """Causal attention keeping each row's top-K keys per head, K the one set_topk_attention gave this
    attention module (transformers attention interface).

    query [B, Hq, T, D], key/value [B, Hkv, S, D] -> (out [B, T, Hq, D], weights [B, Hq, T, S]).
    The padding mask is ignored: training sequences are unpadded."""
    G = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(G, 1)
    v = value.repeat_interleave(G, 1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    s = torch.matmul(query, k.transpose(-1, -2)).float() * scaling
    T, S = s.shape[-2:]
    future = torch.arange(S, device=s.device)[None, :] > torch.arange(S - T, S, device=s.device)[:, None]
    s = s.masked_fill(future, float("-inf"))
    if module not in _TOP_K:
        raise RuntimeError(f"attention {ATTN_NAME!r} runs only in a model given to set_topk_attention")
    p = torch.softmax(keep_top_k(s, _TOP_K[module]), -1).to(query.dtype)
    return torch.matmul(p, v).transpose(1, 2).contiguous(), p


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, topk_attention)
    try:  # the mask builder for our name: the same as sdpa's (we build our own causal mask anyway)
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    except Exception:
        pass


def set_topk_attention(model, top_k: int | None, per_layer: dict[int, int | None] | None = None) -> None:
    """Route the model's attention through `topk_attention` with K = top_k (None: dense causal), or
    per_layer[i] in decoder layer i where given (a later call without it clears it)."""
    _register()
    per_layer = per_layer or {}
    for i, layer in enumerate(model.model.layers):
        _TOP_K[layer.self_attn] = per_layer.get(i, top_k)
    model.set_attn_implementation(ATTN_NAME)


@contextmanager
def dense_topk_attention(model):
    """Within: every layer of a model under set_topk_attention attends densely (K = None)."""
    attns = [layer.self_attn for layer in model.model.layers]
    saved = [_TOP_K[a] for a in attns]
    try:
        for a in attns:
            _TOP_K[a] = None
        yield
    finally:
        for a, k in zip(attns, saved):
            _TOP_K[a] = k


def quantize_nf4(model) -> None:
    """Replace every decoder Linear (not the LM head or embeddings) by a frozen bnb nf4 Linear4bit."""
    import bitsandbytes as bnb

    for _, mod in list(model.model.layers.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=child.weight.dtype, quant_type="nf4")
                # quantized by the .to(device) below (on the GPU for big models, or on the CPU)
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(mod, cname, q.to(child.weight.device))


def make_lora(model, cfg: FinetuneConfig, init: str | None = None):
    """The trainable peft model: nf4 base (if cfg.quantize) + LoRA on cfg.targets (or the adapter in
    directory init, trained further: its rank and targets win), top-K attention."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if cfg.quantize:
        quantize_nf4(model)
    set_topk_attention(model, cfg.top_k)
    if init:
        return PeftModel.from_pretrained(model, init, is_trainable=True)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.targets, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(cfg.seed)
    return get_peft_model(model, lcfg)


def finetune(model, seqs: list[torch.Tensor], cfg: FinetuneConfig, out_dir: str | None = None,
             progress: bool = True, meta: dict | None = None, init: str | None = None):
    """Train LoRA on token sequences seqs ([seq_len] each) with next-token loss (or, cfg.distill, KL
    from dense attention) under top-K attention, from a fresh adapter or the one in directory init.
    Returns (peft model, report); saves the adapter to out_dir if given."""
    torch.manual_seed(cfg.seed)
    pm = make_lora(model, cfg, init)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    data = torch.stack(seqs)
    dev = next(pm.parameters()).device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    losses, step_s, t0 = [], [], time.time()
    pm.train()
    bar = tqdm(range(cfg.steps), desc="finetune", unit="step", disable=not progress)
    for _ in bar:
        ts = time.perf_counter()
        b = data[torch.randint(len(data), (cfg.batch,))].to(dev)
        loss = distill_loss(pm, b, cfg.hard) if cfg.distill else pm(input_ids=b, labels=b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())  # .item() syncs the GPU: step_s is the whole step
        step_s.append(time.perf_counter() - ts)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    pm.eval()
    report = {"config": asdict(cfg), "steps": len(losses), "seconds": round(time.time() - t0, 1),
              "loss_first": losses[0] if losses else None,
              "loss_last10": sum(losses[-10:]) / max(1, len(losses[-10:])),
              "ppl_last10": math.exp(sum(losses[-10:]) / max(1, len(losses[-10:]))),
              # median step time after the first (which pays for kernel selection and allocator warm-up)
              "step_s_median": statistics.median(step_s[1:]) if len(step_s) > 1 else None,
              "trainable_params": sum(p.numel() for p in params), "device": str(dev), "init": init,
              **(meta or {})}
    if dev.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(dev)
        report["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    if out_dir:
        save_adapter(pm, out_dir, report)
    return pm, report


def dense_teacher_logits(pm, ids: torch.Tensor) -> torch.Tensor:
    """The base model's logits [B, T, V] with the adapter off and dense causal attention."""
    with torch.no_grad(), pm.disable_adapter(), dense_topk_attention(pm.get_base_model()):
        return pm(input_ids=ids).logits.float()


def argmax_margin(logp: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """logp[n, token[n]] minus the largest other entry of row n: > 0 where token is the argmax. [N, V] -> [N]"""
    own = logp.gather(-1, token[:, None])[:, 0]
    return own - logp.scatter(-1, token[:, None], float("-inf")).amax(-1)


def distill_loss(pm, ids: torch.Tensor, hard: float = 0.0, cap: float = 1.0) -> torch.Tensor:
    """Mean over positions of KL(dense base || adapted model under top-K attention), ids [B, T], plus
    hard x a hinge on the argmax: where the adapted model's margin of the dense argmax token over its
    best rival falls short of the dense model's own margin (capped at cap nats), the shortfall. It is
    zero once every argmax agrees with room to spare, so unlike cross-entropy toward the argmax it
    does not sharpen the distribution where greedy decoding is already safe."""
    teacher = torch.log_softmax(dense_teacher_logits(pm, ids), -1).flatten(0, 1)  # [B*T, V]
    student = torch.log_softmax(pm(input_ids=ids).logits.float(), -1).flatten(0, 1)
    loss = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")
    if hard:
        top = teacher.argmax(-1)
        want = argmax_margin(teacher, top).clamp(max=cap)
        loss = loss + hard * torch.relu(want - argmax_margin(student, top)).mean()
    return loss


def save_adapter(pm, out_dir: str, report: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    pm.save_pretrained(out_dir, safe_serialization=True)
    with open(os.path.join(out_dir, "adore_finetune.json"), "w") as f:
        json.dump(report, f, indent=1)


def apply_adapter(model, info: ModelInfo, path: str):
    """Load a LoRA adapter (from `finetune`) onto a model from adore.models.load_model and merge it
    into the base weights (Linear layers stay plain Linear: the engine runs unchanged).
    Returns (merged model, info with the top-K the adapter was trained under, from its report)."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(model, path, is_trainable=False).merge_and_unload()
    merged.eval().requires_grad_(False)
    report = os.path.join(path, "adore_finetune.json")
    if os.path.exists(report):
        with open(report) as f:
            info = replace(info, tuned_top_k=json.load(f).get("config", {}).get("top_k"))
    return merged, info
