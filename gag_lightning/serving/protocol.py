"""The OpenAI chat-completions protocol of ``serve.py``: request validation and response bodies, no server.

Kept apart from LitServe so that every rule is a plain function: a request the server cannot honour gets an
HTTP 4xx with an OpenAI-style error body naming the field, before it reaches a batch (one bad request never
fails the others in its batch, and never becomes a 500 with a traceback).

Accepted: ``model`` (the served name or ``auto``: routed; a route name: that route, scores still reported),
``messages`` (the last user message is the question; system and earlier turns are ignored: each route has
its own instruction), ``max_tokens`` / ``max_completion_tokens``, ``temperature`` / ``top_p`` (accepted, the
server decodes greedily, like every evaluated system), ``n`` = 1, ``stream`` = false, ``user``, ``seed``,
``metadata``. Anything else is an unknown field: 400.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ALLOWED_FIELDS",
    "ChatQuery",
    "RequestError",
    "chat_response",
    "error_body",
    "models_body",
    "parse_chat_request",
]

ALLOWED_FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
                  "stream", "user", "seed", "metadata")
ROLES = ("system", "developer", "user", "assistant", "tool")
AUTO = "auto"


class RequestError(ValueError):
    """A request the server refuses: HTTP ``status`` with an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status = int(status)
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(str(self), self.param, self.code)


def error_body(message: str, param: str | None = None, code: str = "invalid_request") -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


@dataclass
class ChatQuery:
    """One validated request: the question, a forced route (None: the router decides) and the answer length."""

    question: str
    model: str
    route: str | None = None
    max_new_tokens: int | None = None
    prompt_tokens: int = 0
    request_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")


def _text(content: Any, where: str) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{where}.content[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}}; "
                                   "this server answers text only", param=f"{where}.content")
            parts.append(part["text"])
        return "\n".join(parts)
    if content is None:
        return ""
    raise RequestError(f"{where}.content must be a string or a list of text parts", param=f"{where}.content")


def _positive_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(f"'{name}' must be a positive integer, got {value!r}", param=name)
    return value


def parse_chat_request(
    body: Any,
    served_model: str,
    routes: Sequence[str],
    count_tokens: Callable[[str], int],
    limit: Callable[[str, int, int | None], str | None],
) -> ChatQuery:
    """Validate a chat-completions body; raise ``RequestError`` (4xx) with a clear message otherwise.

    ``count_tokens(question)`` counts the question's tokens (reported as usage); ``limit(question, n_tokens,
    max_new_tokens)`` returns None when every route can take the question with that answer length inside the
    models' context windows, else the reason it cannot.
    """
    if not isinstance(body, Mapping):
        raise RequestError("the request body must be a JSON object", param=None)
    unknown = sorted(set(body) - set(ALLOWED_FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; this server accepts {', '.join(ALLOWED_FIELDS)}",
                           param=unknown[0], code="unknown_field")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise RequestError(f"'model' is required: '{served_model}' (routed), '{AUTO}', or a route: {list(routes)}",
                           param="model")
    if model in (served_model, AUTO):
        route = None
    elif model in routes:
        route = model
    else:
        raise RequestError(f"model '{model}' does not exist; use '{served_model}' (routed), '{AUTO}', or a route: "
                           f"{list(routes)} (GET /v1/models)", status=404, param="model", code="model_not_found")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {\"role\", \"content\"} objects",
                           param="messages")
    question = None
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", param=where)
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise RequestError(f"{where}: unknown field(s) {extra}; a message has role, content and name",
                               param=where, code="unknown_field")
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {list(ROLES)}, got {role!r}", param=f"{where}.role")
        text = _text(message.get("content"), where)
        if role == "user":
            question = text
    if question is None:
        raise RequestError("'messages' holds no user message: the last user message is the question",
                           param="messages")
    if not question.strip():
        raise RequestError("the last user message is empty: there is no question to answer", param="messages")
    if body.get("n") is not None and body.get("n") != 1:
        raise RequestError("'n' must be 1: one greedy answer per request", param="n")
    if body.get("stream"):
        raise RequestError("'stream' is not supported: send stream=false (the default)", param="stream")
    for name, high in (("temperature", 2.0), ("top_p", 1.0)):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not 0.0 <= float(value) <= high):
            raise RequestError(f"'{name}' must be a number in [0, {high:g}], got {value!r}", param=name)
    max_tokens = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
    question = question.strip()
    n_tokens = count_tokens(question)
    reason = limit(question, n_tokens, max_tokens)
    if reason is not None:
        raise RequestError(reason, param="messages", code="context_length_exceeded")
    return ChatQuery(question=question, model=model, route=route, max_new_tokens=max_tokens, prompt_tokens=n_tokens)


def chat_response(query: ChatQuery, text: str, finished: bool, completion_tokens: int, route: str,
                  scores: Mapping[str, float], batch_size: int, extra: Mapping[str, Any] | None = None
                  ) -> dict[str, Any]:
    """A chat.completion object, plus the chosen ``route``, the per-route ``route_scores`` and the size of the
    batch the request was answered in."""
    return {
        "id": query.request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": query.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop" if finished else "length", "logprobs": None}],
        "usage": {"prompt_tokens": query.prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": query.prompt_tokens + completion_tokens},
        "system_fingerprint": None,
        "route": route,
        "route_scores": {k: round(float(v), 6) for k, v in scores.items()},
        "batch_size": int(batch_size),
        **dict(extra or {}),
    }


def models_body(served_model: str, routes: Mapping[str, Mapping[str, Any]], created: int = 0) -> dict[str, Any]:
    """GET /v1/models: the routed model first, then one entry per route (a route name as ``model`` forces it)."""
    data = [{"id": served_model, "object": "model", "created": created, "owned_by": "gag-lightning",
             "routes": list(routes)}]
    for name, info in routes.items():
        data.append({"id": name, "object": "model", "created": created, "owned_by": "gag-lightning", **dict(info)})
    return {"object": "list", "data": data}
