"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class _EngineCollector:
    """Gauges read from the engine at scrape time (queue depth, slot occupancy, throughput)."""

    def __init__(self, service):
        self._service = service

    def collect(self):
        engine = self._service.engine
        slots = self._service.config.engine.slots
        busy = 0 if engine is None else engine.busy_slots
        yield GaugeMetricFamily("aqjax_ready", "1 when the server answers requests", value=int(self._service.ready))
        yield GaugeMetricFamily("aqjax_queue_depth", "requests waiting for a slot",
                                value=0 if engine is None else engine.queue_depth)
        yield GaugeMetricFamily("aqjax_slots_total", "slots of the running batch", value=slots)
        yield GaugeMetricFamily("aqjax_slots_busy", "slots holding a request", value=busy)
        yield GaugeMetricFamily("aqjax_slot_occupancy", "busy slots / slots", value=busy / max(1, slots))
        yield GaugeMetricFamily("aqjax_tokens_per_second", "generated tokens per second (moving average over "
                                "decode chunks)", value=0.0 if engine is None else engine.tokens_per_second)
        yield GaugeMetricFamily("aqjax_engine_recompiles", "policy-envelope growths (each recompiles the step)",
                                value=0 if engine is None else engine.recompiles)
        for name, what in (("chunks", "speculative decode chunks"),
                           ("steps", "verification steps of slots in speculative chunks"),
                           ("drafted", "draft tokens proposed"), ("accepted", "draft tokens accepted")):
            yield CounterMetricFamily(f"aqjax_speculative_{name}", what,
                                      value=0 if engine is None else getattr(engine, f"spec_{name}"))


class Metrics:
    def __init__(self, service):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("aqjax_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("aqjax_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.completion_tokens = Counter("aqjax_completion_tokens", "tokens generated", registry=r)
        self.verdicts = Counter("aqjax_gate_verdicts", "turn verdicts", ["verdict"], registry=r)
        self.rules = Counter("aqjax_gate_rule_events", "gate events by rule", ["level", "kind", "rule", "action"],
                             registry=r)
        self.rejections = Counter("aqjax_policy_rejections", "requests rejected for loosening the policy",
                                  registry=r)
        self.latency = Histogram("aqjax_request_latency_seconds", "submit to last token", ["route"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("aqjax_queue_wait_seconds", "submit to slot", buckets=_LATENCY_BUCKETS,
                                    registry=r)
        self.ttft = Histogram("aqjax_time_to_first_token_seconds", "submit to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("aqjax_inter_token_latency_seconds", "time between tokens of a stream",
                             buckets=_TOKEN_BUCKETS, registry=r)
        r.register(_EngineCollector(service))

    def render(self) -> bytes:
        return generate_latest(self.registry)
