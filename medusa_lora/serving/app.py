"""The OpenAI-compatible app (``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``, ``/metrics``) and
``medusa-lora serve``."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException

from medusa_lora.errors import ConfigError
from medusa_lora.prompting import PromptFormat
from medusa_lora.serving.metrics import Metrics
from medusa_lora.serving.registry import Registry, Served
from medusa_lora.serving.schemas import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ResponseBuilder,
)
from medusa_lora.serving.worker import GenerationRequest, Job, Worker

CLIENT_CLOSED = 499  # nginx's status for a request whose client went away; nobody reads it


def create_app(registry: Registry, queue_size: int = 16) -> FastAPI:
    """The app serving ``registry``'s models; ``queue_size`` requests may wait while one runs."""
    if queue_size < 1:
        raise ConfigError(f"queue_size must be >= 1, got {queue_size}")
    metrics = Metrics()
    created = int(time.time())
    state: dict[str, Worker] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        worker = Worker(registry, metrics, queue_size)
        state["worker"] = worker
        task = asyncio.create_task(worker.run())
        yield
        task.cancel()
        worker.close()
        with suppress(asyncio.CancelledError):
            await task

    app = FastAPI(title="medusa-lora", lifespan=lifespan)
    app.state.registry, app.state.metrics = registry, metrics

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        metrics.error(exc.model, exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await api_error(request, _validation_error(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return await api_error(request, ApiError(exc.status_code, str(exc.detail), code=None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return await api_error(request, ApiError(500, f"internal error: {exc}", "server_error"))

    def model_card(served: Served) -> dict:
        card = {"id": served.name, "object": "model", "created": created, "owned_by": "medusa-lora"}
        card["medusa"] = {
            "lora": served.lora is not None,
            "heads": served.model.config.num_heads if served.tree is not None else 0,
            "tree_size": served.tree.size if served.tree is not None else 1,
            "directory": str(served.directory) if served.directory else None,
        }
        return card

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(registry.get(n)) for n in registry.names]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict:
        return model_card(_served(registry, name))

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        served = _served(registry, body.model)
        if registry.chat_format is None:
            raise _named(
                ApiError(400, "the model's tokenizer has no chat template: use /v1/completions"), served
            )
        try:
            ids = registry.chat_format.encode([m.as_turn() for m in body.messages])
        except (TemplateError, ValueError) as exc:
            raise _named(
                ApiError(400, f"the chat template rejects these messages: {exc}", param="messages"), served
            )
        return await _answer(request, body, served, ids, registry.chat_format, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        served = _served(registry, body.model)
        prompt = body.prompt
        vocab = served.model.model_config.vocab_size
        if isinstance(prompt, list) and not all(0 <= t < vocab for t in prompt):
            raise _named(ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt"), served)
        ids = prompt if isinstance(prompt, list) else registry.raw_format.encode(prompt)
        return await _answer(request, body, served, ids, registry.raw_format, chat=False)

    async def _answer(
        request: Request,
        body: ChatCompletionRequest | CompletionRequest,
        served: Served,
        ids: list[int],
        prompt_format: PromptFormat,
        chat: bool,
    ) -> Response:
        job = Job(
            GenerationRequest(
                served=served,
                prompt_ids=ids,
                max_tokens=body.token_limit or served.model.model_config.max_position_embeddings,
                temperature=body.temperature,
                top_p=body.top_p,
                seed=body.seed,
                stop=body.stop,
                stop_ids=prompt_format.stop_ids(registry.eos_ids),
                speculative=body.speculative,
                prompt_param="messages" if chat else "prompt",
            ),
            asyncio.get_running_loop(),
        )
        try:
            state["worker"].submit(job, body.stream)
        except ApiError as exc:
            raise _named(exc, served) from None
        builder = ResponseBuilder(chat, served.name, body.return_token_ids)
        kind, value = await _until_disconnect(request, job, {"started"} if body.stream else set())
        if kind == "error":
            raise _named(value, served)
        if kind == "cancelled":
            return Response(status_code=CLIENT_CLOSED)
        if kind == "done":
            return JSONResponse(builder.response(value))
        return StreamingResponse(
            _sse(job, builder, served.name, body.include_usage), media_type="text/event-stream"
        )

    async def _sse(job: Job, builder: ResponseBuilder, name: str, include_usage: bool) -> AsyncIterator[str]:
        try:
            if builder.chat:
                yield _event(builder.chunk(None, role=True))
            while True:
                kind, value = await job.events.get()
                if kind == "delta":
                    yield _event(builder.chunk(value))
                elif kind == "done":
                    if value.final_delta:
                        yield _event(builder.chunk(value.final_delta))
                    for chunk in builder.final_chunks(value, include_usage):
                        yield _event(chunk)
                    break
                elif kind == "error":
                    metrics.error(name, value.status)
                    yield _event(value.body())
                    break
                elif kind == "cancelled":
                    return
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()  # a client that went away cancels this generator: stop the generation too

    return app


def _served(registry: Registry, name: str) -> Served:
    served = registry.get(name)
    if served is None:
        raise ApiError(
            404,
            f"the model {name!r} does not exist; served models: {', '.join(registry.names)}",
            param="model",
            code="model_not_found",
        )
    return served


def _named(exc: ApiError, served: Served) -> ApiError:
    """Label an error with the model it belongs to (for /metrics)."""
    exc.model = served.name
    return exc


async def _until_disconnect(request: Request, job: Job, also: set[str]) -> tuple[str, object]:
    """The job's first event that is final (or in ``also``); a client that disconnects meanwhile cancels it."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel.set()

    watcher = asyncio.create_task(watch())
    try:
        while True:
            kind, value = await job.events.get()
            if kind in also or kind in ("done", "error", "cancelled"):
                return kind, value
    finally:
        watcher.cancel()


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _validation_error(exc: RequestValidationError) -> ApiError:
    """The first problem in a request body, naming its field."""
    error = exc.errors()[0]
    if error.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {error.get('msg')}")
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    return ApiError(400, f"{param or 'body'}: {error.get('msg')}", param=param)
