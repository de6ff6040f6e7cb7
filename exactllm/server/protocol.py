"""OpenAI request schemas (pydantic) and the response bodies built from engine outputs.

Fields we accept but do not implement (presence_penalty, user, ...) are ignored, as the
OpenAI API tolerates them; fields with a wrong type or out-of-range value are a 400.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from exactllm.sampling_params import SamplingParams

MAX_N = 16          # choices per prompt
MAX_STOP = 16       # stop strings per request
MAX_LOGPROBS = 20


class APIError(Exception):
    """An error answered with an OpenAI-style body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints."""
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: StrictInt = Field(default=1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: StrictInt | None = None
    # extensions (vLLM spells them the same way)
    top_k: StrictInt = Field(default=0, ge=0)
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] = Field(default_factory=list)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    def sampling_params(self, max_tokens: int, want_logprobs: bool) -> SamplingParams:
        """max_tokens: resolved by the caller (the request's, an endpoint default, or what the
        context leaves after the prompt)."""
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, seed=self.seed, stop=list(self.stop or []),
                              stop_token_ids=list(self.stop_token_ids), ignore_eos=self.ignore_eos,
                              logprobs=want_logprobs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False

    def prompts(self) -> list:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if isinstance(p[0], int):
            return [p]
        if any(len(x) == 0 for x in p):
            raise APIError(400, "prompt must not contain an empty prompt", param="prompt")
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[StrictStr, list[dict], None] = None

    def text(self) -> str:
        """Text content; list-of-parts content is accepted when every part is text."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)

    def rendered_messages(self) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


# ------------------------------------------------------------------ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokens: list[str], logprobs: list[float], offset: int) -> dict:
    """Legacy completions logprobs. The engine reports the sampled token's log-probability only,
    so each top_logprobs entry holds just that token."""
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": logprobs,
            "top_logprobs": [{t: lp} for t, lp in zip(tokens, logprobs)], "text_offset": offsets}


def chat_logprobs(tokens: list[str], logprobs: list[float], top: bool) -> dict:
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8", "replace")),
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8", "replace"))}]
                         if top else []} for t, lp in zip(tokens, logprobs)]}


def completion_body(rid: str, model: str, created: int, choices: list[dict], usage_: dict | None,
                    chunk: bool = False) -> dict[str, Any]:
    body = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


def chat_body(rid: str, model: str, created: int, choices: list[dict], usage_: dict | None,
              chunk: bool = False) -> dict[str, Any]:
    body = {"id": rid, "object": "chat.completion.chunk" if chunk else "chat.completion", "created": created,
            "model": model, "choices": choices}
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


# json.dumps with these arguments builds a new JSONEncoder per call; one instance is reused instead.
_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_string = json.encoder.encode_basestring  # what that encoder writes for a str (ensure_ascii=False)


def _number(x) -> str:
    return float.__repr__(x) if type(x) is float and math.isfinite(x) else _compact(x)  # as json writes it


def completion_choice_json(index: int, text: str, tokens: list[str] | None, logprobs: list[float] | None,
                           offset: int, finish_reason: str | None) -> str:
    """_compact({"index", "text", "logprobs": completion_logprobs(tokens, logprobs, offset) or None
    without tokens, "finish_reason"}), written out directly: a stream of one token per chunk
    spent more time in the generic encoder than anywhere else on its way out."""
    if tokens is None:
        lp = "null"
    else:
        toks, lps, offsets, pos = [_string(t) for t in tokens], [_number(x) for x in logprobs], [], offset
        for t in tokens:
            offsets.append(str(pos))
            pos += len(t)
        lp = (f'{{"tokens":[{",".join(toks)}],"token_logprobs":[{",".join(lps)}],"top_logprobs":['
              f'{",".join(f"{{{t}:{x}}}" for t, x in zip(toks, lps))}],"text_offset":[{",".join(offsets)}]}}')
    finish = "null" if finish_reason is None else _string(finish_reason)
    return f'{{"index":{index},"text":{_string(text)},"logprobs":{lp},"finish_reason":{finish}}}'


class ChunkEncoder:
    """The SSE lines of one streamed response: ``enc(choices, usage)`` is
    ``data: <completion_body/chat_body(..., chunk=True) as JSON>``. The fields every chunk
    shares are serialized once, the per-token part with compact separators."""

    def __init__(self, rid: str, model: str, created: int, object_: str):
        d = json.dumps
        self._head = f'data: {{"id":{d(rid)},"object":{d(object_)},"created":{created},"model":{d(model)},"choices":'

    def encoded(self, choices_json: str) -> str:
        """The line of a chunk whose choices are given as JSON already (no usage)."""
        return f"{self._head}{choices_json}}}\n\n"

    def __call__(self, choices: list[dict], usage_: dict | None = None) -> str:
        tail = "" if usage_ is None else ',"usage":' + _compact(usage_)
        return f"{self._head}{_compact(choices)}{tail}}}\n\n"


def now() -> int:
    return int(time.time())
