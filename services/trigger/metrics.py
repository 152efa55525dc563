"""The trigger service's Prometheus figures (served on its own ``/metrics``, see settings)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

REGISTRY = CollectorRegistry()

LAG = Gauge(
    "stoker_trigger_lag_records",
    "Records of the source partition not yet recorded (end offset - committed offset), per owned partition.",
    ["trigger", "topic", "partition"],
    registry=REGISTRY,
)
RECORDS = Counter(
    "stoker_trigger_records_total",
    "Source records handled, by outcome (delivered, failed, too_large).",
    ["trigger", "outcome"],
    registry=REGISTRY,
)
RETRIES = Counter("stoker_trigger_retries_total", "Attempts after a failed one.", ["trigger"], registry=REGISTRY)
IN_FLIGHT = Gauge("stoker_trigger_in_flight", "Records read and not yet recorded.", ["trigger"], registry=REGISTRY)
FIRINGS = Counter("stoker_trigger_firings_total", "Cron slots fired.", ["trigger"], registry=REGISTRY)
