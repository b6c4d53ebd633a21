"""Built-in demonstration task: observability questions over a column schema -> compact JSON query.

Every example is drawn from a ``random.Random`` seeded by the caller, so the data is a pure function
of the seed. A schema is a random subset of a domain's columns; the question is assembled from
wording templates and phrase pools, and the target query is built alongside it, so the two agree.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .query_schema import dump_query
from .splits import SPLITS, GeneratedSplits

DEFAULT_TIME_RANGE = 7200
FORMAT_VERSION = 1
MIN_COMPLETION_CHARS, MAX_COMPLETION_CHARS = 90, 340  # about 30-120 SmolLM2 tokens
MIN_COLUMNS, MAX_COLUMNS = 8, 25
INSTRUCTION = (
    "Write a query that answers the question about this observability dataset. Reply with compact JSON "
    "only, using only the columns listed below. If the question gives no time range, use 7200 seconds."
)


@dataclass(frozen=True)
class Column:
    """A catalogue column and what is needed to talk about it."""

    name: str
    types: tuple[str, ...]  # possible types; repeats weight the draw
    nouns: tuple[str, ...]  # how people refer to it; nouns are unique across the catalogue
    values: tuple[Any, ...] = ()  # typical values for equality filters
    thresholds: tuple[float, ...] = ()  # numeric cut-offs; a column with thresholds is a measure
    fmt: str = "{v}"  # how a threshold is written in prose, e.g. "{v}ms"
    dim: bool = False  # sensible to break down by
    distinct: bool = False  # sensible to count distinct values of
    additive: bool = False  # SUM is meaningful
    latency: bool = False  # "slowest" / "fastest" apply
    prefixes: tuple[str, ...] = ()
    substrings: tuple[str, ...] = ()
    yes: tuple[str, ...] = ()  # post-modifiers meaning "= true" (booleans)
    no: tuple[str, ...] = ()  # post-modifiers meaning "= false"


def _col(name: str, types: str, nouns: str, values: tuple[Any, ...] = (), **kw: Any) -> Column:
    return Column(name, tuple(types.split()), tuple(nouns.split("|")), values, **kw)


_MS = {"fmt": "{v}ms", "latency": True}
_BYTES = {"fmt": "{v} bytes", "additive": True}

COMMON_COLUMNS = (
    _col("service.name", "string", "service", dim=True),
    _col(
        "duration_ms",
        "float float float integer",
        "latency|duration|response time|request duration",
        thresholds=(50, 100, 200, 250, 300, 500, 750, 1000, 1500, 2000, 3000, 5000),
        **_MS,
    ),
    _col("trace.trace_id", "string", "trace", distinct=True),
    _col("trace.span_id", "string", "span ID"),
    _col("trace.parent_id", "string", "parent span ID|parent ID"),
    _col("name", "string", "span name", ("HTTP GET", "HTTP POST", "db.query", "cache.get"), dim=True),
    _col(
        "error",
        "boolean",
        "error flag",
        yes=("with errors", "that errored", "with an error"),
        no=("without errors", "that didn't error"),
    ),
    _col(
        "host.name",
        "string",
        "host|hostname",
        ("ip-10-0-1-17", "ip-10-0-3-42", "web-01", "web-02"),
        dim=True,
        distinct=True,
        prefixes=("ip-10-0-", "web-"),
    ),
    _col(
        "region",
        "string",
        "region",
        ("us-east-1", "us-west-2", "eu-west-1", "eu-central-1", "ap-southeast-2"),
        dim=True,
        prefixes=("us-", "eu-"),
    ),
    _col("deployment.environment", "string", "environment|env", ("production", "staging", "dev"), dim=True),
    _col(
        "service.version",
        "string",
        "service version|release",
        ("1.4.2", "1.5.0", "2.0.1", "2.1.0-rc1"),
        dim=True,
        prefixes=("1.", "2."),
    ),
    _col("user.id", "string", "user|user ID", ("u_1029", "u_48213", "u_7730"), dim=True, distinct=True),
    _col("http.method", "string", "HTTP method|method", ("GET", "POST", "PUT", "DELETE", "PATCH"), dim=True),
    _col("http.route", "string", "route|endpoint|HTTP route", dim=True),
    _col(
        "http.status_code",
        "integer integer integer string",
        "status code|HTTP status",
        (200, 201, 204, 301, 400, 401, 403, 404, 429, 500, 502, 503, 504),
        dim=True,
    ),
    _col(
        "http.response_content_length",
        "integer",
        "response size|response body size",
        thresholds=(1024, 10000, 65536, 1000000),
        **_BYTES,
    ),
    _col("http.user_agent", "string", "user agent", substrings=("Mobile", "Chrome", "curl", "bot")),
    _col(
        "span.kind", "string", "span kind", ("server", "client", "internal", "producer", "consumer"), dim=True
    ),
    _col("telemetry.sdk.language", "string", "SDK language", ("go", "java", "python", "nodejs"), dim=True),
    _col(
        "peer.service",
        "string",
        "downstream service|peer service",
        ("postgres", "redis", "stripe-api", "auth-service"),
        dim=True,
    ),
)


@dataclass(frozen=True)
class Domain:
    """A kind of service: its own columns, entity words and values for the common columns."""

    name: str
    entities: tuple[str, ...]
    columns: tuple[Column, ...]
    overrides: dict[str, dict[str, tuple[Any, ...]]]


def _routes(*routes: str) -> dict[str, tuple[str, ...]]:
    return {"values": routes, "prefixes": tuple(sorted({"/" + r.split("/")[1] for r in routes}))}


DOMAINS = (
    Domain(
        "checkout",
        ("requests", "spans", "events", "checkout requests"),
        (
            _col(
                "cart.total",
                "float",
                "cart total|cart value",
                thresholds=(20, 50, 100, 250, 500, 1000),
                fmt="${v}",
                additive=True,
            ),
            _col(
                "cart.item_count",
                "integer",
                "item count|cart size",
                thresholds=(1, 3, 5, 10, 20),
                additive=True,
            ),
            _col(
                "payment.method",
                "string",
                "payment method",
                ("card", "paypal", "apple_pay", "gift_card"),
                dim=True,
            ),
            _col(
                "coupon.code",
                "string",
                "coupon code|coupon",
                ("SPRING10", "FREESHIP", "WELCOME5"),
                prefixes=("SPRING", "WELCOME"),
            ),
            _col("currency", "string", "currency", ("USD", "EUR", "GBP", "JPY"), dim=True),
            _col("order.id", "string", "order|order ID", distinct=True),
            _col("customer.tier", "string", "customer tier|tier", ("free", "gold", "platinum"), dim=True),
            _col(
                "shipping.method", "string", "shipping method", ("standard", "express", "overnight"), dim=True
            ),
            _col(
                "inventory.check_ms",
                "float",
                "inventory check time|inventory lookup time",
                thresholds=(10, 25, 50, 100, 250),
                **_MS,
            ),
            _col(
                "feature_flag.new_checkout",
                "boolean",
                "new checkout flag",
                yes=("with the new checkout flow enabled",),
                no=("with the new checkout flow disabled",),
            ),
        ),
        {
            "service.name": {"values": ("checkout-api", "cart-service", "frontend", "order-service")},
            "http.route": _routes("/cart", "/cart/items", "/checkout", "/checkout/confirm", "/api/orders"),
        },
    ),
    Domain(
        "payments",
        ("requests", "transactions", "spans", "events"),
        (
            _col(
                "payment.amount",
                "float",
                "payment amount|amount charged",
                thresholds=(10, 50, 100, 500, 1000, 5000),
                fmt="${v}",
                additive=True,
            ),
            _col(
                "payment.provider",
                "string",
                "payment provider|processor",
                ("stripe", "adyen", "braintree"),
                dim=True,
            ),
            _col(
                "payment.status",
                "string",
                "payment status",
                ("succeeded", "failed", "pending", "refunded"),
                dim=True,
            ),
            _col(
                "card.brand",
                "string",
                "card brand|card network",
                ("visa", "mastercard", "amex", "discover"),
                dim=True,
            ),
            _col(
                "payment.retry_count",
                "integer",
                "retry count|number of retries",
                (0, 1, 2, 3),
                thresholds=(0, 1, 2, 3, 5),
                additive=True,
            ),
            _col("fraud.score", "float", "fraud score|risk score", thresholds=(0.5, 0.7, 0.8, 0.9, 0.95)),
            _col(
                "is_refund",
                "boolean",
                "refund flag",
                yes=("that are refunds", "for refunds"),
                no=("that are not refunds", "excluding refunds"),
            ),
            _col(
                "merchant.id",
                "string",
                "merchant|merchant ID",
                ("m_1001", "m_2040", "m_3177"),
                dim=True,
                distinct=True,
            ),
            _col(
                "provider.latency_ms",
                "float",
                "provider latency|processor response time",
                thresholds=(100, 200, 500, 1000, 2000),
                **_MS,
            ),
            _col(
                "payment.3ds_required",
                "boolean",
                "3DS flag",
                yes=("that required 3DS",),
                no=("without a 3DS challenge",),
            ),
        ),
        {
            "service.name": {"values": ("payments-api", "ledger", "fraud-detector", "payment-gateway")},
            "http.route": _routes("/v1/charges", "/v1/refunds", "/v1/payment_intents", "/webhooks/stripe"),
        },
    ),
    Domain(
        "auth",
        ("requests", "login attempts", "events", "spans"),
        (
            _col(
                "auth.method",
                "string",
                "auth method|login method",
                ("password", "oauth", "sso", "magic_link", "passkey"),
                dim=True,
            ),
            _col(
                "login.success",
                "boolean",
                "login success flag",
                yes=("with a successful login",),
                no=("with a failed login", "where the login failed"),
            ),
            _col("mfa.used", "boolean", "MFA flag", yes=("that used MFA", "with MFA"), no=("without MFA",)),
            _col("session.id", "string", "session|session ID", distinct=True),
            _col(
                "auth.token_ttl_s",
                "integer",
                "token TTL|token lifetime",
                thresholds=(300, 900, 3600, 86400),
                fmt="{v}s",
            ),
            _col(
                "client.ip",
                "string",
                "client IP|IP address",
                ("10.0.4.12", "192.168.1.20", "203.0.113.7"),
                dim=True,
                distinct=True,
                prefixes=("10.", "192.168."),
            ),
            _col(
                "auth.failure_reason",
                "string",
                "failure reason",
                ("invalid_password", "locked_account", "expired_token", "mfa_timeout"),
                dim=True,
            ),
            _col(
                "identity.provider",
                "string",
                "identity provider|IdP",
                ("okta", "google", "azure_ad", "github"),
                dim=True,
            ),
            _col(
                "password.hash_ms",
                "float",
                "password hashing time|hash time",
                thresholds=(50, 100, 200, 400),
                **_MS,
            ),
        ),
        {
            "service.name": {"values": ("auth-service", "identity-api", "session-store", "login-frontend")},
            "http.route": _routes("/login", "/logout", "/oauth/token", "/mfa/verify", "/api/session"),
        },
    ),
    Domain(
        "search",
        ("requests", "searches", "search requests", "spans"),
        (
            _col("search.query", "string", "search query|query text", substrings=("shoes", "laptop", "gift")),
            _col(
                "search.result_count",
                "integer",
                "result count|number of results",
                (0, 1),
                thresholds=(0, 1, 10, 50, 100),
                additive=True,
            ),
            _col("search.index", "string", "search index|index", ("products", "articles", "users"), dim=True),
            _col(
                "cache.hit",
                "boolean",
                "cache hit",
                yes=("that hit the cache", "with a cache hit"),
                no=("that missed the cache", "with a cache miss"),
            ),
            _col("search.page", "integer", "results page|page number", (1, 2, 3), thresholds=(1, 2, 5, 10)),
            _col(
                "ranking.model_version",
                "string",
                "ranking model|ranking model version",
                ("v12", "v13", "v14-beta"),
                dim=True,
            ),
            _col("query.parse_ms", "float", "query parse time|parse time", thresholds=(1, 5, 10, 50), **_MS),
            _col("search.shard", "integer", "shard", (0, 1, 2, 3, 4, 5), dim=True),
        ),
        {
            "service.name": {"values": ("search-api", "indexer", "query-service", "autocomplete")},
            "http.route": _routes("/search", "/api/search", "/autocomplete", "/suggest"),
        },
    ),
    Domain(
        "k8s",
        ("events", "requests", "spans"),
        (
            _col(
                "k8s.pod.name",
                "string",
                "pod|pod name",
                ("api-7d9f8b-x2k4q", "worker-5c6d7-abcde", "web-6f8d9-zz81k"),
                dim=True,
                distinct=True,
                prefixes=("api-", "worker-", "web-"),
            ),
            _col(
                "k8s.namespace.name",
                "string",
                "namespace",
                ("default", "kube-system", "payments", "monitoring"),
                dim=True,
            ),
            _col(
                "k8s.node.name",
                "string",
                "node|node name",
                ("node-a1", "node-b2", "ip-10-0-2-31"),
                dim=True,
                distinct=True,
            ),
            _col("k8s.container.name", "string", "container", ("app", "sidecar", "istio-proxy"), dim=True),
            _col(
                "k8s.container.restart_count",
                "integer",
                "restart count|container restarts",
                thresholds=(0, 1, 3, 5, 10),
                additive=True,
            ),
            _col(
                "k8s.deployment.name",
                "string",
                "deployment",
                ("api", "worker", "web", "ingress-nginx"),
                dim=True,
            ),
            _col(
                "cpu.usage_percent",
                "float",
                "CPU usage|CPU utilisation",
                thresholds=(50, 75, 80, 90, 95),
                fmt="{v}%",
            ),
            _col(
                "memory.usage_bytes",
                "integer",
                "memory usage|memory",
                thresholds=(268435456, 536870912, 1073741824),
                fmt="{v} bytes",
            ),
            _col(
                "k8s.oom_killed",
                "boolean",
                "OOM flag",
                yes=("that were OOM killed", "with OOM kills"),
                no=("that were not OOM killed",),
            ),
            _col(
                "k8s.event.reason",
                "string",
                "event reason|reason",
                ("BackOff", "Killing", "Pulled", "FailedScheduling"),
                dim=True,
            ),
        ),
        {
            "service.name": {"values": ("api", "worker", "scheduler", "ingress-nginx")},
            "http.route": _routes("/healthz", "/readyz", "/metrics", "/api/jobs"),
        },
    ),
    Domain(
        "cdn",
        ("requests", "edge requests", "events"),
        (
            _col(
                "cdn.pop", "string", "PoP|edge location", ("IAD", "FRA", "NRT", "SYD", "GRU", "LHR"), dim=True
            ),
            _col("cache.status", "string", "cache status", ("HIT", "MISS", "EXPIRED", "BYPASS"), dim=True),
            _col(
                "http.host",
                "string",
                "host header|domain",
                ("www.example.com", "static.example.com", "api.example.com"),
                dim=True,
                prefixes=("static.", "api."),
            ),
            _col(
                "cdn.bytes_sent",
                "integer",
                "bytes sent|egress|bandwidth",
                thresholds=(1024, 102400, 1048576),
                **_BYTES,
            ),
            _col(
                "client.country",
                "string",
                "country|client country",
                ("US", "DE", "JP", "BR", "IN", "GB"),
                dim=True,
            ),
            _col(
                "cdn.ttfb_ms", "float", "time to first byte|TTFB", thresholds=(20, 50, 100, 200, 500), **_MS
            ),
            _col("tls.version", "string", "TLS version", ("TLSv1.2", "TLSv1.3"), dim=True),
            _col(
                "http.content_type",
                "string",
                "content type",
                ("text/html", "image/png", "application/json", "video/mp4"),
                dim=True,
                prefixes=("image/", "video/", "text/"),
            ),
            _col(
                "cdn.origin_fetch",
                "boolean",
                "origin fetch flag",
                yes=("that went to origin",),
                no=("served from the edge",),
            ),
        ),
        {
            "service.name": {"values": ("edge-proxy", "cdn-router", "origin-shield", "image-resizer")},
            "http.route": _routes("/static/app.js", "/images/hero.png", "/index.html", "/video/intro.mp4"),
        },
    ),
    Domain(
        "database",
        ("queries", "db calls", "spans", "events"),
        (
            _col(
                "db.system",
                "string",
                "database system|database engine",
                ("postgresql", "mysql", "redis", "mongodb"),
                dim=True,
            ),
            _col(
                "db.statement",
                "string",
                "SQL statement|db statement",
                substrings=("SELECT", "JOIN", "orders"),
                prefixes=("SELECT", "UPDATE", "INSERT", "DELETE"),
            ),
            _col(
                "db.operation",
                "string",
                "db operation|operation",
                ("SELECT", "INSERT", "UPDATE", "DELETE"),
                dim=True,
            ),
            _col(
                "db.name",
                "string",
                "database|database name",
                ("orders", "users", "inventory", "analytics"),
                dim=True,
            ),
            _col("db.sql.table", "string", "table", ("orders", "users", "payments", "sessions"), dim=True),
            _col(
                "db.rows_affected",
                "integer",
                "rows affected|row count",
                thresholds=(0, 1, 100, 1000, 10000),
                additive=True,
            ),
            _col(
                "db.pool.wait_ms",
                "float",
                "connection pool wait|pool wait time",
                thresholds=(5, 10, 50, 100, 500),
                **_MS,
            ),
            _col(
                "db.slow_query",
                "boolean",
                "slow query flag",
                yes=("flagged as slow queries",),
                no=("not flagged as slow",),
            ),
            _col("db.user", "string", "database user|db user", ("app", "readonly", "migrator"), dim=True),
        ),
        {
            "service.name": {"values": ("order-service", "user-service", "reporting", "db-proxy")},
            "http.route": _routes("/api/users", "/api/orders", "/api/reports", "/internal/migrate"),
        },
    ),
)

# Post-modifiers for particular (column, op) pairs; {v} is the value, {secs} a whole number of seconds.
_POST_PHRASES: dict[tuple[str, str], tuple[str, ...]] = {
    ("service.name", "="): ("for the {v} service", "from {v}", "on {v}", "in the {v} service"),
    ("region", "="): ("in {v}", "from {v}"),
    ("deployment.environment", "="): ("in {v}",),
    ("http.route", "="): ("on {v}", "to {v}", "hitting {v}"),
    ("http.method", "="): ("using {v}", "with method {v}"),
    ("http.status_code", "="): ("that returned {v}", "with status {v}", "returning {v}"),
    ("k8s.namespace.name", "="): ("in the {v} namespace",),
    ("k8s.node.name", "="): ("on node {v}", "running on {v}"),
    ("customer.tier", "="): ("for {v} customers", "from {v}-tier customers"),
    ("payment.provider", "="): ("processed by {v}", "via {v}"),
    ("cdn.pop", "="): ("served from {v}", "at the {v} PoP"),
    ("client.country", "="): ("from clients in {v}",),
    ("db.system", "="): ("against {v}", "hitting {v}"),
    ("duration_ms", ">"): (
        "slower than {v}ms",
        "taking longer than {v}ms",
        "taking more than {secs}",
        "slower than {secs}",
    ),
    ("duration_ms", "<"): ("faster than {v}ms", "taking less than {v}ms", "finishing in under {secs}"),
    ("trace.parent_id", "does-not-exist"): ("for root spans only", "that are root spans"),
}
_VERBAL_PREDICATES = {
    "=": ("{n} is {v}", "{n} equals {v}"),
    "!=": ("{n} is not {v}", "{n} isn't {v}"),
    ">": ("{n} is over {v}", "{n} is above {v}", "{n} exceeds {v}", "{n} is greater than {v}"),
    ">=": ("{n} is at least {v}", "{n} is {v} or more"),
    "<": ("{n} is under {v}", "{n} is below {v}", "{n} is less than {v}"),
    "<=": ("{n} is at most {v}", "{n} is {v} or less", "{n} is no more than {v}"),
    "exists": ("{n} is set", "{n} is present", "there is a {n}"),
    "does-not-exist": ("{n} is missing", "{n} is not set", "there is no {n}"),
    "contains": ("{n} contains {v}", "{n} includes {v}", "{n} mentions {v}"),
    "starts-with": ("{n} starts with {v}", "{n} begins with {v}"),
    "in": ("{n} is one of ({v})", "{n} is any of ({v})"),
}
_SYMBOLIC_PREDICATES = {
    "exists": "{n} exists",
    "does-not-exist": "{n} does not exist",
    "contains": "{n} contains {v}",
    "starts-with": "{n} starts with {v}",
    "in": "{n} in ({v})",
}
_FIVE_XX = ("with a 5xx status", "that returned 5xx errors", "with server errors (5xx)")
_CALC_PHRASES = {
    "AVG": ("average {n}", "mean {n}", "avg {n}"),
    "P50": ("median {n}", "p50 {n}", "50th percentile {n}"),
    "P90": ("p90 {n}", "90th percentile {n}"),
    "P95": ("p95 {n}", "95th percentile {n}"),
    "P99": ("p99 {n}", "99th percentile {n}", "tail {n} (p99)"),
    "MIN": ("minimum {n}", "min {n}", "smallest {n}"),
    "MAX": ("maximum {n}", "max {n}", "peak {n}", "largest {n}"),
    "SUM": ("total {n}", "sum of {n}"),
    "HEATMAP": ("heatmap of {n}", "{n} heatmap", "distribution of {n}"),
    "COUNT": ("count of {e}", "number of {e}", "{e} count"),
    "COUNT_DISTINCT": ("number of unique {p}", "count of distinct {p}", "unique {p} count"),
}
_MEASURE_OPS = ("AVG", "P50", "P90", "P95", "P99", "MIN", "MAX", "SUM", "HEATMAP")
_MEASURE_WEIGHTS = (3, 1, 1, 2, 2, 1, 0.6, 1.5, 1)
_NUMBER_WORDS = {3: "three", 5: "five", 10: "ten"}
_TIME_UNITS = (  # (unit, abbreviation, seconds, typical counts)
    ("minute", "m", 60, (5, 10, 15, 20, 30, 45)),
    ("hour", "h", 3600, (1, 2, 3, 4, 6, 8, 12, 24, 48)),
    ("day", "d", 86400, (1, 2, 3, 5, 7, 14, 30)),
)
_TIME_LEADS = (
    "in the last",
    "over the last",
    "in the past",
    "over the past",
    "for the last",
    "during the last",
)
_NAMED_TIMES = (
    ("yesterday", 86400),
    ("over the past day", 86400),
    ("in the past week", 604800),
    ("over the past week", 604800),
    ("this past week", 604800),
    ("in the past hour", 3600),
    ("over the past month", 2592000),
)


@dataclass(frozen=True)
class Example:
    """One generated question with its schema, target query and the wording template used."""

    question: str
    columns: tuple[tuple[str, str], ...]
    query: dict[str, Any]
    template: str
    domain: str

    @property
    def prompt(self) -> str:
        return format_prompt(self.question, list(self.columns))

    @property
    def completion(self) -> str:
        return dump_query(self.query)


@dataclass
class _Clause:
    text: str
    flt: dict[str, Any]
    post: bool  # a post-modifier ("for the x service") rather than a "where" predicate


def _plural(noun: str) -> str:
    if noun.endswith(("s", "x")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


class _Builder:
    """Draws the parts of one question over a sampled schema."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.domain = rng.choice(DOMAINS)
        self.columns, self.types = self._sample_schema()

    def _sample_schema(self) -> tuple[list[Column], dict[str, str]]:
        rng, domain = self.rng, self.domain
        pool = [replace(c, **domain.overrides.get(c.name, {})) for c in COMMON_COLUMNS + domain.columns]
        if rng.random() < 0.25:
            other = rng.choice([d for d in DOMAINS if d is not domain])
            pool += rng.sample(other.columns, rng.randint(1, 3))
        required, rest = pool[:2], pool[2:]  # service.name and duration_ms are in every dataset
        size = rng.randint(MIN_COLUMNS, min(MAX_COLUMNS, len(pool)))
        columns = required + rng.sample(rest, size - len(required))
        return columns, {c.name: rng.choice(c.types) for c in columns}

    def pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(self.types.items()))

    def numeric(self, col: Column) -> bool:
        return self.types[col.name] in ("integer", "float")

    def measures(self) -> list[Column]:
        return [c for c in self.columns if c.thresholds and self.numeric(c)]

    def dims(self, exclude: tuple[str, ...] = ()) -> list[Column]:
        return [c for c in self.columns if c.dim and c.name not in exclude]

    def noun(self, col: Column) -> str:
        return col.name if self.rng.random() < 0.2 else self.rng.choice(col.nouns)

    def plural(self, col: Column) -> str:
        return f"{col.name} values" if self.rng.random() < 0.15 else _plural(self.rng.choice(col.nouns))

    def entity(self) -> str:
        return self.rng.choice(self.domain.entities)

    def number(self, k: int) -> str:
        return _NUMBER_WORDS[k] if k in _NUMBER_WORDS and self.rng.random() < 0.3 else str(k)

    # --- calculations -------------------------------------------------------------------------------------
    def calc(self, op: str, col: Column | None) -> tuple[str, dict[str, Any]]:
        phrase = self.rng.choice(_CALC_PHRASES[op])
        if col is None:
            return phrase.format(e=self.entity()), {"op": "COUNT"}
        text = phrase.format(n=self.noun(col), p=self.plural(col))
        return text, {"op": op, "column": col.name}

    def measure_calc(self, col: Column | None = None) -> tuple[str, dict[str, Any]]:
        col = col or self.rng.choice(self.measures())
        weighted = zip(_MEASURE_OPS, _MEASURE_WEIGHTS, strict=True)
        ops = [(op, w) for op, w in weighted if op != "SUM" or col.additive]
        op = self.rng.choices([o for o, _ in ops], [w for _, w in ops])[0]
        return self.calc(op, col)

    def any_calc(self) -> tuple[str, dict[str, Any]]:
        distinct = [c for c in self.columns if c.distinct]
        r = self.rng.random()
        if r < 0.2:
            return self.calc("COUNT", None)
        if r < 0.3 and distinct:
            return self.calc("COUNT_DISTINCT", self.rng.choice(distinct))
        return self.measure_calc()

    # --- filters ------------------------------------------------------------------------------------------
    def _value_text(self, col: Column, value: Any, op: str) -> str:
        if isinstance(value, list):
            return ", ".join(str(v) for v in value)
        if isinstance(value, str) and (op in ("contains", "starts-with") or self.rng.random() < 0.15):
            return f"'{value}'"
        if op in (">", ">=", "<", "<=") and self.rng.random() < 0.8:
            return col.fmt.format(v=value)
        return str(value)

    def _ops(self, col: Column) -> list[tuple[str, float]]:
        if self.types[col.name] == "boolean":
            return [("=", 1)]
        ops: list[tuple[str, float]] = [("exists", 0.3), ("does-not-exist", 0.3)]
        if col.values:
            ops += [("=", 5), ("!=", 1.2), ("in", 1)]
        if col.thresholds and self.numeric(col):
            ops += [(">", 4), (">=", 1.5), ("<", 2), ("<=", 1)]
        if self.types[col.name] == "string":
            ops += [("contains", 1.5)] if col.substrings else []
            ops += [("starts-with", 1.5)] if col.prefixes else []
        return ops

    def _typed(self, col: Column, value: Any) -> Any:
        return str(value) if self.types[col.name] == "string" else value

    def clause(self, col: Column, predicate_only: bool = False) -> _Clause:
        """A filter on ``col`` and its wording; ``predicate_only`` forces "<column> <op> <value>" wording."""
        rng, name = self.rng, col.name
        if name == "http.status_code" and rng.random() < 0.2 and not predicate_only:
            five_xx = ("starts-with", "5") if self.types[name] == "string" else (">=", 500)
            flt = {"column": name, "op": five_xx[0], "value": five_xx[1]}
            return _Clause(rng.choice(_FIVE_XX), flt, True)
        ops = self._ops(col)
        op = rng.choices([o for o, _ in ops], [w for _, w in ops])[0]
        value: Any = None
        if self.types[name] == "boolean":
            value = rng.random() < 0.7
        elif op in ("=", "!="):
            value = self._typed(col, rng.choice(col.values))
        elif op == "in":
            picked = rng.sample(col.values, min(len(col.values), rng.randint(2, 3)))
            value = [self._typed(col, v) for v in picked]
        elif op in (">", ">=", "<", "<="):
            value = rng.choice(col.thresholds)
        elif op == "contains":
            value = rng.choice(col.substrings)
        elif op == "starts-with":
            value = rng.choice(col.prefixes)
        flt = {"column": name, "op": op} | ({} if value is None else {"value": value})
        if predicate_only or rng.random() < 0.35:
            return _Clause(self._predicate(col, op, value), flt, False)
        if isinstance(value, bool):
            return _Clause(rng.choice(col.yes if value else col.no), flt, True)
        posts = [
            p
            for p in _POST_PHRASES.get((name, op), ())
            if "{secs}" not in p or (isinstance(value, int) and value >= 1000 and value % 1000 == 0)
        ]
        if posts:
            secs = f"{value // 1000} second{'s' if value != 1000 else ''}" if isinstance(value, int) else ""
            return _Clause(rng.choice(posts).format(v=value, secs=secs), flt, True)
        return _Clause(self._predicate(col, op, value), flt, False)

    def _predicate(self, col: Column, op: str, value: Any) -> str:
        text = "" if value is None else self._value_text(col, value, op)
        if isinstance(value, bool):
            text = str(value).lower()
        if self.rng.random() < 0.3:
            template = _SYMBOLIC_PREDICATES.get(op, "{n} " + op + " {v}")
            return template.format(n=col.name, v=text)
        return self.rng.choice(_VERBAL_PREDICATES[op]).format(n=self.noun(col), v=text)

    def filters(self, n: int, predicate_only: bool = False) -> list[_Clause]:
        """Filters on ``n`` different columns, post-modifiers first (the order they are worded in).

        Columns that only support exists/does-not-exist are drawn less often.
        """
        candidates = list(self.columns)
        chosen: list[Column] = []
        while len(chosen) < n and candidates:
            weights = [
                1.0 if c.values or c.thresholds or c.yes or c.prefixes or c.substrings else 0.2
                for c in candidates
            ]
            chosen.append(candidates.pop(self.rng.choices(range(len(candidates)), weights)[0]))
        return sorted((self.clause(c, predicate_only) for c in chosen), key=lambda c: not c.post)

    def filter_text(self, clauses: list[_Clause], combination: str = "AND") -> str:
        if combination == "OR":
            a, b = (c.text for c in clauses)
            return " " + self.rng.choice(
                ("where either {} or {}", "where {} or {}", "matching {} or {}", "that match either {} or {}")
            ).format(a, b)
        posts = [c.text for c in clauses if c.post]
        preds = [c.text for c in clauses if not c.post]
        text = "".join(" " + p for p in posts)
        if preds:
            text += " " + self.rng.choice(("where", "when", "if")) + " " + " and ".join(preds)
        return text

    # --- breakdowns and time ------------------------------------------------------------------------------
    def group_text(self, cols: list[Column]) -> str:
        if not cols:
            return ""
        lead = self.rng.choice(("by", "per", "broken down by", "grouped by", "for each", "split by"))
        return f" {lead} " + " and ".join(self.noun(c) for c in cols)

    def time(self) -> tuple[str, int]:
        rng = self.rng
        r = rng.random()
        if r < 0.2:
            return "", DEFAULT_TIME_RANGE
        if r < 0.4:
            return rng.choice(_NAMED_TIMES)
        unit, short, seconds, counts = rng.choice(_TIME_UNITS)
        n = rng.choice(counts)
        if rng.random() < 0.15:
            return f"{rng.choice(('in the last', 'last'))} {n}{short}", n * seconds
        amount = unit if n == 1 else f"{n} {unit}s"
        return f"{rng.choice(_TIME_LEADS)} {amount}", n * seconds


