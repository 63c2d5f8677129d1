"""QLoRA top-K fine-tuning at Llama-2-7B shapes on one GPU, then the adapter served by the engine.

    python bench/finetune_gpu.py --out bench/results/finetune_gpu.json     # on a GPU machine
    python bench/finetune_gpu.py --model random:tiny --device cpu --dtype float32 --steps 3 \
        --seq-len 64 --ppl-tokens 64 --out /tmp/ft.json                     # CPU smoke

Runs `adore finetune` (nf4 base via bitsandbytes, LoRA via peft, top-96 attention in training) on
`random:llama2-7b` in bf16 over four Austen novels, then `adore ppl` on the held-out novel with the
engine with and without `--adapter`, and records step time, peak GPU memory, losses and the two
perplexities. The weights are random (no checkpoint reaches these machines), so the figures show
that the 7B path runs, what it costs and that the adapter loads and changes the model; they say
nothing about Llama-2's quality.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [f"data/austen/{n}.txt" for n in ("emma", "mansfieldpark", "prideprejudice", "sensesensibility")]
HELDOUT = "data/austen/northangerabbey.txt"


def adore(*args: str) -> dict:
    """Run the adore CLI; its last stdout line is a JSON summary."""
    cmd = [sys.executable, "-m", "adore.cli", *args]
    print("$ adore", " ".join(args), flush=True)
    res = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:llama2-7b")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--top-k", default="96")
    p.add_argument("--ppl-tokens", type=int, default=1024)
    p.add_argument("--policy", default="sink", help="engine policy for the ppl check")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default="bench/results/finetune_gpu.json")
    a = p.parse_args(argv)

    base = ["--model", a.model, "--device", a.device, "--dtype", a.dtype]
    with tempfile.TemporaryDirectory() as adapter:
        train = adore("finetune", *base, "--text-files", *TRAIN, "--seq-len", str(a.seq_len),
                      "--batch", str(a.batch), "--steps", str(a.steps), "--top-k", a.top_k, "--out", adapter)
        report = json.loads((Path(adapter) / "adore_finetune.json").read_text())
        ppl_args = ["ppl", *base, "--policy", a.policy, "--text-file", HELDOUT, "--tokens", str(a.ppl_tokens),
                    "--quiet"]
        before = adore(*ppl_args)
        after = adore(*ppl_args, "--adapter", adapter)
        adapter_mib = sum(f.stat().st_size for f in Path(adapter).iterdir()) / 2**20
    out = {"command": "python bench/finetune_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "finetune": report, "summary": train, "adapter_mib": round(adapter_mib, 1),
           "heldout_ppl": {"policy": a.policy, "tokens": a.ppl_tokens, "base": before["ppl"],
                           "with_adapter": after["ppl"]},
           "ppl_runs": {"base": before, "with_adapter": after}}
    path = ROOT / a.out if not Path(a.out).is_absolute() else Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"summary": train, "heldout_ppl": out["heldout_ppl"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
