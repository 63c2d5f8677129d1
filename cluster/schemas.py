"""OpenAI request schemas (strictly typed: a string where a number belongs is a 400) and responses.

Supported: one prompt (a string, or a list of token ids, or a one-element list of strings), n = 1,
max_tokens, temperature, top_p, stop, seed, stream (+ stream_options.include_usage), user. Extension:
ignore_eos (generate exactly max_tokens tokens; benchmarks use it). Other OpenAI fields are accepted
and ignored when they are at their neutral value (penalties 0, logit_bias empty), refused otherwise.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from .errors import bad_request

Number = StrictFloat | StrictInt


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
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
    prompt: StrictStr | list[StrictInt] | list[StrictStr]
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
    logprobs: StrictBool | None = None
    tools: None = None

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
