"""Prometheus metrics for banbus nodes (``pip install 'banbus[metrics]'``).

::

    from prometheus_client import start_http_server
    import banbus.metrics

    async with banbus.Node(url, node_id="mx1") as node:
        banbus.metrics.register(node)   # the default registry
        start_http_server(9108)

Values are read from :meth:`Node.statistics` and
:meth:`Supervisor.statistics` at scrape time: no work on the hot path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

if TYPE_CHECKING:
    from collections.abc import Iterator

    from prometheus_client.metrics_core import Metric

    from ._node import Node

__all__ = ["BanbusCollector", "register"]

_COUNTERS = {
    "events_applied": "Stream events applied",
    "events_skipped": "Malformed stream entries or records skipped",
    "own_events_confirmed": "Own events seen coming back from the stream",
    "resyncs": "Full reloads from the record (gap, trimmed cursor, forged entry, data loss)",
    "reconnects": "Reader reconnections",
    "writes_expired": "Own writes dropped because their ban ran out while queued",
    "writes_refused": "Own writes the server refused for good (undone locally)",
    "retries_duplicate": "Retried writes found already written",
    "retries_unverified": "Retried writes that could not be checked (stream trimmed)",
    "clock_measurements": "Round trips used to measure the server clock",
    "losses": "Data losses of the namespace seen (reset or rolled back)",
    "reseed_written": "Entries re-seeded after a loss",
    "reseed_present": "Re-seed candidates found present",
    "reseed_lifted": "Re-seed candidates removed since the loss (not restored)",
    "forged_entries": "Stream entries found not written by the library",
    "digest_checks": "Digest comparisons of the view with the record",
    "digest_mismatches": "Digest comparisons that found the view drifted",
}
_GAUGES = {
    "lag_ms": "Milliseconds from the last event's creation to its application",
    "max_lag_ms": "Highest lag seen",
    "bans_active": "Bans held locally",
    "networks_active": "CIDR networks among the bans held",
    "allows_active": "Allowlist entries held",
    "outbox_pending": "Local writes waiting for Redis",
    "writes_pending": "Own writes whose fate is not known yet",
    "reseed_pending": "Entries held here that are being restored after a loss",
    "record_digest_mismatch": "1 when the record differs from its digest (run banbus repair)",
    "expiry_wheel": "Items in the expiry wheel (at most twice the entries held)",
    "last_seq": "Sequence number of the last applied event",
    "clock_offset_ms": "Redis server clock minus this host's clock",
}
_SUPERVISOR_COUNTERS = {
    "accepted": "Connections accepted by the supervisor",
    "refused": "Connections refused at accept (peer banned)",
    "cut": "Live connections cut because a ban landed",
}


class BanbusCollector(Collector):
    """Exposes the statistics of one or more nodes, labelled by node and namespace."""

    def __init__(self, *nodes: Node) -> None:
        self._nodes = list(nodes)

    def add(self, node: Node) -> None:
        self._nodes.append(node)

    def collect(self) -> Iterator[Metric]:
        labels = ["node", "namespace"]
        families: dict[str, Any] = {}
        for name, doc in _COUNTERS.items():
            families[name] = CounterMetricFamily(f"banbus_{name}", doc, labels=labels)
        for name, doc in _GAUGES.items():
            families[name] = GaugeMetricFamily(f"banbus_{name}", doc, labels=labels)
        families["connected"] = GaugeMetricFamily(
            "banbus_connected", "1 if the stream reader is connected", labels=labels
        )
        families["tracked"] = GaugeMetricFamily(
            "banbus_connections_tracked", "Live connections tracked", labels=labels
        )
        for name, doc in _SUPERVISOR_COUNTERS.items():
            families[f"sup_{name}"] = CounterMetricFamily(
                f"banbus_connections_{name}", doc, labels=labels
            )
        extras: dict[str, Any] = {}
        for node in self._nodes:
            # A process embedding the node (``banbus agent``) adds its counters.
            if node.heartbeat_extra is not None:
                for name, value in node.heartbeat_extra().items():
                    family = extras.get(name)
                    if family is None:
                        family = extras[name] = GaugeMetricFamily(
                            f"banbus_agent_{name}", f"banbus agent: {name.replace('_', ' ')}",
                            labels=labels,
                        )  # fmt: skip
                    family.add_metric([node.node_id, node.namespace], float(value))
        yield from extras.values()
        for node in self._nodes:
            stats = node.statistics()
            values = [stats.node_id, stats.namespace]
            for name in (*_COUNTERS, *_GAUGES):
                families[name].add_metric(values, float(getattr(stats, name)))
            families["connected"].add_metric(values, 1.0 if stats.connected else 0.0)
            supervisor = node.supervisor.statistics()
            families["tracked"].add_metric(values, float(supervisor.tracked))
            for name in _SUPERVISOR_COUNTERS:
                families[f"sup_{name}"].add_metric(values, float(getattr(supervisor, name)))
        yield from families.values()


def register(node: Node, registry: CollectorRegistry = REGISTRY) -> BanbusCollector:
    """Register a collector for *node* with *registry* (default: the global one)."""
    collector = BanbusCollector(node)
    registry.register(collector)
    return collector