def _filters_and_groups(b: _Builder, max_groups: int = 2) -> tuple[list[_Clause], list[Column]]:
    """0-2 filters and 0-``max_groups`` breakdowns, at least one of either."""
    rng = b.rng
    n_filters = rng.choices((0, 1, 2), (3, 5, 2))[0]
    clauses = b.filters(n_filters)
    used = tuple(c.flt["column"] for c in clauses)
    dims = b.dims(exclude=used)
    n_groups = min(len(dims), rng.choices((0, 1, 2), (4, 5, 1))[0] if max_groups > 1 else rng.randint(0, 1))
    if not clauses and not n_groups:
        n_groups = min(1, len(dims))
    return clauses, rng.sample(dims, n_groups)


def _sort_suffix(b: _Builder, calc: dict[str, Any], groups: list[Column]) -> tuple[str, list[dict[str, Any]]]:
    """Optional ordering of a broken-down result, by the calculation or by the breakdown column."""
    rng = b.rng
    if not groups or calc["op"] == "HEATMAP" or rng.random() < 0.7:
        return "", []
    if rng.random() < 0.25:
        col = groups[0]
        return f", sorted by {b.noun(col)}", [{"column": col.name, "order": "ascending"}]
    descending = rng.random() < 0.7
    phrases = (
        (", highest first", ", sorted descending", ", ordered from highest to lowest")
        if descending
        else (", lowest first", ", sorted ascending", ", ordered from lowest to highest")
    )
    return rng.choice(phrases), [calc | {"order": "descending" if descending else "ascending"}]


