"""Prometheus metrics of a serving engine: per-instance load, latency histograms, outcomes."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue = Gauge("epd_queue_length", "Requests waiting at an instance, per stage", ["instance", "stage"], registry=r)
        self.running = Gauge("epd_running_sequences", "Sequences decoding at an instance", ["instance"], registry=r)
        self.kv = Gauge("epd_kv_block_usage", "Share of an instance's KV blocks in use", ["instance"], registry=r)
        self.mm = Gauge("epd_mm_block_usage", "Share of an instance's MM blocks in use", ["instance"], registry=r)
        self.inflight = Gauge("epd_server_inflight_requests", "Requests the server is handling", registry=r)
        self.ttft = Histogram("epd_ttft_seconds", "Time to first token, as the server sees it", buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("epd_tpot_seconds", "Time per output token after the first", buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("epd_requests_total", "Requests by outcome", ["outcome"], registry=r)

    def render(self, pipeline) -> bytes:
        for row in pipeline.load_snapshot(time.time()):
            inst = row["instance"]
            for stage in ("encode", "prefill", "decode"):
                self.queue.labels(inst, stage).set(row[f"{stage}_queue"])
            self.running.labels(inst).set(row["running"])
            self.kv.labels(inst).set(row["kv_usage"])
            self.mm.labels(inst).set(row["mm_usage"])
        return generate_latest(self.registry)
