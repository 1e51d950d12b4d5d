"""Binding the services' listening sockets, each to itself, with one clear error.

gRPC servers set SO_REUSEPORT by default, which lets a second aggregator bind the port of a
running one and have clients balanced between the two at random; every server here turns
it off (``EXCLUSIVE_PORT``), so the second bind fails. A failed bind, gRPC's or the
Prometheus endpoint's, becomes an :class:`InUseError` naming the address and the config
key rather than a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from common.config import parse_hostport
from common.errors import InUseError

EXCLUSIVE_PORT = ("grpc.so_reuseport", 0)


def _refused(address: str, key: str, why: str) -> InUseError:
    return InUseError(f"cannot listen on {address} ({key}): {why}")


def bind_grpc(add_port: Callable[[str], int], address: str, key: str) -> int:
    """Call a server's ``add_*_port`` with ``address``; the bound port, or InUseError."""
    try:
        bound = add_port(address)
    except RuntimeError:  # grpcio raises on a failed bind; older releases returned 0
        bound = 0
    if bound == 0:
        raise _refused(address, key, "the port is in use or the address is not on this host")
    return bound


def start_metrics_server(
    listen: str, registry: CollectorRegistry, key: str = "metrics.listen"
) -> WSGIServer:
    """Serve ``registry`` over HTTP for Prometheus on ``listen`` (host:port)."""
    host, port = parse_hostport(listen, key)
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise _refused(listen, key, exc.strerror or str(exc)) from None
    return server
