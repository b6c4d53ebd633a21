"""``/metrics`` in Prometheus text format: requests, tokens, tok/s and tokens per step per served model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

if TYPE_CHECKING:
    from medusa_lora.serving.worker import Completion

PREFIX = "medusa_lora"


class Metrics:
    """One server's metrics, in their own registry (several servers can live in one process)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["model"]

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labels + list(extra), registry=self.registry)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"{PREFIX}_{name}", doc, labels, registry=self.registry)

        self.requests = counter("requests", "Requests by outcome (ok, error, cancelled)", ("outcome",))
        self.errors = counter("errors", "Error responses by HTTP status code", ("code",))
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests")
        self.completion_tokens = counter("completion_tokens", "Generated tokens of finished requests")
        self.generation_seconds = counter("generation_seconds", "Wall time spent generating")
        self.steps = counter("steps", "Decoding steps (verification forwards)")
        self.step_tokens = counter("step_tokens", "Tokens emitted by decoding steps (the prefill's excluded)")
        self.tokens_per_second = gauge("tokens_per_second", "Generated tokens per generation second, so far")
        self.tokens_per_step = gauge("tokens_per_step", "Tokens per decoding step, so far")
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth", "Requests waiting in the queue", registry=self.registry
        )
        self._totals: dict[str, list[float]] = {}  # model -> [tokens, seconds, step tokens, steps]

    def observe(self, model: str, completion: Completion) -> None:
        """A finished request."""
        stats = completion.stats
        step_tokens = sum(stats.accepted_lengths)
        self.requests.labels(model, "ok").inc()
        self.prompt_tokens.labels(model).inc(completion.prompt_tokens)
        self.completion_tokens.labels(model).inc(stats.new_tokens)
        self.generation_seconds.labels(model).inc(stats.wall_time_s)
        self.steps.labels(model).inc(stats.steps)
        self.step_tokens.labels(model).inc(step_tokens)
        totals = self._totals.setdefault(model, [0.0, 0.0, 0.0, 0.0])
        for i, value in enumerate((stats.new_tokens, stats.wall_time_s, step_tokens, stats.steps)):
            totals[i] += value
        tokens, seconds, emitted, steps = totals
        self.tokens_per_second.labels(model).set(tokens / seconds if seconds else 0.0)
        self.tokens_per_step.labels(model).set(emitted / steps if steps else 0.0)

    def error(self, model: str, code: int) -> None:
        """An error response; ``model`` is "" when the request named no served model."""
        self.requests.labels(model, "error").inc()
        self.errors.labels(model, str(code)).inc()

    def cancelled(self, model: str) -> None:
        """A client that went away before its answer was done."""
        self.requests.labels(model, "cancelled").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
