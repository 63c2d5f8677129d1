"""The `adore` command line: generate, ppl, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adore.cli import main

EMMA = Path(__file__).resolve().parents[1] / "data" / "austen" / "emma.txt"


def test_ppl_full_equals_transformers_forward(smollm2, capsys):
    """`adore ppl --policy full` streams one token per step through the engine; the perplexity equals
    a plain transformers forward pass over the same tokens."""
    model, tok, _ = smollm2
    assert main(["ppl", "--policy", "full", "--text-file", str(EMMA), "--offset", "100",
                 "--tokens", "256", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ids = tok.encode(EMMA.read_text(), add_special_tokens=False)[100:356]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    ref = math.exp(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item())
    assert res["tokens"] == 255 and res["policy"] == "full"
    assert abs(res["ppl"] - ref) / ref < 0.005
    assert res["peak_cache_tokens"] == 255  # the last token is scored, never fed


def test_ppl_bounded_reports_budget(capsys):
    assert main(["ppl", "--model", "random:tiny", "--policy", "adore", "--cache-size", "16",
                 "--text-file", str(EMMA), "--tokens", "80", "--quiet", "--rebuild-mode", "every"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("ppl", "tokens", "policy", "cache_size", "peak_cache_tokens"):
        assert key in res
    assert res["cache_size"] == 16 and res["peak_cache_tokens"] == 16 and res["rebuilt"] > 0
    assert math.isfinite(res["ppl"])


def test_generate_prints_text(capsys):
    assert main(["generate", "--model", "random:tiny", "--policy", "h2o", "--cache-size", "8",
                 "--max-tokens", "20", "--prompt", "hello there"]) == 0
    assert "tokens in" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["generate", "--model", "nope", "--prompt", "hi"], "unknown model"),
    (["generate", "--policy", "nope", "--prompt", "hi"], "unknown policy"),
    (["generate", "--prompt", "  "], "prompt is empty"),
    (["generate", "--prompt-file", "/no/such/file"], "file not found"),
    (["generate", "--cache-size", "0", "--prompt", "hi"], "cache size"),
    (["generate", "--max-tokens", "0", "--prompt", "hi"], "max-tokens"),
    (["generate", "--model", "random:tiny", "--max-prefill-tokens", "0", "--prompt", "hi"], "max_prefill_tokens"),
    (["generate", "--top-k", "many", "--prompt", "hi"], "top-k"),
    (["generate", "--controller", "/no/such.safetensors", "--prompt", "hi"], "controller file"),
    (["ppl", "--text-file", "/no/such/file"], "file not found"),
    (["ppl", "--model", "random:tiny", "--text-file", str(EMMA), "--offset", "99999999"], "only"),
    (["ppl", "--text-file", str(EMMA), "--tokens", "1"], "tokens"),
    (["frobnicate"], "invalid choice"),
])
def test_user_errors_are_one_line_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adore: error:") and needle in err and "\n" not in err


def test_console_script_exit_code():
    r = subprocess.run([sys.executable, "-m", "adore.cli", "generate", "--policy", "nope", "--prompt", "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
