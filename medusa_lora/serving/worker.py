"""The worker: a bounded queue of requests served one at a time on one thread that owns the model.

A job talks back to the event loop through its own ``asyncio.Queue`` of events (``started``, ``delta``,
``done``, ``error``, ``cancelled``), fed thread-safely from the worker thread. The streamer that
``generate()`` calls checks the job's cancel flag and raises ``Cancelled`` inside ``generate()``, so a client
that goes away stops its generation at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from medusa_lora.decoding import GenerationStats, generate
from medusa_lora.errors import MedusaLoraError
from medusa_lora.serving.metrics import Metrics
from medusa_lora.serving.registry import Registry, Served
from medusa_lora.serving.schemas import ApiError

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The client went away: raised by the streamer inside ``generate()``."""


@dataclass
class GenerationRequest:
    """What the worker needs to run one request."""

    served: Served
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stop_ids: list[int]
    speculative: bool
    prompt_param: str  # the request field that holds the prompt, for error messages


@dataclass
class Completion:
    """A finished generation, as the response reports it."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    stats: GenerationStats
    tree_size: int
    final_delta: str  # streamed text not sent yet (held back while it could start a stop string)


@dataclass
class Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    cancel: threading.Event = field(default_factory=threading.Event)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def emit(self, kind: str, value=None) -> None:
        """Hand an event to the event loop (safe from any thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class TextAssembler:
    """Generated ids -> response text, incrementally. A stop string and all after it are cut (as OpenAI does);
    text that could still become a stop string, or an incomplete character, is held back until it cannot."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.sent = 0
        self.stop_hit = False

    def feed(self, tokens: list[int]) -> str:
        """Take new ids; return the text that is now safe to send."""
        self.tokens.extend(tokens)
        text = self.text
        return self._take(text, len(text) if self.stop_hit else len(text) - self._held_back(text))

    def finish(self) -> str:
        """The text not sent yet."""
        text = self.text
        return self._take(text, len(text))

    @property
    def text(self) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        self.stop_hit = bool(cuts)
        return text[: min(cuts)] if cuts else text

    def _held_back(self, text: str) -> int:
        partial = len(text) - len(text.rstrip("\ufffd"))
        prefixes = [k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])]
        return max([partial, *prefixes])

    def _take(self, text: str, end: int) -> str:
        delta = text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta


class _Streamer:
    """The ``streamer`` ``generate()`` calls: the prompt first (-> ``started``), then each step's new ids."""

    def __init__(self, job: Job, assembler: TextAssembler, stream: bool) -> None:
        self.job, self.assembler, self.stream = job, assembler, stream
        self.started = False

    def put(self, value: torch.Tensor) -> None:
        if self.job.cancel.is_set():
            raise Cancelled
        if not self.started:
            self.started = True
            self.job.emit("started")
            return
        delta = self.assembler.feed(value.tolist())
        if delta and self.stream:
            self.job.emit("delta", delta)

    def end(self) -> None:
        pass


class Worker:
    """Owns the registry; ``submit`` queues a job (429 when the queue is full), ``run`` serves them in order."""

    def __init__(self, registry: Registry, metrics: Metrics, queue_size: int) -> None:
        self.registry, self.metrics = registry, metrics
        self.queue: asyncio.Queue[tuple[Job, bool]] = asyncio.Queue(maxsize=queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medusa-lora-worker")
        self._current: Job | None = None
        metrics.queue_depth.set_function(self.queue.qsize)

    def submit(self, job: Job, stream: bool) -> None:
        try:
            self.queue.put_nowait((job, stream))
        except asyncio.QueueFull:
            raise ApiError(
                429,
                f"the request queue is full ({self.queue.maxsize} waiting); retry later",
                "rate_limit_error",
                code="queue_full",
            ) from None

    async def run(self) -> None:
        """Serve queued jobs one at a time, forever (cancel the task to stop)."""
        loop = asyncio.get_running_loop()
        while True:
            job, stream = await self.queue.get()
            if job.cancel.is_set():
                self.metrics.cancelled(job.request.served.name)
                job.emit("cancelled")
                continue
            self._current = job
            try:
                await loop.run_in_executor(self._executor, self._serve, job, stream)
            finally:
                self._current = None

    def close(self) -> None:
        """Stop the running generation and the thread (queued jobs are dropped)."""
        if self._current is not None:
            self._current.cancel.set()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _serve(self, job: Job, stream: bool) -> None:
        """Run one job on the worker thread; every outcome becomes an event, nothing escapes."""
        request = job.request
        name = request.served.name
        try:
            job.emit("done", self._generate(job, stream))
        except Cancelled:
            self.metrics.cancelled(name)
            job.emit("cancelled")
        except MedusaLoraError as exc:
            job.emit("error", ApiError(400, str(exc), param=request.prompt_param))
        except Exception as exc:  # a bug must not take the server down: report it and serve the next job
            log.exception("generation failed for model %s", name)
            job.emit("error", ApiError(500, f"generation failed: {exc}", "server_error"))

    def _generate(self, job: Job, stream: bool) -> Completion:
        request = job.request
        served = request.served
        assembler = TextAssembler(self.registry.tokenizer, request.stop)
        tree = served.tree if request.speculative and served.speculative else None
        with self.registry.active(served):
            out = generate(
                served.model,
                request.prompt_ids,
                max_new_tokens=request.max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                tree=tree,
                speculative=tree is not None,
                streamer=_Streamer(job, assembler, stream),
                stop_strings=request.stop,
                eos_token_id=request.stop_ids,
                seed=request.seed,
            )
        final_delta = assembler.finish()
        stopped = bool(out.tokens) and out.tokens[-1] in request.stop_ids
        completion = Completion(
            text=assembler.text,
            token_ids=out.tokens,
            finish_reason="stop" if stopped or assembler.stop_hit else "length",
            prompt_tokens=len(request.prompt_ids),
            stats=out.stats,
            tree_size=tree.size if tree is not None else 1,
            final_delta=final_delta,
        )
        self.metrics.observe(served.name, completion)
        return completion
