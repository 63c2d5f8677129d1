"""OpenAI request schemas (strictly typed: a string where a number belongs is a 400) and responses.

Supported: one prompt (a string, or a list of token ids, or a one-element list of strings), n = 1,
max_tokens, temperature, top_p, stop, seed, stream (+ stream_options.include_usage), user. Extension:
ignore_eos (generate exactly max_tokens tokens; benchmarks use it). Other OpenAI fields are accepted
and ignored when they are at their neutral value (penalties 0, logit_bias empty, logprobs off,
response_format text, no tools), refused with a 400 naming the field otherwise; unknown fields are
ignored, as OpenAI's API does.

This is the one place where every number of a request is bounded to what the engine can honour,
for both endpoints (the engine's SamplingParams checks the same bounds again for library users).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from adore.config import MAX_TEMPERATURE, SEED_MAX, SEED_MIN

from .errors import bad_request

Number = StrictFloat | StrictInt
MAX_STOP_CHARS = 512  # per stop string: the detokenizer checks every prefix of each one per token
TOKEN_ID_MAX = 2**31 - 1  # beyond any vocabulary; the replica checks the model's own size


class Unsupported:
    """OpenAI fields this server accepts only at their neutral value: field -> allowed values."""

    def __init__(self, **neutral: tuple) -> None:
        self.neutral = neutral

    def check(self, data):
        """Raises the 400 itself (an ApiError passes through pydantic), so that it names the field."""
        if isinstance(data, dict):
            for name, ok in self.neutral.items():
                if name in data and data[name] not in ok:
                    raise bad_request(f"{name}: {str(data[name])[:100]} is not supported by this server "
                                      f"(accepted: {', '.join(repr(v) for v in ok)}, or leave it out)",
                                      param=name, code="unsupported_value")
        return data


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


CHAT_NEUTRAL_ONLY = Unsupported(
    logprobs=(None, False), top_logprobs=(None, 0), response_format=(None, {"type": "text"}),
    tools=(None, []), tool_choice=(None, "none"), functions=(None, []), function_call=(None, "none"),
    audio=(None,), modalities=(None, ["text"]), prediction=(None,))


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    max_tokens: StrictInt | None = None  # bounded by the model's context (ingress and replica)
    temperature: Annotated[Number, Field(ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    stop: Annotated[StrictStr, Field(max_length=MAX_STOP_CHARS)] | list[
        Annotated[StrictStr, Field(max_length=MAX_STOP_CHARS)]] | None = None
    seed: Annotated[StrictInt, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: Annotated[StrictInt, Field(ge=1, le=1)] = 1
    user: StrictStr | None = None
    presence_penalty: Annotated[Number, Field(ge=0, le=0)] = 0
    frequency_penalty: Annotated[Number, Field(ge=0, le=0)] = 0
    logit_bias: dict[str, Number] | None = Field(default=None, max_length=0)
    ignore_eos: StrictBool = False  # extension: never stop at EOS (benchmarks)

    def stop_list(self) -> list[str]:
        s = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(s) > 4:
            raise bad_request("stop: at most 4 stop sequences", param="stop")
        return [x for x in s if x]

    def sampling(self, max_tokens: int) -> dict:
        """Plain-data sampling parameters sent to the model replica."""
        return {"max_tokens": max_tokens, "temperature": float(self.temperature), "top_p": float(self.top_p),
                "seed": self.seed, "stop": self.stop_list(), "ignore_eos": self.ignore_eos}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: StrictStr | list[Annotated[StrictInt, Field(ge=0, le=TOKEN_ID_MAX)]] | list[StrictStr]
    echo: Literal[False] = False
    suffix: None = None
    logprobs: Literal[0] | None = None
    best_of: Literal[1] | None = None

    def prompt_value(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str):
            if len(p) != 1:
                raise bad_request("prompt: batched prompts are not supported; send one prompt per request",
                                  param="prompt")
            p = p[0]
        if (isinstance(p, str) and not p) or (isinstance(p, list) and not p):
            raise bad_request("prompt: the prompt is empty", param="prompt")
        return p


class ContentPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: StrictStr | list[ContentPart]
    name: StrictStr | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = None

    @model_validator(mode="before")
    @classmethod
    def _neutral_only(cls, data):
        return CHAT_NEUTRAL_ONLY.check(data)

    def chat_messages(self) -> list[dict]:
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]
        if not any(m["content"] for m in msgs):
            raise bad_request("messages: all messages are empty", param="messages")
        return msgs

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# -- responses ---------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, text: str, finish: str | None, use: dict, created: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], "usage": use}


def completion_chunk(rid: str, model: str, text: str, finish: str | None, created: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def chat(rid: str, model: str, text: str, finish: str | None, use: dict, created: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}], "usage": use}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None, created: int) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(rid: str, model: str, obj: str, use: dict, created: int) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def model_list(ids: list[str]) -> dict:
    now = int(time.time())
    return {"object": "list", "data": [{"id": i, "object": "model", "created": now, "owned_by": "adore"}
                                       for i in ids]}
