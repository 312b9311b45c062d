"""Prometheus metrics, one registry per application so tests can build many apps."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
EVAL_BUCKETS_SECONDS = (0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.receipts = Counter("loyalty_receipts", "Receipt requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.request_latency = Histogram("loyalty_request_duration_seconds", "HTTP request latency",
                                         ["route", "method"], buckets=LATENCY_BUCKETS_SECONDS, registry=r)
        self.points_accrued = Counter("loyalty_points_accrued", "Points accrued by rule", ["rule"], registry=r)
        self.points_redeemed = Counter("loyalty_points_redeemed", "Points redeemed on receipts", registry=r)
        self.points_reversed = Counter("loyalty_points_reversed", "Accrued points reversed by returns and cancels",
                                       registry=r)
        self.rules_eval = Histogram("loyalty_rules_evaluation_seconds", "Time to evaluate one receipt",
                                    buckets=EVAL_BUCKETS_SECONDS, registry=r)
        self.commit_batch = Histogram("loyalty_ledger_commit_batch_size", "Writes per ledger transaction",
                                      buckets=BATCH_BUCKETS, registry=r)
        self.commit_time = Histogram("loyalty_ledger_commit_seconds", "Time of one ledger transaction incl. fsync",
                                     buckets=LATENCY_BUCKETS_SECONDS, registry=r)
        self.write_queue = Gauge("loyalty_ledger_write_queue_depth", "Writes waiting for the writer", registry=r)
        self.rules_info = Info("loyalty_rules", "The loaded rules program", registry=r)
        self.rules_reloads = Counter("loyalty_rules_reloads", "Program reloads by result", ["result"], registry=r)
        self.rules_last_reload_ok = Gauge("loyalty_rules_last_reload_ok",
                                          "1 when the last reload succeeded, 0 when it was refused", registry=r)

    def on_commit(self, batch_size: int, seconds: float) -> None:
        self.commit_batch.observe(batch_size)
        self.commit_time.observe(seconds)
