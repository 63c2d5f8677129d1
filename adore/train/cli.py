"""`adore train-controller` and `adore finetune` (registered by adore.cli).

    adore train-controller --model smollm2-135m --text-files novel1.txt novel2.txt --out ctrl.safetensors
    adore finetune --model smollm2-135m --text-files novel1.txt --out adapters/topk96 --steps 200
"""

from __future__ import annotations

import json
import os
import sys
import time

from ..config import UserError


def register(sub) -> None:
    """Add the training subcommands to the `adore` parser's subparsers."""
    t = sub.add_parser("train-controller", help="label attention with the full model and train the "
                       "GRU controller (safetensors + JSON report)")
    t.add_argument("--model", default="smollm2-135m")
    t.add_argument("--text-files", nargs="+", default=[], help="training text (cut into --seq-len segments)")
    t.add_argument("--labels", nargs="+", default=[], help="label files from --save-labels (skip labelling)")
    t.add_argument("--save-labels", default=None, help="write the collected labels here (.safetensors)")
    t.add_argument("--heldout-file", default=None, help="text to report held-out metrics on (first segment)")
    t.add_argument("--out", required=True, help="checkpoint path (.safetensors); the report goes to .json")
    t.add_argument("--seq-len", type=int, default=2048)
    t.add_argument("--self-generated", type=int, default=0, metavar="N",
                   help="label N of the model's own greedy continuations (full attention) of --prompt-len "
                        "prompts cut from the text files, --seq-len tokens in all, instead of the text")
    t.add_argument("--prompt-len", type=int, default=128, help="prompt tokens of --self-generated sequences")
    t.add_argument("--init", default=None, help="controller checkpoint to fine-tune (else a fresh one)")
    t.add_argument("--rows-from", type=int, default=0,
                   help="train and validate on query rows t >= this only (e.g. the budget m)")
    t.add_argument("--per-text", type=int, default=4, help="segments per text file, spread over it")
    t.add_argument("--top-k", type=int, default=96, help="K of the labels")
    t.add_argument("--budget", type=int, default=192, help="m for the coverage metrics")
    t.add_argument("--rebuild", type=int, default=8, help="R for the simulated cache in the metrics")
    t.add_argument("--layers", default="all", help="layers the labels average over: all or a:b")
    t.add_argument("--steps", type=int, default=600)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--listwise", type=float, default=0.0, help="weight of the listwise auxiliary loss")
    t.add_argument("--hidden", type=int, default=64, help="GRU state size")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None)
    t.set_defaults(func=cmd_train_controller)

    f = sub.add_parser("finetune", help="QLoRA (nf4 + LoRA) fine-tuning with top-K attention")
    f.add_argument("--model", default="smollm2-135m")
    f.add_argument("--text-files", nargs="+", required=True)
    f.add_argument("--out", required=True, help="adapter directory")
    f.add_argument("--top-k", type=lambda s: None if s.lower() == "none" else int(s), default=96)
    f.add_argument("--seq-len", type=int, default=512)
    f.add_argument("--steps", type=int, default=200)
    f.add_argument("--batch", type=int, default=1)
    f.add_argument("--lr", type=float, default=2e-4)
    f.add_argument("--lora-r", type=int, default=8)
    f.add_argument("--no-quantize", action="store_true", help="LoRA on the full-precision base")
    f.add_argument("--init-adapter", default=None, help="adapter directory to train further (its rank/targets)")
    f.add_argument("--distill", action="store_true",
                   help="loss: KL from the base model's dense-attention predictions (not the text's tokens)")
    f.add_argument("--hard", type=float, default=0.0,
                   help="with --distill: weight of a hinge keeping the dense model's argmax token on top")
    f.add_argument("--self-generated", type=int, default=0, metavar="N",
                   help="train on N sequences of a --prompt-len prompt from the text files followed by the "
                        "base model's greedy continuation (to --seq-len): the text it attends over when serving")
    f.add_argument("--prompt-len", type=int, default=128, help="prompt tokens of --self-generated sequences")
    f.add_argument("--device", default="cpu", help="cpu, or cuda (e.g. Llama-2 7B: --dtype bfloat16)")
    f.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=cmd_finetune)


def _texts(paths: list[str]) -> list[str]:
    out = []
    for p in paths:
        if not os.path.isfile(p):
            raise UserError(f"file not found: {p}")
        with open(p, encoding="utf-8", errors="replace") as f:
            out.append(f.read())
    return out


def interleaved_segments(tok, texts: list[str], seq_len: int, per_text: int) -> list:
    """per_text segments from each text, ordered text-interleaved (1st of each text, 2nd, ...)."""
    from .labels import segments

    per = [segments(tok, [t], seq_len, per_text=per_text) for t in texts]
    return [s[j] for j in range(max(map(len, per), default=0)) for s in per if j < len(s)]