_Frame = Callable[[_Builder], tuple[str, int, dict[str, Any]] | None]
_FRAMES: dict[str, _Frame] = {}


def _frame(fn: _Frame) -> _Frame:
    _FRAMES[fn.__name__.lstrip("_")] = fn
    return fn


def _pick(b: _Builder, variants: tuple[str, ...]) -> tuple[int, str]:
    i = b.rng.randrange(len(variants))
    return i, variants[i]


def _query(
    calcs: list[dict[str, Any]],
    clauses: list[_Clause],
    groups: list[Column],
    time_range: int,
    orders: Sequence[dict[str, Any]] = (),
    limit: int | None = None,
    combination: str = "AND",
) -> dict[str, Any]:
    """The target query; empty parts are left out."""
    query = {
        "calculations": calcs,
        "filters": [c.flt for c in clauses],
        "filter_combination": "OR" if combination == "OR" else None,
        "breakdowns": [c.name for c in groups],
        "orders": list(orders),
        "time_range": time_range,
        "limit": limit,
    }
    return {key: value for key, value in query.items() if value not in (None, [])}


_AGGREGATE = (
    "show me the {calc}{of}{filters}{group}{time}",
    "what's the {calc}{of}{filters}{group}{time}?",
    "what is the {calc}{of}{filters}{group}{time}?",
    "give me the {calc}{of}{filters}{group}{time}",
    "graph the {calc}{of}{filters}{group}{time}",
    "{calc}{of}{filters}{group}{time}",
    "can you plot the {calc}{of}{filters}{group}{time}?",
    "I'd like to see the {calc}{of}{filters}{group}{time}",
    "what was the {calc}{of}{filters}{group}{time}?",
    "how does the {calc}{of}{filters} look{group}{time}?",
)


