"""Both daemons say what they run: dermafed_build_info with the versions as labels."""

from __future__ import annotations

from importlib import metadata

from prometheus_client import CollectorRegistry

from aggregator.metrics import AggregatorMetrics
from clinic_agent.metrics import AgentMetrics


def test_both_daemons_export_their_build():
    expected = {
        "version": metadata.version("dermafed"),
        "torch": metadata.version("torch"),
        "grpcio": metadata.version("grpcio"),
    }
    for make in (AggregatorMetrics, AgentMetrics):
        registry = CollectorRegistry()
        make(registry)
        samples = [
            s
            for family in registry.collect()
            if family.name == "dermafed_build"
            for s in family.samples
        ]
        assert len(samples) == 1 and samples[0].name == "dermafed_build_info"
        assert samples[0].value == 1
        assert {k: samples[0].labels[k] for k in expected} == expected
        assert samples[0].labels["python"].count(".") == 2
