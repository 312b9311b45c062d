"""Prometheus metrics, one registry per application so tests can build many apps."""
from __future__ import annotations

import time

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
EVAL_BUCKETS_SECONDS = (0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CHECKPOINT_BUCKETS_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# unavailable: PostgreSQL not answering; SQLite's faults are the other three.
STORAGE_CAUSES = ("full", "busy", "lost", "unavailable")
# Label values a Children remembers before it starts again: routes x methods x statuses,
# endpoints x outcomes and the program's rules stay far below it.
CHILDREN_MAX = 4_096


class Children:
    """A labelled metric's children by their label values. prometheus_client's labels()
    checks and formats the values and takes a lock on every call (2-5 us); a confirm asks
    for two children (latency, outcome)."""

    __slots__ = ("metric", "known")

    def __init__(self, metric) -> None:
        self.metric = metric
        self.known: dict[tuple[str, ...], object] = {}

    def __call__(self, *values: str):
        child = self.known.get(values)
        if child is None:
            if len(self.known) >= CHILDREN_MAX:
                self.known.clear()
            child = self.known[values] = self.metric.labels(*values)
        return child


class PointsByRule:
    """loyalty_points_accrued_total{rule}, as a labelled Counter shows it, kept as plain sums:
    a confirm adds once per rule that paid, and a Counter child's inc (its checks, its lock,
    its exemplar path) cost some 7 k instructions each, paid again for every paying rule a
    program adds. The sums are turned into the family only when /metrics is scraped. Added
    to on the event loop's thread only (server/ops/receipts.py), as the scrape reads them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.points: dict[str, int] = {}
        self.created: dict[str, float] = {}     # each series' _created, as a Counter child has it
        registry.register(self)

    def add(self, rule: str, points: int) -> None:
        total = self.points.get(rule)
        if total is None:
            self.created[rule] = time.time()
            total = 0
        self.points[rule] = total + points

    def describe(self):
        return [CounterMetricFamily("loyalty_points_accrued", "Points accrued by rule", labels=["rule"])]

    def collect(self):
        family = CounterMetricFamily("loyalty_points_accrued", "Points accrued by rule", labels=["rule"])
        # Without _created series when prometheus_client's Counters are told to leave them out
        # (PROMETHEUS_DISABLE_CREATED_SERIES, disable_created_metrics()).
        created = getattr(prometheus_metrics, "_use_created", True)
        for rule, points in list(self.points.items()):
            family.add_metric([rule], points, created=self.created[rule] if created else None)
        yield family


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.receipts = Counter("loyalty_receipts", "Receipt requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.request_latency = Histogram("loyalty_request_duration_seconds", "HTTP request latency by route, "
                                         "method and status class (2xx, 4xx, 5xx)", ["route", "method", "status"],
                                         buckets=LATENCY_BUCKETS_SECONDS, registry=r)
        self.points_accrued = PointsByRule(r)
        self.receipts_of, self.request_latency_of = Children(self.receipts), Children(self.request_latency)
        self.points_redeemed = Counter("loyalty_points_redeemed", "Points redeemed on receipts", registry=r)
        self.points_reversed = Counter("loyalty_points_reversed", "Accrued points reversed by returns and cancels",
                                       registry=r)
        self.rules_eval = Histogram("loyalty_rules_evaluation_seconds", "Time to evaluate one receipt",
                                    buckets=EVAL_BUCKETS_SECONDS, registry=r)
        self.commit_batch = Histogram("loyalty_ledger_commit_batch_size", "Writes per ledger transaction "
                                      "(1 on PostgreSQL, which groups commits itself)",
                                      buckets=BATCH_BUCKETS, registry=r)
        self.commit_time = Histogram("loyalty_ledger_commit_seconds", "Time of one ledger transaction incl. fsync "
                                     "(on PostgreSQL: one write, its conflicts' tries included)",
                                     buckets=LATENCY_BUCKETS_SECONDS, registry=r)
        self.write_queue = Gauge("loyalty_ledger_write_queue_depth", "Writes waiting for the writer", registry=r)
        self.rules_info = Info("loyalty_rules", "The loaded rules program", registry=r)
        self.rules_reloads = Counter("loyalty_rules_reloads", "Program reloads by result", ["result"], registry=r)
        self.rules_last_reload_ok = Gauge("loyalty_rules_last_reload_ok",
                                          "1 when the last reload succeeded, 0 when it was refused or failed",
                                          registry=r)

        self.ready = Gauge("loyalty_ready", "1 when /readyz would answer 200 (read at scrape time); 0 while "
                           "starting, preloading, draining or under a storage fault", registry=r)
        self.wal_bytes = Gauge("loyalty_wal_bytes", "Size of the database's WAL file", registry=r)
        self.wal_checkpoints = Counter(
            "loyalty_wal_checkpoints", "WAL checkpoints by mode (passive: checkpoint thread; restart, truncate: "
            "write connection) and result (done, partial, busy, full, error)", ["mode", "result"], registry=r)
        self.wal_checkpoint_time = Histogram("loyalty_wal_checkpoint_seconds", "Time of one WAL checkpoint",
                                             ["mode"], buckets=CHECKPOINT_BUCKETS_SECONDS, registry=r)
        self.oldest_reader = Gauge(
            "loyalty_oldest_reader_seconds", "Age of this server's oldest open read transaction, which keeps "
            "the WAL from being restarted; other processes' readers are not seen", registry=r)
        self.storage_errors = Counter("loyalty_storage_errors", "Writes and reads refused for a storage fault "
                                      "(requests and the server's own jobs), by cause (full, busy, lost; "
                                      "unavailable: PostgreSQL not answering)",
                                      ["cause"], registry=r)
        self.storage_fault = Gauge("loyalty_storage_fault", "1 for the storage fault in force (full: also the "
                                   "disk under database.min_free_mib), 0 for the others", ["cause"], registry=r)
        # Over all webhooks (a dead letter is logged with its webhook, retries are counted per
        # webhook in event_deliveries), so the series exist, at 0, on a server without webhooks too.
        self.events_backlog = Gauge("loyalty_events_backlog", "Events the webhooks still have to receive (pending "
                                    "deliveries and events not yet given to them; dead letters not included)",
                                    registry=r)
        self.webhook_deliveries = Counter("loyalty_webhook_deliveries", "Webhook delivery attempts by result "
                                          "(delivered, failed: to be retried, dead: retries ran out)",
                                          ["result"], registry=r)
        self.webhook_dead_letters = Gauge("loyalty_webhook_dead_letters", "Deliveries that ran out of retries "
                                          "and wait for `loyalty events retry`", registry=r)
        for result in ("delivered", "failed", "dead"):
            self.webhook_deliveries.labels(result)
        for cause in STORAGE_CAUSES:
            self.storage_errors.labels(cause)
            self.storage_fault.labels(cause).set(0)

    def on_commit(self, batch_size: int, seconds: float) -> None:
        self.commit_batch.observe(batch_size)
        self.commit_time.observe(seconds)

    def on_checkpoint(self, mode: str, result: str, seconds: float) -> None:
        self.wal_checkpoints.labels(mode, result).inc()
        self.wal_checkpoint_time.labels(mode).observe(seconds)

    def on_storage_error(self, cause: str, requests: int) -> None:
        self.storage_errors.labels(cause).inc(requests)

    def observe_storage(self, db) -> None:
        """The storage gauges, read at scrape time from the database (storage.db.Database,
        or storage.pg.database.PgDatabase, whose WAL is PostgreSQL's own)."""
        if db.backend == "sqlite":
            self.wal_bytes.set(db.wal_bytes())
        self.oldest_reader.set(db.oldest_read_seconds())
        fault = db.fault()
        for cause in STORAGE_CAUSES:
            self.storage_fault.labels(cause).set(1 if fault is not None and fault.cause == cause else 0)


def status_class(status: int) -> str:
    """The `status` label of loyalty_request_duration_seconds: 2xx, 4xx, 5xx."""
    return f"{status // 100}xx"


def error_code(body) -> str:
    """The `code` of an answer in the one error shape; `no_answer` when there was none (the
    connection was dropped, or the request cancelled)."""
    if isinstance(body, bytes) and body:
        try:
            return msgspec.json.decode(body)["error"]["code"]
        except (msgspec.DecodeError, KeyError, TypeError):
            pass
    return "no_answer"