@_frame
def _aggregate(b: _Builder) -> tuple[str, int, dict[str, Any]] | None:
    text, calc = b.any_calc()
    clauses, groups = _filters_and_groups(b)
    phrase, seconds = b.time()
    suffix, orders = _sort_suffix(b, calc, groups)
    counted = calc["op"] in ("COUNT", "COUNT_DISTINCT")  # their wording already names what is counted
    of = "" if counted else b.rng.choice(("", "", f" of {b.entity()}", f" for {b.entity()}"))
    i, variant = _pick(b, _AGGREGATE)
    question = _render(
        b,
        variant,
        phrase,
        suffix,
        calc=text,
        of=of,
        filters=b.filter_text(clauses),
        group=b.group_text(groups),
    )
    return question, i, _query([calc], clauses, groups, seconds, orders)


_COUNT = (
    "how many {entity}{filters}{group}{time}?",
    "how many {entity} were there{filters}{group}{time}?",
    "count {entity}{filters}{group}{time}",
    "count the {entity}{filters}{group}{time}",
    "number of {entity}{filters}{group}{time}",
    "show me the number of {entity}{filters}{group}{time}",
    "give me a count of {entity}{filters}{group}{time}",
    "total {entity}{filters}{group}{time}",
    "how many {entity} did we get{filters}{group}{time}?",
)


