"""Mutual-TLS credentials and channel options for dermafed's gRPC connections.

The server side reloads its certificate, key and trusted CA bundle from disk whenever
those files change (checked at every new handshake), so certificates - and, by listing
old and new CA in one bundle, the CA itself - can be rotated without restarting the
aggregator or dropping connections already open. The client side reads its files when
the credentials are built; an agent that sees :func:`file_stamp` change builds a new
channel.

What the handshake verifies (BoringSSL inside gRPC): the peer presents a certificate,
it chains to a trusted CA, it is within its validity period, and - on the client side -
the server certificate names the target host (DNS/IP SAN). Revocation and the peer's
role are checked per call by :class:`common.identity.PeerAuthenticator`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from common.pki import PkiError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# Uploads stream in ~1 MiB chunks, so no legitimate message comes near this; the limit
# bounds what a misbehaving peer can make us buffer.
MAX_MESSAGE_BYTES = 4 * MiB

GrpcOption = tuple[str, Any]

# Client (clinic agent / admin CLI) side. Clinics sit behind NAT and long-poll: a ping
# every 30 s keeps NAT mappings alive (typical UDP/TCP idle timeouts are 60 s or more)
# and detects a dead path within ~40 s even while no call is in flight.
GRPC_OPTIONS: tuple[GrpcOption, ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)

# Aggregator side: accept the clients' 30 s pings (the default minimum is 5 minutes,
# which would make the server answer them with GOAWAY "too_many_pings"), and ping idle
# clients itself so half-open connections are reaped.
SERVER_GRPC_OPTIONS: tuple[GrpcOption, ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
    ("grpc.http2.max_pings_without_data", 0),
)


def merge_options(
    defaults: Sequence[GrpcOption], overrides: Sequence[GrpcOption] = ()
) -> list[GrpcOption]:
    """``defaults`` with any key also present in ``overrides`` replaced by the override."""
    merged = dict(defaults)
    merged.update(dict(overrides))
    return list(merged.items())


def file_stamp(*paths: Path) -> tuple[tuple[int, int, int, int] | None, ...]:
    """A cheap fingerprint of files' identity and content state (None for a missing file)."""
    stamps: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            stamps.append(None)
            continue
        stamps.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(stamps)


def _load_material(ca_cert: Path, cert: Path, key: Path) -> tuple[bytes, bytes, bytes]:
    """Read and cross-check (CA bundle, certificate chain, key) PEM bytes."""
    try:
        ca_pem = Path(ca_cert).read_bytes()
        cert_pem = Path(cert).read_bytes()
        key_pem = Path(key).read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read TLS material {exc.filename}: {exc.strerror}") from None
    try:
        if not x509.load_pem_x509_certificates(ca_pem):
            raise ValueError("no certificate")
    except ValueError:
        raise PkiError(f"{ca_cert} does not hold a PEM CA certificate") from None
    try:
        leaf = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise PkiError(f"{cert} is not a PEM certificate") from None
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise PkiError(f"{key} is not an unencrypted PEM private key") from None
    public_der = serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(
        serialization.Encoding.DER, public_der
    ) != private_key.public_key().public_bytes(serialization.Encoding.DER, public_der):
        raise PkiError(f"{key} is not the private key of {cert}")
    return ca_pem, cert_pem, key_pem


class _ReloadingServerCertificates:
    """Certificate-configuration fetcher for :func:`grpc.dynamic_ssl_server_credentials`.

    gRPC calls it at the start of every handshake; returning None keeps the current
    configuration. A half-rotated pair (new certificate, old key) or an unreadable file is
    logged and ignored, and retried once the files change again.
    """

    def __init__(self, ca_cert: Path, cert: Path, key: Path) -> None:
        self._paths = (Path(ca_cert), Path(cert), Path(key))
        self._lock = threading.Lock()
        self._stamp = file_stamp(*self._paths)
        self.initial = self._configuration(*_load_material(*self._paths))

    @staticmethod
    def _configuration(ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(key_pem, cert_pem)], root_certificates=ca_pem
        )

    def __call__(self) -> Any:
        try:
            with self._lock:
                stamp = file_stamp(*self._paths)
                if stamp == self._stamp:
                    return None
                self._stamp = stamp
                material = _load_material(*self._paths)
        except PkiError as exc:
            log.error("TLS files changed but cannot be used, keeping the previous ones: %s", exc)
            return None
        except Exception:  # never let an exception escape into gRPC's handshake path
            log.exception("unexpected error reloading TLS files; keeping the previous ones")
            return None
        log.info("reloaded TLS certificate %s (CA bundle %s)", self._paths[1], self._paths[0])
        return self._configuration(*material)


def server_credentials(ca_cert: Path, cert: Path, key: Path) -> grpc.ServerCredentials:
    """Server credentials that require a client certificate chaining to ``ca_cert``.

    Certificate, key and CA bundle are re-read at the next handshake after any of the
    files changes; connections already open are unaffected.
    """
    fetcher = _ReloadingServerCertificates(ca_cert, cert, key)
    return grpc.dynamic_ssl_server_credentials(
        fetcher.initial,
        cast(Any, fetcher),
        require_client_authentication=True,
    )


def channel_credentials(ca_cert: Path, cert: Path, key: Path) -> grpc.ChannelCredentials:
    """Client credentials presenting ``cert``/``key`` and trusting only ``ca_cert``."""
    ca_pem, cert_pem, key_pem = _load_material(ca_cert, cert, key)
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )


def secure_channel(
    target: str,
    creds: grpc.ChannelCredentials,
    *,
    options: Sequence[GrpcOption] = (),
) -> grpc.Channel:
    """A TLS channel to ``target`` with :data:`GRPC_OPTIONS`, overridden by ``options``."""
    return grpc.secure_channel(target, creds, options=merge_options(GRPC_OPTIONS, options))
