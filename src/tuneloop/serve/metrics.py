"""Prometheus metrics for one server: requests, latency, tokens/s, queue depth, batch sizes."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self, engine):
        # A registry per app, so several servers in one process (tests) never share counters.
        self.registry = r = CollectorRegistry()
        self.requests = Counter("tuneloop_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("tuneloop_request_latency_seconds", "HTTP request latency, to the last byte",
                                 ["route"], registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.generations = Counter("tuneloop_generations", "Generation requests accepted, by model", ["model"],
                                   registry=r)
        self.generated = Counter("tuneloop_generated_tokens", "Tokens generated, by model", ["model"], registry=r)
        self.errors = Counter("tuneloop_engine_errors", "Generations that failed inside the engine", registry=r)
        Gauge("tuneloop_tokens_per_second", "Tokens generated per second over the last 10 s",
              registry=r).set_function(engine.tokens_per_second)
        Gauge("tuneloop_queue_depth", "Requests waiting for a slot", registry=r).set_function(engine.queue_depth)
        Gauge("tuneloop_running_requests", "Requests in the running batch", registry=r).set_function(engine.running)
        Gauge("tuneloop_adapters_loaded", "Adapters served over the base", registry=r).set_function(
            lambda: len(engine.adapters))
        Gauge("tuneloop_decode_steps", "Decode steps run", registry=r).set_function(lambda: engine.stats["steps"])
        Gauge("tuneloop_cancelled_requests", "Requests whose client left (or hit a stop string) before the end",
              registry=r).set_function(lambda: engine.stats["cancelled"])
        Gauge("tuneloop_decode_rows", "Rows summed over decode steps (÷ steps = mean batch size)",
              registry=r).set_function(lambda: engine.stats["rows"])

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def requests_started(self, model: str) -> None:
        self.generations.labels(model).inc()

    def tokens(self, model: str, n: int) -> None:
        self.generated.labels(model).inc(n)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