@_frame
def _count(b: _Builder) -> tuple[str, int, dict[str, Any]] | None:
    clauses, groups = _filters_and_groups(b)
    phrase, seconds = b.time()
    calc = {"op": "COUNT"}
    suffix, orders = _sort_suffix(b, calc, groups)
    i, variant = _pick(b, _COUNT)
    question = _render(
        b,
        variant,
        phrase,
        suffix,
        entity=b.entity(),
        filters=b.filter_text(clauses),
        group=b.group_text(groups),
    )
    return question, i, _query([calc], clauses, groups, seconds, orders)


_DISTINCT = (
    "how many unique {plural}{filters}{group}{time}?",
    "how many distinct {plural}{filters}{group}{time}?",
    "count distinct {name}{filters}{group}{time}",
    "number of unique {plural}{filters}{group}{time}",
    "what's the number of distinct {plural}{filters}{group}{time}?",
    "how many different {plural} were seen{filters}{group}{time}?",
)


@_frame
def _count_distinct(b: _Builder) -> tuple[str, int, dict[str, Any]] | None:
    distinct = [c for c in b.columns if c.distinct]
    if not distinct:
        return None
    col = b.rng.choice(distinct)
    clauses, groups = _filters_and_groups(b, max_groups=1)
    groups = [g for g in groups if g is not col]
    phrase, seconds = b.time()
    i, variant = _pick(b, _DISTINCT)
    question = _render(
        b,
        variant,
        phrase,
        "",
        plural=b.plural(col),
        name=col.name,
        filters=b.filter_text(clauses),
        group=b.group_text(groups),
    )
    return question, i, _query([{"op": "COUNT_DISTINCT", "column": col.name}], clauses, groups, seconds)


