"""Prometheus metrics shared by every service (names: nbv_ prefix, base units)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

HTTP_REQUESTS = Counter(
    "nbv_http_requests_total", "HTTP requests served", ["service", "route", "method", "status"]
)
HTTP_DURATION = Histogram(
    "nbv_http_request_duration_seconds",
    "HTTP request duration",
    ["service", "route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
EVENTS_INGESTED = Counter(
    "nbv_events_ingested_total", "Events accepted and published", ["source", "type"]
)
EVENTS_REJECTED = Counter("nbv_events_rejected_total", "Events refused at the door", ["reason"])
CONSUMER_RECORDS = Counter(
    "nbv_consumer_records_total", "Records handled by a consumer", ["group", "outcome"]
)
CONSUMER_LAG = Gauge(
    "nbv_consumer_lag_records", "Records not yet committed", ["group", "topic", "partition"]
)
DEAD_LETTERS = Counter("nbv_dead_letters_total", "Records sent to the dead-letter topic", ["group"])
EVENT_TO_VIEW = Histogram(
    "nbv_event_to_view_seconds",
    "Delay from an event's publication to its effect in the view",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
DECISIONS = Counter(
    "nbv_decisions_total", "Elements chosen by decisions", ["element", "channel", "model_version"]
)
DECISION_DURATION = Histogram(
    "nbv_decision_duration_seconds",
    "Time to decide for one user (from the read to the answer of its batch)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
DECISION_COMMIT_BATCH = Histogram(
    "nbv_decision_commit_batch_size",
    "Decisions logged, published and committed per transaction (group commit)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
DECISION_READ_BATCH = Histogram(
    "nbv_decision_read_batch_size",
    "Requests decided together: one read, one scoring call per model",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
EXCLUSIONS = Counter("nbv_exclusions_total", "Candidates excluded by a rule", ["rule"])
DELIVERIES = Counter(
    "nbv_deliveries_total", "Deliveries by channel and outcome", ["channel", "outcome"]
)
RESPONSES = Counter("nbv_responses_total", "Responses received", ["outcome", "channel"])
INBOX_WITHDRAWN = Counter(
    "nbv_inbox_withdrawn_total", "In-app cards withdrawn after impressions without an answer"
)
MODEL_INFO = Gauge(
    "nbv_model_info", "The rankers being served (value 1)", ["version", "kind", "role"]
)
MODEL_TRAFFIC_SHARE = Gauge(
    "nbv_model_traffic_share", "Share of people routed to each served model", ["version", "role"]
)
MODEL_DECISIONS = Counter(
    "nbv_model_decisions_total",
    "Decisions scored, by the model version that scored them",
    ["model_version"],
)
MODEL_RESPONSES = Counter(
    "nbv_model_responses_total",
    "Responses by the model version that scored the decision",
    ["model_version", "outcome"],
)
DELIVERY_ATTEMPTS = Counter(
    "nbv_delivery_attempts_total", "Send attempts on external channels", ["channel", "outcome"]
)
DELIVERY_LATENCY = Histogram(
    "nbv_delivery_latency_seconds",
    "Delay from a decision to its delivery",
    ["channel"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
INBOX_STREAMS = Gauge("nbv_inbox_streams", "Open in-app live streams")
SCHEDULER_BACKLOG = Gauge("nbv_scheduler_backlog_jobs", "Jobs due but not yet done")
SCHEDULER_JOBS = Counter("nbv_scheduler_jobs_total", "Scheduled jobs run", ["kind", "outcome"])
ERASURES = Counter("nbv_erasures_total", "Erasure requests (DELETE /v1/users/{id})", ["known"])
ERASED_EVENTS_DROPPED = Counter(
    "nbv_erased_events_dropped_total",
    "Events of erased people the projector dropped (replays, late arrivals)",
)
RAW_EVENTS_PURGED = Counter(
    "nbv_raw_events_purged_total", "Rows removed by the raw-event retention purge", ["store"]
)
AUTH_FAILURES = Counter(
    "nbv_auth_failures_total", "Requests refused by access control (401/403)", ["reason"]
)
RATE_LIMITED = Counter(
    "nbv_rate_limited_total", "Requests refused with 429 by a key's rate limit", ["key"]
)


def observe_many(histogram: Histogram, values: Iterable[float]) -> None:
    """The same counts as ``histogram.observe(v)`` for each value (an unlabelled histogram, or
    one child of a labelled one), with one locked update per bucket instead of per value.

    The projector observes every event it applies: tens of thousands per batch, and each
    ``observe`` takes a lock and walks the buckets (~2 µs per event, ~2 % of its CPU). The sum
    is added once, so it may differ from one-by-one addition in the last bits of a float.
    """
    # prometheus_client has no bulk observe: this writes the same per-bucket values its
    # ``observe`` writes (bucket i counts the values in (bound[i-1], bound[i]]; the
    # exposition accumulates them), checked against ``observe`` in tests/unit/test_metrics.py.
    bounds: list[float] = histogram._upper_bounds
    counts = [0] * len(bounds)
    total = 0.0
    for value in values:
        counts[bisect_left(bounds, value)] += 1
        total += value
    if not any(counts):
        return
    for bucket, n in zip(histogram._buckets, counts, strict=True):
        if n:
            bucket.inc(n)
    histogram._sum.inc(total)
