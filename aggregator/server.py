"""Assemble and run the aggregator service from its configuration.

Start-up is split into small steps (storage, coordinator, gRPC server, metrics) so tests
can build a real service on port 0 in-process and the CLI can run it as a daemon.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from aggregator.checkpoints import CheckpointStore
from aggregator.config import AggregatorConfig
from aggregator.coordinator import Coordinator
from aggregator.ledger import Ledger
from aggregator.metrics import AggregatorMetrics
from aggregator.servicers import AdminServicer, FederationServicer
from aggregator.validation import HoldoutEvaluator
from common import systemd
from common.config import parse_hostport
from common.fsutil import StateDirLock
from common.identity import PeerAuthenticator, RevocationList, own_identity
from common.listen import EXCLUSIVE_PORT, bind_grpc, start_metrics_server
from common.pki import certificate_expiry_reader, load_certificate
from common.tls import SERVER_GRPC_OPTIONS, merge_options, server_credentials
from dermafed.v1 import admin_pb2_grpc, federation_pb2_grpc

log = logging.getLogger("dermafed.aggregator")

FEDERATION_SERVICE = "dermafed.v1.Federation"
ADMIN_SERVICE = "dermafed.v1.Admin"


@dataclass
class AggregatorService:
    config: AggregatorConfig
    coordinator: Coordinator
    server: grpc.Server
    port: int
    health: health.HealthServicer
    registry: CollectorRegistry
    ledger: Ledger
    metrics_port: int | None = None
    # Plaintext grpc.health.v1 only, for kubelet probes (server.health_listen).
    health_server: grpc.Server | None = None
    health_port: int | None = None
    metrics_server: WSGIServer | None = None
    # The Admin API's own mTLS server (server.admin_listen), when it has one.
    admin_server: grpc.Server | None = None
    admin_port: int | None = None
    # Held from before the ledger opens until after it closes (see StateDirLock).
    state_lock: StateDirLock | None = None

    @property
    def address(self) -> str:
        host, _ = parse_hostport(self.config.server.listen, "server.listen")
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    def stop(self, grace: float = 5.0) -> None:
        """Stop serving, abort a running round, and close the ledger cleanly."""
        for service in ("", FEDERATION_SERVICE, ADMIN_SERVICE):
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.coordinator.stop()
        self.server.stop(grace).wait()
        if self.admin_server is not None:
            self.admin_server.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        self.ledger.close()
        if self.state_lock is not None:
            self.state_lock.release()


def build_service(
    config: AggregatorConfig,
    *,
    registry: CollectorRegistry | None = None,
    start_rounds: bool = True,
) -> AggregatorService:
    registry = registry or CollectorRegistry()
    # First of all: a second aggregator on this state_dir stops here, before it can touch
    # the ledger, the checkpoints or a port.
    state_lock = StateDirLock(config.storage.state_dir, "aggregator").acquire()
    try:
        return _build_service(config, registry, start_rounds, state_lock)
    except BaseException:
        state_lock.release()
        raise


def _build_service(
    config: AggregatorConfig,
    registry: CollectorRegistry,
    start_rounds: bool,
    state_lock: StateDirLock,
) -> AggregatorService:
    # Before the ledger: a misconfigured aggregator changes nothing on disk.
    own_identity(
        load_certificate(config.tls.cert),
        config.federation,
        "aggregator",
        f"tls.cert {config.tls.cert}",
    )
    metrics = AggregatorMetrics(registry)
    ledger = Ledger(config.storage.ledger_path)
    ledger.integrity_check()
    store = CheckpointStore(config.storage.checkpoint_dir)
    evaluator = None
    if config.validation.holdout is not None and str(config.validation.holdout):
        evaluator = HoldoutEvaluator(
            config.validation.holdout,
            config.model.to_model_config(),
            max_examples=config.validation.max_examples,
        )
    ca_cert = load_certificate(config.tls.ca_cert)
    coordinator = Coordinator(
        config,
        ledger=ledger,
        store=store,
        metrics=metrics,
        evaluator=evaluator,
        ca_cert=ca_cert,
    )
    coordinator.open()
    # Read at scrape time: the certificate can be rotated without a restart.
    metrics.certificate_expiry.set_function(certificate_expiry_reader(config.tls.cert))

    revocations = RevocationList(config.tls.crl, ca_cert)
    auth = PeerAuthenticator(config.federation, revocations)
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=config.server.max_workers, thread_name_prefix="grpc"
        ),
        options=merge_options(
            SERVER_GRPC_OPTIONS,
            [
                EXCLUSIVE_PORT,
                ("grpc.max_receive_message_length", config.server.max_message_bytes),
                ("grpc.max_send_message_length", config.server.max_message_bytes),
            ],
        ),
        maximum_concurrent_rpcs=config.server.max_workers * 4,
    )
    federation_pb2_grpc.add_FederationServicer_to_server(
        FederationServicer(
            coordinator,
            auth,
            metrics,
            max_poll_wait_s=config.server.max_poll_wait_s,
            max_update_bytes=config.server.max_update_bytes,
            upload_stall_s=config.server.upload_stall_s,
            min_chunk_bytes=config.server.min_chunk_bytes,
        ),
        server,
    )
    admin_servicer = AdminServicer(coordinator, auth, metrics, revocations)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    admin_server: grpc.Server | None = None
    if config.server.admin_listen:
        # Its own workers and concurrency budget: clinics holding every slot of the
        # federation port cannot delay or refuse an operator.
        admin_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="admin"),
            options=merge_options(SERVER_GRPC_OPTIONS, [EXCLUSIVE_PORT]),
            maximum_concurrent_rpcs=16,
        )
        admin_pb2_grpc.add_AdminServicer_to_server(admin_servicer, admin_server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, admin_server)
    else:
        admin_pb2_grpc.add_AdminServicer_to_server(admin_servicer, server)
    if config.server.reflection:
        served = (
            (FEDERATION_SERVICE,)
            if admin_server is not None
            else (
                FEDERATION_SERVICE,
                ADMIN_SERVICE,
            )
        )
        reflection.enable_server_reflection(
            (*served, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
    host, port = parse_hostport(config.server.listen, "server.listen")
    credentials = server_credentials(config.tls.ca_cert, config.tls.cert, config.tls.key)
    # Every port is bound before anything starts: a port in use stops the start-up with
    # nothing running and the ledger closed.
    health_server: grpc.Server | None = None
    http_server: WSGIServer | None = None
    admin_port: int | None = None
    try:
        bound = bind_grpc(
            lambda address: server.add_secure_port(address, credentials),
            f"{host}:{port}",
            "server.listen",
        )
        if admin_server is not None:
            admin_host, admin_port_wanted = parse_hostport(
                config.server.admin_listen, "server.admin_listen"
            )
            target = admin_server
            # Its own credentials object: a reloading one serves a single server.
            admin_credentials = server_credentials(
                config.tls.ca_cert, config.tls.cert, config.tls.key
            )
            admin_port = bind_grpc(
                lambda address: target.add_secure_port(address, admin_credentials),
                f"{admin_host}:{admin_port_wanted}",
                "server.admin_listen",
            )
        health_server, health_port = _start_health_server(config, health_servicer)
        if config.metrics.listen:
            http_server = start_metrics_server(config.metrics.listen, registry)
    except BaseException:
        server.stop(0)
        if admin_server is not None:
            admin_server.stop(0)
        if health_server is not None:
            health_server.stop(0)
        ledger.close()
        raise
    metrics_port = int(http_server.server_port) if http_server is not None else None
    server.start()
    if admin_server is not None:
        admin_server.start()
        log.info("admin API listening on %s (its own workers)", config.server.admin_listen)
    if start_rounds:
        coordinator.start()
    # Only now is the ledger open and the port bound: report SERVING to probes.
    for service in ("", FEDERATION_SERVICE, ADMIN_SERVICE):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    if config.server.port_file:
        Path(config.server.port_file).write_text(f"{bound}\n")
    log.info("aggregator for federation %r listening on %s:%d", config.federation, host, bound)
    return AggregatorService(
        config,
        coordinator,
        server,
        bound,
        health_servicer,
        registry,
        ledger,
        metrics_port,
        health_server,
        health_port,
        http_server,
        admin_server,
        admin_port,
        state_lock,
    )


def _start_health_server(
    config: AggregatorConfig, servicer: health.HealthServicer
) -> tuple[grpc.Server | None, int | None]:
    """Serve only grpc.health.v1, without TLS, where the kubelet's gRPC probe can reach it.

    The federation port demands a client certificate, which the kubelet cannot present.
    This port exposes nothing but the SERVING/NOT_SERVING status the main server reports.
    """
    if not config.server.health_listen:
        return None, None
    host, port = parse_hostport(config.server.health_listen, "server.health_listen")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
        options=[EXCLUSIVE_PORT],
    )
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    bound = bind_grpc(server.add_insecure_port, f"{host}:{port}", "server.health_listen")
    server.start()
    return server, bound


def serve_forever(config: AggregatorConfig) -> int:
    """Run until SIGTERM/SIGINT, then stop gracefully (the running round is aborted)."""
    service = build_service(config)
    done = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received signal %d, shutting down", signum)
        done.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    systemd.ready(f"federation {config.federation}: serving on port {service.port}")
    watchdog = systemd.Watchdog.from_environment(service.coordinator.is_alive)
    done.wait()
    systemd.stopping("aborting the running round and draining connections")
    if watchdog is not None:
        watchdog.stop()
    service.stop()
    log.info("aggregator stopped")
    return 0