# (wording, needs) where needs is "calc", "count" or "latency"; {k} is the limit, {dims}/{dim} the breakdown.
_TOP_DESC = (
    ("top {k} {dims} by {calc}{filters}{time}", "calc"),
    ("which {k} {dims} have the highest {calc}{filters}{time}?", "calc"),
    ("show the {k} {dims} with the highest {calc}{filters}{time}", "calc"),
    ("what are the top {k} {dims} by {calc}{filters}{time}?", "calc"),
    ("which {dim} has the highest {calc}{filters}{time}?", "calc"),
    ("list the {k} {dims} with the most {entity}{filters}{time}", "count"),
    ("which {k} {dims} get the most {entity}{filters}{time}?", "count"),
    ("what are the {k} most common {dims}{filters}{time}?", "count"),
    ("which {k} {dims} are the slowest by {calc}{filters}{time}?", "latency"),
    ("which {dim} is the slowest by {calc}{filters}{time}?", "latency"),
)
_TOP_ASC = (
    ("bottom {k} {dims} by {calc}{filters}{time}", "calc"),
    ("which {k} {dims} have the lowest {calc}{filters}{time}?", "calc"),
    ("which {dim} has the lowest {calc}{filters}{time}?", "calc"),
    ("show the {k} {dims} with the fewest {entity}{filters}{time}", "count"),
    ("which {k} {dims} are the fastest by {calc}{filters}{time}?", "latency"),
)


