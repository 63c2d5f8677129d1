"""ADORE: adaptive token release for Llama-family transformers models.

A bounded KV cache per sequence (at most `cache_size` tokens, the same set in every layer), a GRU
controller that scores past tokens, rebuild of the best released tokens, and top-K sparse attention.

    from adore import Engine, AdoreConfig, SamplingParams, load_model, make_policy
"""

from .config import AdoreConfig, SamplingParams, UserError

__all__ = ["AdoreConfig", "SamplingParams", "UserError", "Engine", "load_model", "make_policy"]
__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import adore.kernels` should not import transformers
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name == "load_model":
        from .models import load_model

        return load_model
    if name == "make_policy":
        from .policies import make_policy

        return make_policy
    raise AttributeError(name)
