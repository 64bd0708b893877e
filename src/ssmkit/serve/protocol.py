"""OpenAI's HTTP API, the part ``ssmkit serve`` speaks: request checks, response and error bodies.

Reference: the OpenAI API reference for ``POST /v1/completions``, ``POST /v1/chat/completions`` and
``GET /v1/models``, and its error format ``{"error": {"message", "type", "param", "code"}}``.

Accepted request fields: ``model`` (required: the served model's id), ``prompt`` (completions: a string,
a list of token ids, or a one-element list of either) or ``messages`` (chat: ``{"role", "content"}``
with string content or a list of ``{"type": "text", "text"}`` parts), ``max_tokens`` (chat also
``max_completion_tokens``), ``temperature`` [0, 2], ``top_p`` (0, 1], ``top_k`` >= 0 (an extension;
0 = off), ``stop`` (a string or up to 4), ``seed``, ``n`` (1 only), ``stream``, ``stream_options``
(``include_usage``). Fields that would change the output but are not implemented (``logprobs``,
``echo``, ``best_of`` > 1, penalties, ``logit_bias``, ``suffix``, tools) are accepted only at their
neutral values and are a 400 otherwise; an unknown field is a 400, as OpenAI answers.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass

from ssmkit.serve.engine import SamplingParams

DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 256}
"""max_tokens when the request gives none: OpenAI's 16 for completions; chat has no context limit to
default to here, so a bounded 256."""

MAX_STOP_STRINGS = 4

# Fields accepted at their neutral value only (value -> accepted values); anything else is a 400.
_NEUTRAL = {
    "user": None,  # any string
    "metadata": None,
    "store": None,
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}),
}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "stream"}
_FIELDS = {
    "completion": _COMMON | {"prompt", "stream_options"} | set(_NEUTRAL),
    "chat": _COMMON | {"messages", "max_completion_tokens", "stream_options"} | set(_NEUTRAL),
}
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An error answered in OpenAI's format with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class ParsedRequest:
    """A checked request: what to generate and how to answer."""

    kind: str  # "completion" | "chat"
    prompt: str | list[int] | None  # completion: text or token ids
    messages: list[dict] | None  # chat: role/content dicts, content flattened to text
    params: SamplingParams
    stream: bool
    include_usage: bool


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object (400 otherwise)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"We could not parse the JSON body of your request ({err}).") from None
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(body).__name__}.")
    return body


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(name, f"'{name}' must be a number, got {value!r}", "invalid_type")
    if not ((value > lo) if lo_open else (value >= lo)) or value > hi:
        left = "(" if lo_open else "["
        raise bad(name, f"'{name}' must be in {left}{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def _integer(body: dict, name: str, default: int | None, lo: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"'{name}' must be an integer, got {value!r}", "invalid_type")
    if value < lo:
        raise bad(name, f"'{name}' must be >= {lo}, got {value}")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", f"'stop' must be a string or a list of strings, got {value!r}", "invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad("stop", f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
    if any(not s for s in stops):
        raise bad("stop", "'stop' strings must be non-empty")
    return tuple(stops)


def _check_fields(body: dict, kind: str) -> None:
    for name in body:
        if name not in _FIELDS[kind]:
            raise bad(name, f"Unrecognized request argument supplied: {name}", "unknown_parameter")
    for name, neutral in _NEUTRAL.items():
        if neutral is not None and name in body and body[name] not in neutral:
            raise bad(name, f"'{name}' is not supported by this server (got {body[name]!r})", "unsupported")


def _prompt(body: dict) -> str | list[int]:
    value = body.get("prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # a batch of one
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and value
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    ):
        return value
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        raise bad("prompt", f"one prompt per request (n = 1), got a batch of {len(value)}")
    raise bad("prompt", f"'prompt' must be a string or a list of token ids, got {value!r}", "invalid_type")


def _messages(body: dict) -> list[dict]:
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise bad("messages", f"'messages' must be a non-empty list, got {value!r}", "invalid_type")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise bad(where, f"'{where}' must be an object with a role in {list(CHAT_ROLES)}, got {m!r}")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise bad(f"{where}.content", "only text content parts are supported")
            content = "".join(str(p.get("text", "")) for p in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise bad(f"{where}.content", f"'{where}.content' must be a string, got {content!r}")
        out.append({**m, "content": content})
    return out


def parse_request(body: dict, kind: str, model_name: str) -> ParsedRequest:
    """Check a completion (``kind="completion"``) or chat request body; APIError (400/404) when wrong."""
    _check_fields(body, kind)
    model = body.get("model")
    if not isinstance(model, str):
        raise bad("model", "you must provide a model parameter", "missing_required_parameter")
    if model != model_name:
        raise APIError(
            404,
            f"The model `{model}` does not exist; this server serves `{model_name}`.",
            param="model",
            code="model_not_found",
        )
    if _integer(body, "n", 1, 1) != 1:
        raise bad("n", f"only n = 1 is supported, got {body['n']}")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad("stream", f"'stream' must be a boolean, got {stream!r}", "invalid_type")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise bad("stream_options", "'stream_options' is an object, allowed only when 'stream' is true")
    max_tokens = _integer(body, "max_tokens", None, 1)
    if kind == "chat":
        max_tokens = _integer(body, "max_completion_tokens", max_tokens, 1)
    params = SamplingParams(
        max_tokens=DEFAULT_MAX_TOKENS[kind] if max_tokens is None else max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=_integer(body, "top_k", 0, 0),
        stop=_stop(body),
        seed=_integer(body, "seed", None, -(2**63)),
    )
    if params.seed is not None and params.seed >= 2**64:
        raise bad("seed", f"'seed' must be < 2**64, got {params.seed}")
    return ParsedRequest(
        kind=kind,
        prompt=_prompt(body) if kind == "completion" else None,
        messages=_messages(body) if kind == "chat" else None,
        params=params,
        stream=stream,
        include_usage=bool((options or {}).get("include_usage")),
    )


# ---------------------------------------------------------------------- responses
class Responder:
    """Builds one request's response bodies (``id``, ``created``, ``model`` fixed per request)."""

    def __init__(self, kind: str, model_name: str):
        self.kind = kind
        self.model = model_name
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def full(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        """The non-streaming response."""
        if self.kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            head = self._head("text_completion")
        return {**head, "choices": [choice], "usage": self.usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
        """One streamed chunk (chat: ``delta``; completion: ``text``)."""
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage(prompt_tokens, completion_tokens)}


def sse(data: dict | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()
