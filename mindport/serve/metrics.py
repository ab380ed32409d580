"""The server's Prometheus metrics (text format at ``GET /metrics``), in a registry of its own.

Counters: answers by endpoint and HTTP status (errors included), finished requests by finish_reason, prompt and generated tokens.
Gauges read at scrape time: requests running and waiting (the engine's ``stats()``) and generated
tokens per second over the last ``window`` seconds. Histograms: time to first token and time per
output token (the gap between consecutive tokens of a request).
"""
from __future__ import annotations

import collections
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, engine_stats: Callable[[], dict], window: float = 10.0):
        self.registry = CollectorRegistry()
        self.requests = Counter("mindport_requests", "HTTP answers by endpoint and status", ["endpoint", "status"],
                                registry=self.registry)
        self.finished = Counter("mindport_requests_finished", "Generation requests by finish_reason",
                                ["finish_reason"], registry=self.registry)
        self.prompt_tokens = Counter("mindport_prompt_tokens", "Prompt tokens of accepted requests",
                                     registry=self.registry)
        self.generated_tokens = Counter("mindport_generation_tokens", "Generated tokens", registry=self.registry)
        self.ttft = Histogram("mindport_time_to_first_token_seconds", "From request arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("mindport_time_per_output_token_seconds", "Between consecutive tokens of a request",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        running = Gauge("mindport_num_requests_running", "Requests in the decode batch", registry=self.registry)
        waiting = Gauge("mindport_num_requests_waiting", "Requests in the queue", registry=self.registry)
        rate = Gauge("mindport_generation_tokens_per_second", f"Generated tokens per second over the last "
                     f"{window:g} s", registry=self.registry)
        running.set_function(lambda: engine_stats()["running"])
        waiting.set_function(lambda: engine_stats()["waiting"])
        rate.set_function(self._tokens_per_second)
        self.window = window
        self._token_times: collections.deque[float] = collections.deque()

    def token(self, seconds: float, first: bool) -> None:
        """A generated token, ``seconds`` after the request arrived (``first``) or after its previous token."""
        self.generated_tokens.inc()
        (self.ttft if first else self.tpot).observe(seconds)
        now = time.monotonic()
        self._token_times.append(now)
        self._forget(now)

    def _forget(self, now: float) -> None:
        while self._token_times and self._token_times[0] < now - self.window:
            self._token_times.popleft()

    def _tokens_per_second(self) -> float:
        self._forget(time.monotonic())
        return len(self._token_times) / self.window

    def render(self) -> bytes:
        return generate_latest(self.registry)