def self_generated_from(model, tok, texts: list[str], args) -> list:
    """args.self_generated sequences: a --prompt-len prompt from the texts (interleaved) continued
    greedily by the model to --seq-len tokens."""
    from .labels import self_generated

    per = -(-args.self_generated // len(texts))
    prompts = interleaved_segments(tok, texts, args.prompt_len, per)[: args.self_generated]
    return self_generated(model, tok, prompts, args.seq_len - args.prompt_len) if prompts else []


def cmd_train_controller(args) -> int:
    import torch

    from ..controller import ControllerConfig
    from ..models import load_model
    from .controller import TrainConfig, save_checkpoint, train_controller
    from .labels import LabelConfig, build_dataset, load_dataset, save_dataset, segments

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.text_files and not args.labels:
        raise UserError("give --text-files (to label) or --labels (collected before)")
    t0 = time.time()
    model, tok, _ = load_model(args.model)
    lcfg = LabelConfig(top_k=args.top_k, keep=max(args.top_k, args.budget), layers=args.layers,
                       seq_len=args.seq_len)
    parts = []
    for path in args.labels:
        if not os.path.isfile(path):
            raise UserError(f"label file not found: {path}")
        parts.append(load_dataset(path))
    init = None
    if args.init:
        if not os.path.isfile(args.init):
            raise UserError(f"controller checkpoint not found: {args.init}")
        from ..controller import Controller

        init = Controller.load(args.init)
    if not 0 <= args.rows_from < args.seq_len:
        raise UserError(f"--rows-from must be in [0, --seq-len), got {args.rows_from}")
    if args.self_generated and not 0 < args.prompt_len < args.seq_len:
        raise UserError("--self-generated needs 0 < --prompt-len < --seq-len")
    if args.text_files:
        texts = _texts(args.text_files)
        if args.self_generated:
            seqs = self_generated_from(model, tok, texts, args)
        else:
            seqs = interleaved_segments(tok, texts, args.seq_len, args.per_text)
        if not seqs:
            raise UserError(f"the text files hold no segment of {args.seq_len} tokens")
        parts.append(build_dataset(model, seqs, lcfg))
        if args.save_labels:
            save_dataset(parts[-1], args.save_labels)
    data = {k: torch.cat([p[k] for p in parts]) for k in ("ids", "idx", "val")}
    data["config"] = parts[0]["config"]
    heldout = None
    if args.heldout_file:
        seq = segments(tok, _texts([args.heldout_file]), args.seq_len, max_segments=1)
        heldout = build_dataset(model, seq, LabelConfig(**{**lcfg.__dict__, **data["config"]}))
    tcfg = TrainConfig(steps=args.steps, lr=args.lr, listwise=args.listwise, seed=args.seed,
                       top_k=args.top_k, budget=args.budget, rebuild=args.rebuild, row_min=args.rows_from)
    ccfg = ControllerConfig(embed_dim=model.config.hidden_size, hidden_dim=args.hidden)
    ctrl, report = train_controller(data, model.model.embed_tokens, tcfg, ccfg, heldout=heldout, init=init)
    report.update(model=args.model, text_files=args.text_files, label_files=args.labels, init=args.init,
                  self_generated=args.self_generated,
                  heldout_file=args.heldout_file, command="adore " + " ".join(sys.argv[1:]),
                  total_seconds=round(time.time() - t0, 1))
    save_checkpoint(ctrl, report, args.out)
    print(json.dumps({k: report[k] for k in report if k.endswith("metrics") or k == "best_val_loss"}))
    return 0


def cmd_finetune(args) -> int:
    from ..models import load_model
    from .finetune import FinetuneConfig, finetune
    from .labels import segments

    model, tok, _ = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.self_generated and not 0 < args.prompt_len < args.seq_len:
        raise UserError("--self-generated needs 0 < --prompt-len < --seq-len")
    if args.hard and not args.distill:
        raise UserError("--hard weighs a term of the --distill loss: give --distill too")
    texts = _texts(args.text_files)
    if args.self_generated:
        seqs = self_generated_from(model, tok, texts, args)
    else:
        seqs = segments(tok, texts, args.seq_len)
    if not seqs:
        need = args.prompt_len if args.self_generated else args.seq_len
        raise UserError(f"the text files hold no segment of {need} tokens")
    cfg = FinetuneConfig(top_k=args.top_k, seq_len=args.seq_len, steps=args.steps, batch=args.batch,
                         lr=args.lr, lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
                         quantize=not args.no_quantize, seed=args.seed, distill=args.distill, hard=args.hard)
    if args.init_adapter and not os.path.isfile(os.path.join(args.init_adapter, "adapter_config.json")):
        raise UserError(f"no adapter in {args.init_adapter} (adapter_config.json missing)")
    _, report = finetune(model, seqs, cfg, out_dir=args.out, init=args.init_adapter,
                         meta={"model": args.model, "text_files": args.text_files,
                               "self_generated": args.self_generated,
                               "command": "adore " + " ".join(sys.argv[1:])})
    print(json.dumps({k: report.get(k) for k in ("steps", "seconds", "step_s_median", "loss_first", "loss_last10",
                                                  "trainable_params", "peak_gpu_gib")}))
    return 0
