"""The request side of the OpenAI-compatible API: strict JSON, pydantic models, errors.

`parse_body(raw)` reads JSON that has no NaN/Infinity literals and no numbers that overflow to
infinity; `parse_chat_request(body, ...)` validates a chat.completions body into a `ChatRequest`.
Every problem is an `ApiError` (HTTP status + an OpenAI-style error body), never an exception
that drops the connection.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import threading
from typing import Annotated, Any, Callable, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError

from sage_jax.rollout.sampling import SamplingParams
from sage_jax.rollout.steer import check_pins

__all__ = ["ApiError", "Overloaded", "ChatRequest", "ChatBody", "parse_body", "parse_chat_request", "MAX_N"]

MAX_N = 16  # choices per request
MAX_MESSAGES = 4096
MAX_STOP = 4
MAX_STOP_CHARS = 256
INT_LIMIT = 1 << 63


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


class Overloaded(ApiError):
    def __init__(self, message: str = "server overloaded: the request queue is full; retry later"):
        super().__init__(503, message, "server_overloaded")


# ---------------------------------------------------------------------------------------------
# JSON


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"the number {text[:40]} is out of range (numbers must be finite)")
    return v


def parse_body(raw: bytes) -> Any:
    """Strict JSON: NaN, Infinity and numbers beyond float range are errors (400)."""
    if not raw.strip():
        raise ApiError(400, "the body is empty: expected a JSON object")
    try:
        return json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; deep nesting recurses
        detail = str(e) if not isinstance(e, RecursionError) else "nested too deeply"
        raise ApiError(400, f"the body is not valid JSON: {detail}"[:300]) from None


# ---------------------------------------------------------------------------------------------
# Models


def _integral(v: Any) -> Any:
    """An integer, or a float with an integral value (2.0); never a bool or a string."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("must be an integer")
    if isinstance(v, float):
        if not math.isfinite(v) or v != int(v):
            raise ValueError("must be an integer")
        v = int(v)
    return v


def _number(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("must be a number")
    if not math.isfinite(float(v)):
        raise ValueError("must be a finite number")
    return float(v)


Int = Annotated[int, BeforeValidator(_integral)]
Num = Annotated[float, BeforeValidator(_number)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class SageExtension(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pin: dict[str, Any] | None = None
    return_latents: StrictBool = True


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class ChatBody(BaseModel):
    """A chat.completions body; unknown fields are ignored (as OpenAI-compatible servers do)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: str | None = None
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    n: Int = Field(1, ge=1, le=MAX_N)
    temperature: Num = Field(1.0, ge=0.0, le=2.0)
    top_p: Num = Field(1.0, ge=0.0, le=1.0)
    max_tokens: Int | None = Field(None, ge=1, le=INT_LIMIT)
    max_completion_tokens: Int | None = Field(None, ge=1, le=INT_LIMIT)
    stop: str | list[str] | None = None
    seed: Int | None = Field(None, ge=-INT_LIMIT, le=INT_LIMIT)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    sage: SageExtension | None = None
    # vLLM's extensions: sampling (what an endpoint policy sends for the paper's search settings)
    top_k: Int = Field(0, ge=-1, le=INT_LIMIT)
    repetition_penalty: Num = Field(1.0, gt=0.0, le=1000.0)
    min_tokens: Int = Field(0, ge=0, le=INT_LIMIT)
    continue_final_message: StrictBool = False
    add_generation_prompt: StrictBool = True


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    err = e.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"]) or "body"
    param = str(err["loc"][0]) if err["loc"] else None
    msg = err["msg"].removeprefix("Value error, ")
    more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
    return f"'{loc}': {msg}{more}", param


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"'stop' must be a string or a list of up to {MAX_STOP} strings of at most "
                            f"{MAX_STOP_CHARS} characters", param="stop")
    return tuple(s for s in stops if s)


# ---------------------------------------------------------------------------------------------
# The validated request


@dataclasses.dataclass(eq=False)
class ChatRequest:
    """One validated chat request as the engine sees it.

    The server sets `emit` (thread-safe: the engine calls it from its thread with `engine`
    events) and sets `cancelled` when the client left or the request timed out.
    """

    messages: list[dict]
    n: int = 1
    sampling: SamplingParams = SamplingParams(temperature=1.0)
    seed: int | None = None
    pins: dict | None = None
    sage: bool = False  # the `sage` extension was given: strip latents, return them
    stream: bool = False
    prefill: str | None = None  # continue_final_message: the partial assistant message to continue
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    emit: Callable[[Any], None] | None = None
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    base_seed: int = dataclasses.field(default_factory=lambda: random.getrandbits(31))

    @property
    def group_key(self) -> tuple:
        """Requests one steer() call can serve together (one rollout.generate per phase)."""
        return (self.sampling.greedy, self.sampling.top_k)

    def row_seeds(self) -> list[int]:
        base = self.seed if self.seed is not None else self.base_seed
        return [(int(base) * 1_000_003 + j) % (1 << 31) for j in range(self.n)]

    def cancel(self) -> None:
        self.cancelled.set()


def _messages(body: ChatBody) -> list[dict]:
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]


def _continuation(body: ChatBody, messages: list[dict]) -> tuple[list[dict], str | None]:
    """vLLM's continue_final_message: (history, the partial assistant message) or (messages, None)."""
    if not body.continue_final_message:
        if not body.add_generation_prompt:
            raise ApiError(400, "add_generation_prompt: false is only supported with continue_final_message: true",
                           param="add_generation_prompt")
        return messages, None
    if body.add_generation_prompt:
        raise ApiError(400, "continue_final_message needs add_generation_prompt: false (they cannot both be "
                            "true)", param="add_generation_prompt")
    if messages[-1]["role"] != "assistant":
        raise ApiError(400, "continue_final_message: the last message must be an assistant message",
                       param="messages")
    if body.sage is not None:
        raise ApiError(400, "continue_final_message cannot be combined with the 'sage' extension", param="sage")
    return messages[:-1], messages[-1]["content"]


def parse_chat_request(body: Any, *, default_max_tokens: int, max_tokens_limit: int) -> ChatRequest:
    """Validate an OpenAI chat.completions body into a `ChatRequest` (ApiError 400 if bad).
    max_tokens above `max_tokens_limit` is clamped to it (as before; vLLM would refuse)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        b = ChatBody.model_validate(body)
    except ValidationError as e:
        msg, param = _validation_message(e)
        raise ApiError(400, msg, param=param) from None
    pins = None
    if b.sage is not None:
        try:
            pins = check_pins(b.sage.pin or {}) or None
        except ValueError as e:
            raise ApiError(400, f"sage.pin: {e}", param="sage") from None
    max_tokens = b.max_completion_tokens if b.max_completion_tokens is not None else b.max_tokens
    max_tokens = min(default_max_tokens if max_tokens is None else max_tokens, max_tokens_limit)
    sp = SamplingParams(temperature=b.temperature, top_k=max(b.top_k, 0), top_p=b.top_p or 1e-6,
                        repetition_penalty=b.repetition_penalty, max_new_tokens=max_tokens,
                        min_new_tokens=min(b.min_tokens, max_tokens), stop_strings=_stops(b.stop))
    messages, prefill = _continuation(b, _messages(b))
    usage = b.stream_options is not None and b.stream_options.include_usage
    return ChatRequest(messages, b.n, sp, b.seed, pins, b.sage is not None, b.stream, prefill, usage)
