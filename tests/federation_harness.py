"""A real federation in one test: aggregator service on port 0, agents as threads.

Everything is the production code path — the gRPC server with mutual TLS, the SQLite
ledger, the checkpoint store, the agent's client loop and local training — only started
in-process so a test can look inside. Images come from a small lesion-grouped subset of
../shared/data/ham10000_200x150.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from pki_fixtures import CertPair, FederationPKI, make_federation
from prometheus_client import CollectorRegistry

from aggregator.config import (
    AggregatorConfig,
    ModelSection,
    PlanSection,
    RoundsSection,
    ServerSection,
    StorageSection,
    TlsSection,
    ValidationSection,
)
from aggregator.server import AggregatorService, build_service
from clinic_agent.config import (
    AggregatorSection,
    ClinicConfig,
    DataSection,
    EvaluationSection,
    NetworkSection,
    TrainingSection,
)
from clinic_agent.config import (
    StorageSection as AgentStorage,
)
from clinic_agent.config import (
    TlsSection as AgentTls,
)
from clinic_agent.daemon import ClinicAgent
from clinic_agent.metrics import AgentMetrics
from common.datasets import group_split, load_records
from common.partition import dirichlet_partition, write_index
from common.tls import channel_credentials, secure_channel
from dermafed.demo import write_toml
from dermafed.v1 import federation_pb2, federation_pb2_grpc

HAM = Path(
    os.environ.get(
        "DERMAFED_HAM10000",
        Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000_200x150",
    )
)

CLINICS = ("clinic-a", "clinic-b", "clinic-c")
# Small and fast: the tests check the machinery, the benchmarks check model quality.
TEST_MODEL = ModelSection(arch="lesionres", input_size=32, width=8, dropout=0.0, seed=0)


def require_ham() -> Path:
    if not (HAM / "HAM10000_metadata.csv").exists():
        pytest.skip(f"HAM10000 images not found at {HAM} (set DERMAFED_HAM10000 to run this test)")
    return HAM


def make_shards(
    tmp: Path, *, per_clinic: int = 30, holdout: int = 40, clinics: tuple[str, ...] = CLINICS
) -> tuple[dict[str, Path], Path]:
    """Index files for each clinic and a held-out set, lesion-grouped, from real images."""
    records = load_records(require_ham())
    total = per_clinic * len(clinics) + holdout
    _, subset = group_split(records, total / len(records), seed=7)
    train, held = group_split(subset, holdout / len(subset), seed=8)
    shards = dirichlet_partition(train, len(clinics), alpha=100.0, seed=9)
    out = tmp / "shards"
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, shard in zip(clinics, shards, strict=True):
        paths[name] = out / f"{name}.csv"
        write_index(shard, paths[name])
    write_index(held, out / "holdout.csv")
    return paths, out / "holdout.csv"


@dataclass
class RunningAgent:
    agent: ClinicAgent
    thread: threading.Thread
    registry: CollectorRegistry

    def stop(self) -> None:
        self.agent.stop_event.set()
        self.thread.join(timeout=60)
        self.agent.close()


@dataclass
class Federation:
    tmp: Path
    pki: FederationPKI
    shards: dict[str, Path]
    holdout: Path
    service: AggregatorService | None = None
    agents: dict[str, RunningAgent] = field(default_factory=dict)

    def aggregator_config(self, **sections: Any) -> AggregatorConfig:
        cfg = AggregatorConfig(
            federation=self.pki.federation,
            tls=TlsSection(
                self.pki.ca_cert, self.pki.aggregator.cert, self.pki.aggregator.key, self.pki.crl
            ),
            storage=StorageSection(self.tmp / "aggregator-state"),
            server=ServerSection(listen="127.0.0.1:0", max_poll_wait_s=2.0),
            model=TEST_MODEL,
            rounds=RoundsSection(
                min_clinics=2,
                start_when_connected=3,
                max_rounds=0,
                train_deadline_s=60.0,
                secagg_stage_deadline_s=15.0,
                connected_timeout_s=30.0,
            ),
            plan=PlanSection(local_epochs=1, learning_rate=0.05, batch_size=16),
            # Every candidate is evaluated, but the gate never rejects on a sensitivity drop
            # (the tolerance rule with a tolerance of 1): these tests are about other things,
            # and a rejected round would leave a test waiting for a publication its clinics'
            # budgets may no longer pay for. The gate's own tests (test_admin.py) set theirs.
            validation=ValidationSection(holdout=self.holdout, rule="tolerance", tolerance=1.0),
        )
        return replace(cfg, **sections)

    def start_aggregator(
        self, config: AggregatorConfig | None = None, **kw: Any
    ) -> AggregatorService:
        self.service = build_service(config or self.aggregator_config(), **kw)
        return self.service

    def clinic_config(self, name: str, address: str | None = None, **sections: Any) -> ClinicConfig:
        if address is None:
            if self.service is None:
                raise RuntimeError("start the aggregator first or pass an address")
            address = f"localhost:{self.service.port}"
        pair = self.pki.clinics[name]
        cfg = ClinicConfig(
            federation=self.pki.federation,
            aggregator=AggregatorSection(address=address),
            tls=AgentTls(self.pki.ca_cert, pair.cert, pair.key),
            data=DataSection(self.shards[name]),
            storage=AgentStorage(self.tmp / f"{name}-state"),
            training=TrainingSection(threads=1, augment=False),
            # No evaluation slice unless a test asks for one: with 30 images a clinic
            # would give a fifth of its training data (and fall below DP's minimum).
            evaluation=EvaluationSection(max_cases=0),
            network=NetworkSection(
                poll_wait_s=1.0,
                rpc_timeout_s=10.0,
                transfer_timeout_s=60.0,
                backoff_initial_s=0.05,
                backoff_max_s=0.5,
            ),
        )
        return replace(cfg, **sections)

    def write_clinic_toml(
        self,
        path: Path,
        name: str,
        state_dir: Path,
        *,
        address: str = "localhost:1",
        cert: CertPair | None = None,
        **sections: Any,
    ) -> Path:
        """A clinic TOML as an operator writes it, for tests that run the real CLI.

        ``cert`` defaults to the clinic's own pair; ``sections`` add or replace sections.
        """
        pair = cert or self.pki.clinics[name]
        write_toml(
            path,
            {
                "federation": self.pki.federation,
                "aggregator": {"address": address},
                "tls": {"ca_cert": self.pki.ca_cert, "cert": pair.cert, "key": pair.key},
                "data": {"path": self.shards[name]},
                "storage": {"state_dir": state_dir},
                # No evaluation slice, as in clinic_config (30 images are few to train on).
                "evaluation": {"max_cases": 0},
                **sections,
            },
        )
        return path

    def write_admin_toml(self, path: Path, admin: str = "alice") -> Path:
        """An admin.toml for the running aggregator, for tests that run `dermafed admin`."""
        if self.service is None:
            raise RuntimeError("start the aggregator first")
        pair = self.pki.admins[admin]
        write_toml(
            path,
            {
                "federation": self.pki.federation,
                "aggregator": {"address": f"localhost:{self.service.port}"},
                "tls": {"ca_cert": self.pki.ca_cert, "cert": pair.cert, "key": pair.key},
            },
        )
        return path

    def start_agent(self, name: str, config: ClinicConfig | None = None) -> RunningAgent:
        registry = CollectorRegistry()
        agent = ClinicAgent(config or self.clinic_config(name), metrics=AgentMetrics(registry))
        thread = threading.Thread(target=agent.run, name=f"agent-{name}", daemon=True)
        thread.start()
        running = RunningAgent(agent, thread, registry)
        self.agents[name] = running
        return running

    def wait_rounds(self, finished: int, timeout: float = 120.0) -> None:
        assert self.service is not None
        coord = self.service.coordinator
        ok = coord.wait_until(lambda: coord.status().rounds_completed >= finished, timeout)
        assert ok, f"only {coord.status().rounds_completed} of {finished} rounds finished in time"

    def stop(self) -> None:
        for running in self.agents.values():
            running.stop()
        self.agents.clear()
        if self.service is not None:
            self.service.stop(grace=1.0)
            self.service = None


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    shards, holdout = make_shards(tmp_path)
    fed = Federation(tmp_path, make_federation(tmp_path / "pki"), shards, holdout)
    try:
        yield fed
    finally:
        fed.stop()


# -- raw clients that speak the wire protocol directly (for fault tests) -------------


def raw_clinics(fed: Federation, names) -> dict[str, federation_pb2_grpc.FederationStub]:
    assert fed.service is not None
    stubs = {}
    for name in names:
        pair = fed.pki.clinics[name]
        creds = channel_credentials(fed.pki.ca_cert, pair.cert, pair.key)
        channel = secure_channel(f"localhost:{fed.service.port}", creds)
        stubs[name] = federation_pb2_grpc.FederationStub(channel)
    return stubs


def header_for(coord, round_number, **changes):
    specs = list(coord.specs)
    total = sum(s.numel for s in specs) * 4
    header = federation_pb2.UpdateHeader(
        round=round_number,
        encoding="f32le",
        total_bytes=total,
        weight=10.0,
        train_loss=1.0,
        tensors=[
            federation_pb2.TensorSpec(name=s.name, shape=list(s.shape), dtype=s.dtype)
            for s in specs
        ],
    )
    for key, value in changes.items():
        setattr(header, key, value)
    return header


def upload(stub, header, payload: bytes, chunk: int = 1 << 20):
    def gen():
        yield federation_pb2.UpdateChunk(header=header)
        for i in range(0, len(payload), chunk):
            yield federation_pb2.UpdateChunk(data=payload[i : i + chunk])

    return stub.UploadUpdate(gen(), timeout=10)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()