@_frame
def _top_n(b: _Builder) -> tuple[str, int, dict[str, Any]] | None:
    rng = b.rng
    descending = rng.random() < 0.75
    variants = _TOP_DESC if descending else _TOP_ASC
    i, (variant, needs) = _pick(b, variants)
    clauses = b.filters(rng.choices((0, 1, 2), (3, 5, 1))[0])
    dims = b.dims(exclude=tuple(c.flt["column"] for c in clauses))
    latency = [c for c in b.measures() if c.latency]
    if not dims or (needs == "latency" and not latency):
        return None
    dim = rng.choice(dims)
    if needs == "count":
        text, calc = b.calc("COUNT", None)
    elif needs == "latency":
        op = rng.choice(("AVG", "P50", "P90", "P95", "P99", "MAX"))
        text, calc = b.calc(op, rng.choice(latency))
    else:
        text, calc = b.measure_calc() if rng.random() < 0.8 else b.calc("COUNT", None)
        if calc["op"] == "HEATMAP":
            return None
    k = 1 if "{dim}" in variant else rng.choice((3, 5, 5, 10, 10, 20))
    phrase, seconds = b.time()
    question = _render(
        b,
        variant,
        phrase,
        "",
        k=b.number(k),
        dims=b.plural(dim),
        dim=b.noun(dim),
        calc=text,
        entity=b.entity(),
        filters=b.filter_text(clauses),
    )
    order = calc | {"order": "descending" if descending else "ascending"}
    offset = 0 if descending else len(_TOP_DESC)
    return question, offset + i, _query([calc], clauses, [dim], seconds, [order], k)


_MULTI = (
    "show {c1} and {c2}{of}{filters}{group}{time}",
    "compare {c1} and {c2}{of}{filters}{group}{time}",
    "what are the {c1} and the {c2}{of}{filters}{group}{time}?",
    "give me {c1} alongside {c2}{of}{filters}{group}{time}",
    "{c1} and {c2}{of}{filters}{group}{time}",
    "I want both the {c1} and the {c2}{of}{filters}{group}{time}",
)


@_frame
def _multi_calc(b: _Builder) -> tuple[str, int, dict[str, Any]] | None:
    rng = b.rng
    col = rng.choice(b.measures())
    pair = rng.choice((("AVG", "P99"), ("P50", "P95"), ("MIN", "MAX"), ("AVG", "MAX"), ("P50", "P99"), None))
    if pair is None:
        first, second = b.calc("COUNT", None), b.measure_calc(col)
        if second[1]["op"] == "HEATMAP":
            return None
    else:
        first, second = b.calc(pair[0], col), b.calc(pair[1], col)
    clauses, groups = _filters_and_groups(b)
    phrase, seconds = b.time()
    of = rng.choice(("", "", f" for {b.entity()}"))
    i, variant = _pick(b, _MULTI)
    question = _render(
        b,
        variant,
        phrase,
        "",
        c1=first[0],
        c2=second[0],
        of=of,
        filters=b.filter_text(clauses),
        group=b.group_text(groups),
    )
    return question, i, _query([first[1], second[1]], clauses, groups, seconds)


