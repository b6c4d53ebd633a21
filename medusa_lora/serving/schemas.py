"""OpenAI request and response shapes: pydantic request bodies, the error shape, and response builders.

Extensions beyond OpenAI's API: request fields ``speculative`` (false: plain decoding on the same code path)
and ``return_token_ids``; a ``medusa`` object in responses with the speculative decoding stats.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field, field_validator

if TYPE_CHECKING:
    from medusa_lora.serving.worker import Completion

ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """An error response in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ERROR_TYPES.get(status, "server_error")
        self.model = ""  # the served model it concerns, for /metrics ("" when none)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: str = Field(min_length=1)
    content: str | list[TextPart]

    def as_turn(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationParams(BaseModel):
    model: str
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    n: Literal[1] = 1
    seed: int | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    speculative: bool = True  # extension
    return_token_ids: bool = False  # extension

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_GenerationParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def token_limit(self) -> int | None:
        """None: up to the model's context."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_GenerationParams):
    prompt: str | list[int] = Field(min_length=1)
    max_tokens: int = Field(16, ge=1)

    @property
    def token_limit(self) -> int:
        return self.max_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(completion: Completion) -> dict:
    tokens = completion.stats.new_tokens
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": tokens,
        "total_tokens": completion.prompt_tokens + tokens,
    }


def medusa_stats(completion: Completion, with_token_ids: bool) -> dict:
    """The extension field: how speculative decoding did on this request."""
    stats = completion.stats
    out = {
        "tokens_per_step": stats.mean_accepted_length,
        "tokens_per_s": stats.tokens_per_s,
        "steps": stats.steps,
        "tree_size": completion.tree_size,
        "time_to_first_token_s": stats.time_to_first_token_s,
    }
    if with_token_ids:
        out["token_ids"] = completion.token_ids
    return out


class ResponseBuilder:
    """Bodies for one request: the whole response, or the stream's chunks (chat or text completion)."""

    def __init__(self, chat: bool, model: str, with_token_ids: bool) -> None:
        self.chat, self.model, self.with_token_ids = chat, model, with_token_ids
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def response(self, completion: Completion) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": completion.text}}
        else:
            choice = {"index": 0, "text": completion.text}
        choice.update(finish_reason=completion.finish_reason, logprobs=None)
        return {
            **self._head("chat.completion" if self.chat else "text_completion"),
            "choices": [choice],
            "usage": usage(completion),
            "medusa": medusa_stats(completion, self.with_token_ids),
        }

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
        """One stream chunk: a text delta, or (``text`` None) the closing chunk with its finish reason."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice.update(finish_reason=finish_reason, logprobs=None)
        return {
            **self._head("chat.completion.chunk" if self.chat else "text_completion"),
            "choices": [choice],
        }

    def final_chunks(self, completion: Completion, include_usage: bool) -> list[dict]:
        """The closing chunk (finish reason and the ``medusa`` stats), then usage if asked for."""
        last = self.chunk(None, completion.finish_reason)
        last["medusa"] = medusa_stats(completion, self.with_token_ids)
        chunks = [last]
        if include_usage:
            chunks.append({**self._head(last["object"]), "choices": [], "usage": usage(completion)})
        return chunks

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}
