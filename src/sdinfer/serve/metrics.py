"""Prometheus metrics of one server, in a registry of its own (two apps in one process do not
share counters): requests by route and status, request latency, queue depth, images per
pipeline call, images generated, images in the store, and the approximate cache's hits,
misses, steps saved and bytes held (read from ``ApproxCache.stats()`` at each scrape)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


class Metrics:
    def __init__(self, queue_depth=lambda: 0, images_stored=lambda: 0, approx_stats=None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sdinfer_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("sdinfer_request_seconds", "HTTP request latency (to the response's start)",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("sdinfer_batch_size", "images per pipeline call", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.images = Counter("sdinfer_images_generated", "images generated and stored", registry=r)
        self.rejected = Counter("sdinfer_queue_rejections", "requests refused because the queue was full",
                                registry=r)
        Gauge("sdinfer_queue_depth", "jobs waiting for the model", registry=r).set_function(queue_depth)
        Gauge("sdinfer_images_stored", "images in the store", registry=r).set_function(images_stored)
        r.register(_ApproxCacheCollector(approx_stats))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def batch_done(self, images: int) -> None:
        self.batch_size.observe(images)

    def image_stored(self) -> None:
        self.images.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """A pure ASGI middleware that counts each HTTP request by method, route and status and
    observes its latency to the response's start (pure ASGI rather than Starlette's
    ``BaseHTTPMiddleware``, which hides a client's disconnect from the routes)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), {}

        async def observed(message):
            if message["type"] == "http.response.start" and not status:
                status["code"], status["seconds"] = message["status"], time.perf_counter() - start
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe_request(scope.get("method", "GET"), route, status.get("code", 500),
                                         status.get("seconds", time.perf_counter() - start))


class _ApproxCacheCollector:
    """The approximate cache's counters as they stand (zeros when the server has none)."""

    def __init__(self, stats):
        self.stats = stats

    def describe(self):
        return []

    def collect(self):
        s = (self.stats() if self.stats is not None else None) or {}
        yield CounterMetricFamily("sdinfer_approx_cache_hits", "approximate-cache hits", value=s.get("hits", 0))
        yield CounterMetricFamily("sdinfer_approx_cache_misses", "approximate-cache misses",
                                  value=s.get("misses", 0))
        yield CounterMetricFamily("sdinfer_approx_cache_steps_saved", "denoising steps skipped by the cache",
                                  value=s.get("steps_saved", 0))
        yield GaugeMetricFamily("sdinfer_approx_cache_bytes", "bytes the approximate cache holds",
                                value=s.get("bytes", 0))
