"""Prometheus metrics: one registry per app (tests create many apps in one process).

Request counts and latencies are recorded by `service.middleware.MetricsMiddleware`; edits by the
edits router; queue depth and jobs by status are read from Redis when /metrics is scraped, so they
are right whichever API process is asked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.registry import (
    CanceledJobRegistry,
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)

from contract.jobs import queue_name

_REGISTRIES = {
    "deferred": DeferredJobRegistry,
    "scheduled": ScheduledJobRegistry,
    "started": StartedJobRegistry,
    "finished": FinishedJobRegistry,
    "failed": FailedJobRegistry,
    "canceled": CanceledJobRegistry,
}


class QueueCollector(Collector):
    """Queue depth and job counts per model, read from RQ's queues and registries at scrape time."""

    def __init__(self, redis: Redis, models: Callable[[], list[str]]):
        self.redis = redis
        self.models = models

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("crispedit_redis_up", "Whether Redis answered this scrape.")
        depth = GaugeMetricFamily(
            "crispedit_queue_depth", "Jobs waiting in a model's queue.", labels=["model"]
        )
        jobs = GaugeMetricFamily(
            "crispedit_jobs",
            "Jobs per model and RQ status (finished/failed: those still retained).",
            labels=["model", "status"],
        )
        try:
            for model in self.models():
                name = queue_name(model)
                queued = Queue(name, connection=self.redis).count
                depth.add_metric([model], queued)
                jobs.add_metric([model, "queued"], queued)
                for status, registry in _REGISTRIES.items():
                    jobs.add_metric([model, status], registry(name, connection=self.redis).count)
            up.add_metric([], 1)
        except RedisError:
            up.add_metric([], 0)
            yield up
            return
        yield from (up, depth, jobs)


class Metrics:
    """The app's registry and the metrics the code updates directly."""

    def __init__(self, redis: Redis, models: Callable[[], list[str]]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "crispedit_http_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "crispedit_http_request_duration_seconds",
            "HTTP request latency by route template.",
            ["route", "method"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.edits_accepted = Counter(
            "crispedit_edits_accepted",
            "Edit jobs accepted (POST /v1/edits answered 202), by model.",
            ["model"],
            registry=self.registry,
        )
        self.facts_accepted = Counter(
            "crispedit_facts_accepted",
            "Facts in accepted edit jobs, by model.",
            ["model"],
            registry=self.registry,
        )
        self.registry.register(QueueCollector(redis, models))
