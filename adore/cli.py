"""The `adore` command line.

    adore generate --model smollm2-135m --policy adore --max-tokens 64 --prompt "..." [--chat]
    adore ppl --policy adore --text-file data/austen/emma.txt --offset 0 --tokens 2048

Other packages add subcommands through the entry-point group `adore.commands` (e.g. `adore serve`
from cluster/, `adore report` from jobs/), so this package never imports them.

User mistakes print one line, `adore: error: ...`, and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import fields
from importlib.metadata import entry_points

from .config import (
    MAX_PREFILL_TOKENS,
    MAX_PREFILL_TOKENS_CPU,
    AdoreConfig,
    SamplingParams,
    UserError,
    knob_values,
    parse_field,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage too)
        raise UserError(message)


def add_knob_args(g, names: tuple[str, ...] | None = None) -> None:
    """One flag per AdoreConfig field (--cache-size, --top-k, ...), or per field in `names`: type,
    default, choices and help come from the dataclass, so a new knob needs no change here."""
    for f in fields(AdoreConfig):
        if names is not None and f.name not in names:
            continue

        def parse(s, f=f):
            try:
                return parse_field(f, s)
            except (KeyError, TypeError, ValueError):
                raise argparse.ArgumentTypeError(f"invalid {f.name.replace('_', '-')} {s!r}") from None

        choices = f.metadata.get("choices")
        g.add_argument("--" + f.name.replace("_", "-"), type=parse, default=f.default, choices=choices,
                       metavar="{" + ",".join(choices) + "}" if choices else None,
                       # %(default)s: the parser's default, also where a script changed it (set_defaults)
                       help=f"{f.metadata['help']} (default %(default)s)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Model and method options shared by every command that runs the engine."""
    g = p.add_argument_group("model and method")
    g.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (default), random:<shape>, or a local HF checkpoint directory")
    g.add_argument("--policy", default="adore", help="full, window, strided, sink, h2o, adore, "
                   "adore-norebuild, adore-nocontroller")
    add_knob_args(g)
    g.add_argument("--controller", default=None, help="controller checkpoint (.safetensors); default: "
                   "the one shipped for the model, else a fresh one")
    g.add_argument("--adapter", default=None, help="LoRA adapter directory from `adore finetune`")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--device", default="cpu")
    g.add_argument("--max-seq-len", type=int, default=None, help="engine context capacity")
    g.add_argument("--max-prefill-tokens", type=int, default=None,
                   help="prompt tokens prefilled per engine step, in one packed forward; longer prompts "
                   f"are chunked over steps (default by device: {MAX_PREFILL_TOKENS} on a GPU, "
                   f"{MAX_PREFILL_TOKENS_CPU} on a CPU)")


def load_parts(args):
    """(model, tokenizer, ModelInfo, policy) from parsed `add_model_args` options."""
    from .models import load_model
    from .policies import make_policy

    # validates the name and the numbers before the slow load
    policy = make_policy(args.policy, AdoreConfig(**knob_values(args)), args.controller)
    model, tok, info = load_model(args.model, dtype=args.dtype, device=args.device)
    if getattr(args, "adapter", None):
        from .train.finetune import apply_adapter

        if not os.path.isdir(args.adapter):
            raise UserError(f"adapter directory not found: {args.adapter}")
        model, info = apply_adapter(model, info, args.adapter)
    return model, tok, info, policy


def make_engine(args, parts, max_seq_len: int, max_batch: int = 1):
    from .engine import Engine

    model, tok, info, policy = parts
    return Engine(model, tok, policy, info=info, max_batch=max_batch, max_seq_len=args.max_seq_len or max_seq_len,
                  max_prefill_tokens=args.max_prefill_tokens)