_HEATMAP = (
    "show a heatmap of {n}{of}{filters}{group}{time}",
    "heatmap {n}{of}{filters}{group}{time}",
    "visualize the distribution of {n}{of}{filters}{group}{time}",
    "plot {n} as a heatmap{of}{filters}{group}{time}",
    "what does the {n} distribution look like{of}{filters}{group}{time}?",
)


@_frame
def _heatmap(b: _Builder) -> tuple[str, int, dict[str, Any]] | None:
    col = b.rng.choice(b.measures())
    clauses, groups = _filters_and_groups(b, max_groups=1)
    phrase, seconds = b.time()
    of = b.rng.choice(("", f" for {b.entity()}"))
    i, variant = _pick(b, _HEATMAP)
    question = _render(
        b,
        variant,
        phrase,
        "",
        n=b.noun(col),
        of=of,
        filters=b.filter_text(clauses),
        group=b.group_text(groups),
    )
    return question, i, _query([{"op": "HEATMAP", "column": col.name}], clauses, groups, seconds)


_OR = (
    ("how many {entity}{filters}{group}{time}?", "count"),
    ("count {entity}{filters}{group}{time}", "count"),
    ("number of {entity}{filters}{group}{time}", "count"),
    ("show the {calc}{of}{filters}{group}{time}", "calc"),
    ("what's the {calc}{of}{filters}{group}{time}?", "calc"),
)


@_frame
def _or_filter(b: _Builder) -> tuple[str, int, dict[str, Any]] | None:
    rng = b.rng
    clauses = b.filters(2, predicate_only=True)
    if len(clauses) < 2:
        return None
    i, (variant, needs) = _pick(b, _OR)
    text, calc = b.calc("COUNT", None) if needs == "count" else b.measure_calc()
    dims = b.dims(exclude=tuple(c.flt["column"] for c in clauses))
    groups = rng.sample(dims, min(rng.randint(0, 1), len(dims)))
    phrase, seconds = b.time()
    of = f" of {b.entity()}"
    question = _render(
        b,
        variant,
        phrase,
        "",
        entity=b.entity(),
        calc=text,
        of=of,
        filters=b.filter_text(clauses, "OR"),
        group=b.group_text(groups),
    )
    return question, i, _query([calc], clauses, groups, seconds, combination="OR")


_FRAME_WEIGHTS = {
    "aggregate": 4,
    "count": 2,
    "count_distinct": 1,
    "top_n": 3,
    "multi_calc": 1,
    "heatmap": 0.7,
    "or_filter": 1,
}


def _render(b: _Builder, variant: str, time_phrase: str, suffix: str, **parts: str) -> str:
    """Fill a wording template; the time phrase goes at the end or, sometimes, in front."""
    front = bool(time_phrase) and b.rng.random() < 0.2
    text = variant.format(time="" if front or not time_phrase else " " + time_phrase, **parts)
    question_mark = text.endswith("?")
    text = text.rstrip("?") + suffix + ("?" if question_mark else "")
    if front:
        text = f"{time_phrase}, {text}"
    text = re.sub(r"\s+", " ", text).strip()
    return text[0].upper() + text[1:] if b.rng.random() < 0.5 else text


def generate_example(rng: random.Random) -> Example:
    """Draw one example (schema, question, query) from ``rng``."""
    names, weights = list(_FRAME_WEIGHTS), list(_FRAME_WEIGHTS.values())
    while True:
        b = _Builder(rng)
        name = rng.choices(names, weights)[0]
        result = _FRAMES[name](b)
        if result is None:
            continue
        question, variant, query = result
        example = Example(question, b.pairs(), query, f"{name}/{variant}", b.domain.name)
        if MIN_COMPLETION_CHARS <= len(example.completion) <= MAX_COMPLETION_CHARS:
            return example


def format_prompt(question: str, columns: list[tuple[str, str]]) -> str:
    """The user message: instruction, the schema as ``name (type)`` lines, then the question."""
    schema = "\n".join(f"{name} ({kind})" for name, kind in columns)
    return f"{INSTRUCTION}\n\nColumns:\n{schema}\n\nQuestion: {question}"


_SCHEMA_LINE = re.compile(r"^(\S+) \((string|integer|float|boolean)\)$")


def columns_from_prompt(prompt: str) -> dict[str, str]:
    """Recover the ``{column: type}`` schema from a prompt made by :func:`format_prompt`."""
    block = prompt.split("\n\nColumns:\n", 1)[1].split("\n\n", 1)[0]
    return {m[1]: m[2] for line in block.splitlines() if (m := _SCHEMA_LINE.match(line))}


def make_task_splits(
    seed: int = 0, n_train: int = 2000, n_validation: int = 200, n_test: int = 200
) -> dict[str, list[dict[str, str]]]:
    """Generate train/validation/test records ``{"prompt", "completion", "id"}`` with no prompt shared."""
    rng = random.Random(seed)
    sizes = dict(zip(SPLITS, (n_train, n_validation, n_test), strict=True))
    seen: set[str] = set()
    splits: dict[str, list[dict[str, str]]] = {}
    for split, size in sizes.items():
        records = splits[split] = []
        while len(records) < size:
            example = generate_example(rng)
            if example.prompt in seen:
                continue
            seen.add(example.prompt)
            records.append(
                {
                    "prompt": example.prompt,
                    "completion": example.completion,
                    "id": f"{split}-{len(records):05d}",
                }
            )
    return splits


TASK_DATA = GeneratedSplits(
    make_task_splits,
    {"format_version": FORMAT_VERSION},
    (2000, 200, 200),
    "medusa-lora make-task-data",
    "generate the built-in NL-to-query task dataset",
    Path("data/task"),
)
write_task_data = TASK_DATA.write  # prompt/completion splits, reused if made with the same parameters
main = TASK_DATA.main
