"""Metrics in Prometheus text format (``serve --metrics`` and ``replicate --metrics``).

One registry per process. The server's store figures are read when scraped (cheap: counts
from the store's records, ``du`` of its directory); counters and histograms are updated where
the work happens.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from nbdsink.errors import UsageError

REGISTRY = CollectorRegistry()

INGEST_BYTES = Counter("nbdsink_ingest_bytes", "Bytes written to volume heads by clients",
                       registry=REGISTRY)
REPLICATE_BYTES_SENT = Counter("nbdsink_replicate_bytes_sent", "Bytes the sender wrote to the "
                               "remote head", registry=REGISTRY)
REPLICATE_ERRORS = Counter("nbdsink_replicate_errors", "Failed sessions and cycles of the sender",
                           registry=REGISTRY)
REPLICATE_CYCLE_SECONDS = Histogram(
    "nbdsink_replicate_cycle_seconds", "Duration of replication cycles", registry=REGISTRY,
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600))
REPLICATE_FREEZE_SECONDS = Histogram(
    "nbdsink_replicate_freeze_seconds", "How long each frozen cycle kept the filesystem frozen",
    registry=REGISTRY, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5))


class _Lag(Collector):
    """nbdsink_replicate_lag_seconds: how old the newest replicated data is, now."""

    def __init__(self) -> None:
        self.captured_at: float | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import time

        g = GaugeMetricFamily("nbdsink_replicate_lag_seconds",
                              "Age of the data in the newest replicated version")
        if self.captured_at is not None:
            g.add_metric([], time.time() - self.captured_at)
        yield g


LAG = _Lag()
REGISTRY.register(LAG)


class StoreCollector(Collector):
    """Per-volume versions and newest version time, and the store's bytes, at scrape time."""

    def __init__(self, store: object) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from nbdsink.store import Store, reclaim

        store = self.store
        assert isinstance(store, Store)
        versions = GaugeMetricFamily("nbdsink_volume_versions", "Committed versions kept",
                                     labels=["volume"])
        latest = GaugeMetricFamily("nbdsink_volume_latest_version_timestamp_seconds",
                                   "Commit time of the newest version", labels=["volume"])
        logical = 0
        for volume in store.volumes():
            listed = store.versions(volume)
            versions.add_metric([volume.name], len(listed))
            if listed:
                latest.add_metric([volume.name], listed[-1].timestamp)
            logical += volume.size
        yield versions
        yield latest
        size = GaugeMetricFamily("nbdsink_store_bytes", "Bytes of the store: logical (volume "
                                 "sizes), stored (data in segments), disk (on disk)",
                                 labels=["kind"])
        size.add_metric(["logical"], logical)
        size.add_metric(["stored"], sum(u.used for u in reclaim.segment_usage(store)))
        size.add_metric(["disk"], reclaim.disk_usage(store.path))
        yield size


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--metrics wants HOST:PORT (for example 127.0.0.1:9464), not {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve_metrics(address: str) -> None:
    """Serve ``/metrics`` on HOST:PORT from a daemon thread."""
    host, port = parse_address(address)
    start_http_server(port, addr=host, registry=REGISTRY)