def _read_file(path: str) -> str:
    if not os.path.isfile(path):
        raise UserError(f"file not found: {path}")
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def cmd_generate(args) -> int:
    prompt = args.prompt if args.prompt is not None else _read_file(args.prompt_file)
    if not prompt.strip():
        raise UserError("the prompt is empty")
    if args.max_tokens < 1:
        raise UserError("--max-tokens must be >= 1")
    parts = load_parts(args)
    tok = parts[1]
    if args.chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tok.encode(prompt, add_special_tokens=not args.chat)
    engine = make_engine(args, parts, max_seq_len=len(ids) + args.max_tokens)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop=args.stop or [])
    engine.add_request(ids, params)
    t0 = time.perf_counter()
    n = 0
    while engine.has_work():
        for out in engine.step():
            n += out.token_id is not None
            sys.stdout.write(out.text)
            sys.stdout.flush()
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    print(f"[{n} tokens in {dt:.2f}s, {n / dt:.1f} tok/s, policy {args.policy}, "
          f"peak cache {engine.stats['peak_cache_tokens']} tokens]", file=sys.stderr)
    return 0


def perplexity(engine, ids: list[int], progress: bool = True) -> dict:
    """Stream ids through the engine one token per step (teacher forcing) and score each next token."""
    from tqdm import tqdm

    params = SamplingParams(forced_tokens=ids[1:])
    rid = engine.add_request(ids[:1], params)
    bar = tqdm(total=len(ids) - 1, desc=f"ppl {engine.policy.name}", unit="tok", disable=not progress,
               file=sys.stderr)
    t0 = time.perf_counter()
    while engine.has_work():
        bar.update(len(engine.step()))
    bar.close()
    dt = time.perf_counter() - t0
    res = engine.result(rid)
    lps = res.logprobs
    nll = -sum(lps) / len(lps)
    return {"ppl": math.exp(nll), "nll": nll, "top1": round(sum(res.top1) / len(lps), 4),
            "tokens": len(lps), "seconds": round(dt, 3),
            "tokens_per_s": round(len(lps) / dt, 2), **engine.policy.describe(),
            "peak_cache_tokens": engine.stats["peak_cache_tokens"],
            "peak_step_tokens": engine.stats["peak_step_tokens"],
            "released": engine.stats["released"], "rebuilt": engine.stats["rebuilt"]}


def cmd_ppl(args) -> int:
    text = _read_file(args.text_file)
    if args.tokens < 2:
        raise UserError("--tokens must be >= 2")
    if args.offset < 0:
        raise UserError("--offset must be >= 0")
    engine = make_engine(args, load_parts(args), max_seq_len=args.tokens + 1)
    ids = engine.tok.encode(text, add_special_tokens=False)[args.offset : args.offset + args.tokens]
    if len(ids) < args.tokens:
        raise UserError(f"{args.text_file} has only {len(ids)} tokens after offset {args.offset}")
    res = perplexity(engine, ids, progress=not args.quiet)
    res.update(model=args.model, text_file=args.text_file, offset=args.offset)
    print(json.dumps(res))
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="adore", description="ADORE: adaptive token release for Llama-family models")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="generate text with a KV policy")
    add_model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-file")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.set_defaults(func=cmd_generate)

    q = sub.add_parser("ppl", help="perplexity of streamed text under the policy's bounded cache")
    add_model_args(q)
    q.add_argument("--text-file", required=True)
    q.add_argument("--offset", type=int, default=0, help="first token of the tokenized file")
    q.add_argument("--tokens", type=int, default=2048)
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_ppl)

    from .train.cli import register as register_train

    register_train(sub)
    for ep in entry_points(group="adore.commands"):
        try:
            ep.load()(sub)
        except ImportError as e:  # the extra that provides it is not installed
            c = sub.add_parser(ep.name, help=f"(unavailable: {e})")
            c.set_defaults(func=lambda a, e=e, n=ep.name: _missing(n, e))
    return p


def _missing(name, err):
    raise UserError(f"'adore {name}' needs an optional dependency: {err}")


def main(argv: list[str] | None = None) -> int:
    try:
        args = make_parser().parse_args(argv)
        return args.func(args)
    except UserError as e:
        print(f"adore: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
