"""Peer identity, live revocation and mTLS, against real gRPC servers on port 0."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Collection, Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pki_fixtures import CertPair, FederationPKI, make_federation

from clinic_agent.client import connection_hint
from common import pki
from common.identity import (
    Identity,
    IdentityError,
    PeerAuthenticator,
    RevocationList,
    identity_from_certificate,
)
from common.tls import (
    GRPC_OPTIONS,
    SERVER_GRPC_OPTIONS,
    channel_credentials,
    merge_options,
    secure_channel,
    server_credentials,
)

SERVICE = "dermafed.test.Probe"
CALL_TIMEOUT_S = 5.0
# A fresh subchannel per test channel: gRPC otherwise shares connections between
# channels with equal arguments, which would hide handshake behaviour.
TEST_CHANNEL_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> FederationPKI:
    """Shared by the tests that only read the PKI (building one costs a few fsyncs)."""
    return make_federation(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def own_fed(tmp_path: Path) -> FederationPKI:
    """A private PKI for tests that revoke, corrupt or rotate."""
    return make_federation(tmp_path)


# --------------------------------------------------------------------------- identity


def _cert_with_uris(uris: list[str]) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "probe")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(4242)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    return builder.sign(key, hashes.SHA256())


def test_identity_from_issued_certificates(fed: FederationPKI) -> None:
    for pair, role, name in [
        (fed.clinics["clinic-a"], "clinic", "clinic-a"),
        (fed.admins["alice"], "admin", "alice"),
        (fed.aggregator, "aggregator", "aggregator"),
    ]:
        ident = identity_from_certificate(pki.load_certificate(pair.cert), "testfed")
        assert ident == Identity("testfed", role, name, pair.serial)
        assert ident.uri == pair.uri == f"spiffe://testfed/{role}/{name}"


@pytest.mark.parametrize(
    ("uris", "message"),
    [
        ([], "no URI SAN"),
        (["spiffe://testfed/clinic/a", "spiffe://testfed/clinic/b"], "2 URI SANs"),
        (["spiffe://otherfed/clinic/a"], "federation 'otherfed', not 'testfed'"),
        (["spiffe://testfed/nurse/a"], "unknown role 'nurse'"),
        (["spiffe://testfed/clinic/a/extra"], "not of the form"),
        (["spiffe://testfed/clinic"], "not of the form"),
        (["spiffe://testfed"], "not of the form"),
        (["https://testfed/clinic/a"], "not a spiffe://"),
        (["spiffe://testfed/clinic/Bad Name"], "invalid name"),
    ],
)
def test_identity_rejects_bad_sans(uris: list[str], message: str) -> None:
    with pytest.raises(IdentityError, match=message):
        identity_from_certificate(_cert_with_uris(uris), "testfed")


# --------------------------------------------------------------------------- revocation


def _ca(fed: FederationPKI) -> x509.Certificate:
    return pki.load_certificate(fed.ca_cert)


def test_missing_crl_means_no_revocations(fed: FederationPKI, tmp_path: Path) -> None:
    assert not RevocationList(tmp_path / "absent.pem", _ca(fed)).is_revoked(1)
    assert RevocationList(None, _ca(fed)).revoked == frozenset()


def test_revocation_list_follows_the_crl_file(own_fed: FederationPKI) -> None:
    revocations = RevocationList(own_fed.crl, _ca(own_fed), check_interval=0.0)
    serial = own_fed.clinics["clinic-a"].serial
    assert not revocations.is_revoked(serial)
    pki.revoke(own_fed.ca_dir, serial=serial)
    assert revocations.is_revoked(serial)
    assert not revocations.is_revoked(own_fed.clinics["clinic-b"].serial)


def test_revocation_list_stats_at_most_once_per_interval(own_fed: FederationPKI) -> None:
    clock = [100.0]
    revocations = RevocationList(
        own_fed.crl, _ca(own_fed), check_interval=0.5, monotonic=lambda: clock[0]
    )
    serial = own_fed.clinics["clinic-a"].serial
    pki.revoke(own_fed.ca_dir, serial=serial)
    assert not revocations.is_revoked(serial)  # within the interval: not looked at yet
    clock[0] += 0.6
    assert revocations.is_revoked(serial)

    serial_b = own_fed.clinics["clinic-b"].serial
    pki.revoke(own_fed.ca_dir, serial=serial_b)
    revocations.reload()  # forced, whatever the clock says
    assert revocations.is_revoked(serial_b)


def test_corrupt_or_forged_crl_keeps_previous_revocations(
    own_fed: FederationPKI, caplog: pytest.LogCaptureFixture
) -> None:
    serial = own_fed.clinics["clinic-a"].serial
    pki.revoke(own_fed.ca_dir, serial=serial)
    good_crl = own_fed.crl.read_bytes()
    revocations = RevocationList(own_fed.crl, _ca(own_fed), check_interval=0.0)
    assert revocations.is_revoked(serial)

    caplog.set_level(logging.ERROR, logger="common.identity")
    own_fed.crl.write_bytes(b"-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n")
    revocations.reload()
    assert revocations.is_revoked(serial)
    assert "not a valid X.509 CRL" in caplog.text

    # A well-formed but empty CRL from the foreign CA (same subject name!) is refused too.
    caplog.clear()
    own_fed.crl.write_bytes((own_fed.foreign_ca_dir / "crl.pem").read_bytes())
    revocations.reload()
    assert revocations.is_revoked(serial)
    assert "signature does not verify" in caplog.text

    # A file that disappears does not un-revoke either.
    caplog.clear()
    own_fed.crl.unlink()
    revocations.reload()
    assert revocations.is_revoked(serial)
    assert "disappeared" in caplog.text

    own_fed.crl.write_bytes(good_crl)
    revocations.reload()
    assert revocations.revoked == frozenset({serial})


def test_replayed_older_crl_is_refused(
    own_fed: FederationPKI, caplog: pytest.LogCaptureFixture
) -> None:
    older = own_fed.crl.read_bytes()  # genuine, CA-signed, lists nothing
    serial = own_fed.clinics["clinic-c"].serial
    pki.revoke(own_fed.ca_dir, serial=serial)
    revocations = RevocationList(own_fed.crl, _ca(own_fed))
    caplog.set_level(logging.ERROR, logger="common.identity")
    own_fed.crl.write_bytes(older)
    revocations.reload()
    assert revocations.is_revoked(serial)
    assert "older than the loaded" in caplog.text


def test_invalid_crl_at_start_refuses_to_build(own_fed: FederationPKI) -> None:
    own_fed.crl.write_bytes(b"corrupt")
    with pytest.raises(IdentityError, match=r"not a valid X\.509 CRL"):
        RevocationList(own_fed.crl, _ca(own_fed))


# --------------------------------------------------------------------------- gRPC server


class ProbeServer:
    """A real mTLS gRPC server whose methods answer with the caller's identity URI."""

    def __init__(
        self,
        fed: FederationPKI,
        *,
        server_files: tuple[Path, Path, Path] | None = None,
        clock: Callable[[], datetime] | None = None,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        ca_cert = pki.load_certificate(fed.ca_cert)
        self.revocations = RevocationList(fed.crl, ca_cert, check_interval=0.0)
        kwargs = {"clock": clock} if clock else {}
        self.authenticator = PeerAuthenticator(fed.federation, self.revocations, **kwargs)
        self.handled = 0
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4), options=SERVER_GRPC_OPTIONS
        )
        handlers = {
            "WhoAmI": self._handler({"clinic", "admin", "aggregator"}),
            "AdminOnly": self._handler({"admin"}),
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )
        files = server_files or (fed.ca_cert, fed.aggregator.cert, fed.aggregator.key)
        creds = credentials if credentials is not None else server_credentials(*files)
        self.port = self._server.add_secure_port("127.0.0.1:0", creds)
        self._server.start()

    def _handler(self, roles: Collection[str]) -> grpc.RpcMethodHandler:
        def behaviour(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.handled += 1
            return self.authenticator.authenticate(context, roles).uri.encode()

        return grpc.unary_unary_rpc_method_handler(behaviour)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.stop(grace=None)


@pytest.fixture
def server(fed: FederationPKI) -> Iterator[ProbeServer]:
    srv = ProbeServer(fed)
    yield srv
    srv.stop()


@pytest.fixture
def own_server(own_fed: FederationPKI) -> Iterator[ProbeServer]:
    srv = ProbeServer(own_fed)
    yield srv
    srv.stop()


def _channel(target: str, creds: grpc.ChannelCredentials) -> grpc.Channel:
    return secure_channel(target, creds, options=TEST_CHANNEL_OPTIONS)


def _invoke(channel: grpc.Channel, method: str = "WhoAmI") -> str:
    # No serializers: requests and responses are raw bytes.
    stub = channel.unary_unary(f"/{SERVICE}/{method}", None, None)
    return bytes(stub(b"", timeout=CALL_TIMEOUT_S)).decode()


def _call(target: str, pair: CertPair, ca_cert: Path, method: str = "WhoAmI") -> str:
    with _channel(target, channel_credentials(ca_cert, pair.cert, pair.key)) as channel:
        return _invoke(channel, method)


def _rpc_error(fn: Callable[[], object]) -> grpc.Call:
    """The error a failing call raised; gRPC's RpcError is also the grpc.Call with its status."""
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return cast(grpc.Call, info.value)


def test_clinic_identity_comes_from_its_certificate(
    fed: FederationPKI, server: ProbeServer
) -> None:
    assert _call(server.target, fed.clinics["clinic-a"], fed.ca_cert) == (
        "spiffe://testfed/clinic/clinic-a"
    )
    assert _call(server.target, fed.admins["alice"], fed.ca_cert) == "spiffe://testfed/admin/alice"


def test_plaintext_channel_is_refused(server: ProbeServer) -> None:
    with grpc.insecure_channel(server.target, options=TEST_CHANNEL_OPTIONS) as channel:
        err = _rpc_error(lambda: _invoke(channel))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert server.handled == 0


def test_client_without_certificate_fails_the_handshake(
    fed: FederationPKI, server: ProbeServer
) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=fed.ca_cert.read_bytes())
    with _channel(server.target, creds) as channel:
        err = _rpc_error(lambda: _invoke(channel))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert server.handled == 0


def test_authenticator_refuses_a_caller_without_certificate(fed: FederationPKI) -> None:
    # Defence in depth: even behind TLS that does not demand a client certificate, the
    # per-call check refuses an anonymous caller.
    lax = grpc.ssl_server_credentials(
        [(fed.aggregator.key.read_bytes(), fed.aggregator.cert.read_bytes())],
        root_certificates=fed.ca_cert.read_bytes(),
        require_client_auth=False,
    )
    srv = ProbeServer(fed, credentials=lax)
    creds = grpc.ssl_channel_credentials(root_certificates=fed.ca_cert.read_bytes())
    try:
        with _channel(srv.target, creds) as channel:
            err = _rpc_error(lambda: _invoke(channel))
    finally:
        srv.stop()
    assert srv.handled == 1
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no client certificate" in err.details()


def test_certificate_from_a_foreign_ca_fails_the_handshake(
    fed: FederationPKI, server: ProbeServer
) -> None:
    # Same federation name, same clinic name, trusted server: only the issuing CA differs.
    foreign = fed.foreign_clinic
    err = _rpc_error(lambda: _call(server.target, foreign, fed.ca_cert))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert server.handled == 0
    # The agent can only see the socket close; it says what that most likely means.
    assert "does not accept this clinic's certificate" in connection_hint(err.details())


def test_client_refuses_a_server_from_a_foreign_ca(fed: FederationPKI, server: ProbeServer) -> None:
    pair = fed.clinics["clinic-a"]
    err = _rpc_error(lambda: _call(server.target, pair, fed.foreign_ca_cert))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert server.handled == 0
    assert "not signed by this clinic's tls.ca_cert" in connection_hint(err.details())


def test_a_port_nobody_listens_on_gets_its_own_hint(fed: FederationPKI) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = _rpc_error(lambda: _call(f"localhost:{port}", fed.clinics["clinic-a"], fed.ca_cert))
    assert "nothing listens at aggregator.address" in connection_hint(err.details())
    assert connection_hint("some other failure") == ""


def test_expired_certificate_fails_the_handshake(fed: FederationPKI, server: ProbeServer) -> None:
    err = _rpc_error(lambda: _call(server.target, fed.expired_clinic, fed.ca_cert))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert server.handled == 0


def test_connection_that_outlives_its_certificate_is_refused(fed: FederationPKI) -> None:
    # The handshake accepted the certificate; the per-call check sees it has expired since.
    later = datetime.now(UTC) + timedelta(days=398)
    srv = ProbeServer(fed, clock=lambda: later)
    try:
        err = _rpc_error(lambda: _call(srv.target, fed.clinics["clinic-a"], fed.ca_cert))
    finally:
        srv.stop()
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired at" in err.details()


def test_revocation_applies_to_the_next_call_without_restart(
    own_fed: FederationPKI, own_server: ProbeServer
) -> None:
    a, b = own_fed.clinics["clinic-a"], own_fed.clinics["clinic-b"]
    with _channel(
        own_server.target, channel_credentials(own_fed.ca_cert, a.cert, a.key)
    ) as channel_a:
        assert _invoke(channel_a) == a.uri  # connection established and authenticated

        pki.revoke(own_fed.ca_dir, name="clinic-a")

        # Same, already-open connection: the very next call is refused.
        err = _rpc_error(lambda: _invoke(channel_a))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert err.details() == (
            f"certificate serial 0x{a.serial:x} (spiffe://testfed/clinic/clinic-a) is revoked"
        )
    # A new connection is refused too; other clinics are unaffected.
    err = _rpc_error(lambda: _call(own_server.target, a, own_fed.ca_cert))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _call(own_server.target, b, own_fed.ca_cert) == b.uri
    assert (
        _call(own_server.target, own_fed.clinics["clinic-c"], own_fed.ca_cert)
        == own_fed.clinics["clinic-c"].uri
    )


def test_role_not_allowed_gets_permission_denied(fed: FederationPKI, server: ProbeServer) -> None:
    err = _rpc_error(
        lambda: _call(server.target, fed.clinics["clinic-a"], fed.ca_cert, method="AdminOnly")
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "role 'clinic' may not call this method" in err.details()
    assert _call(server.target, fed.admins["alice"], fed.ca_cert, method="AdminOnly") == (
        "spiffe://testfed/admin/alice"
    )


def test_corrupted_crl_keeps_a_revoked_clinic_out(
    own_fed: FederationPKI, own_server: ProbeServer
) -> None:
    a = own_fed.clinics["clinic-a"]
    pki.revoke(own_fed.ca_dir, name="clinic-a")
    assert _rpc_error(lambda: _call(own_server.target, a, own_fed.ca_cert)).code() == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    own_fed.crl.write_bytes(b"oops")
    err = _rpc_error(lambda: _call(own_server.target, a, own_fed.ca_cert))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (
        _call(own_server.target, own_fed.clinics["clinic-b"], own_fed.ca_cert)
        == own_fed.clinics["clinic-b"].uri
    )


# --------------------------------------------------------------------------- TLS rotation


def test_server_certificate_rotates_without_restart(own_fed: FederationPKI, tmp_path: Path) -> None:
    """New handshakes use rotated files; open connections stay up; half-rotations are ignored."""
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(own_fed.aggregator.cert, live / "server.crt")
    shutil.copy(own_fed.aggregator.key, live / "server.key")
    shutil.copy(own_fed.ca_cert, live / "ca.crt")
    srv = ProbeServer(
        own_fed, server_files=(live / "ca.crt", live / "server.crt", live / "server.key")
    )
    a = own_fed.clinics["clinic-a"]
    creds_a = channel_credentials(own_fed.ca_cert, a.cert, a.key)
    try:
        with _channel(srv.target, creds_a) as first:
            assert _invoke(first) == a.uri

            # Rotate to a certificate that does not name 127.0.0.1: new handshakes must
            # present it (and so fail host verification), proving the reload happened.
            wrong = pki.issue(
                own_fed.ca_dir,
                "aggregator",
                "server",
                tmp_path / "wrong",
                dns=("elsewhere.example",),
            )
            shutil.copy(wrong.key_path, live / "server.key")
            shutil.copy(wrong.cert_path, live / "server.crt")
            err = _rpc_error(lambda: _call(srv.target, a, own_fed.ca_cert))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert _invoke(first) == a.uri  # the open connection was not dropped

            # Rotate to a good certificate: new connections work again.
            good = pki.issue(
                own_fed.ca_dir,
                "aggregator",
                "server",
                live,
                dns=("localhost",),
                ips=("127.0.0.1",),
                replace=True,  # in place, over the files the server watches
            )
            assert good.cert_path == live / "server.crt"
            assert _call(srv.target, a, own_fed.ca_cert) == a.uri

            # A certificate whose key is not (yet) there is ignored: the last good pair stays.
            shutil.copy(own_fed.clinics["clinic-b"].cert, live / "server.crt")
            assert _call(srv.target, a, own_fed.ca_cert) == a.uri
    finally:
        srv.stop()


# --------------------------------------------------------------------------- tls helpers


def test_channel_credentials_refuse_mismatched_key(fed: FederationPKI) -> None:
    with pytest.raises(pki.PkiError, match="is not the private key of"):
        channel_credentials(fed.ca_cert, fed.clinics["clinic-a"].cert, fed.clinics["clinic-b"].key)
    with pytest.raises(pki.PkiError, match="cannot read TLS material"):
        server_credentials(fed.ca_cert, fed.ca_dir / "missing.crt", fed.aggregator.key)


def test_channel_options_merge_over_defaults() -> None:
    merged = dict(merge_options(GRPC_OPTIONS, [("grpc.keepalive_time_ms", 5_000), ("x", 1)]))
    assert merged["grpc.keepalive_time_ms"] == 5_000
    assert merged["x"] == 1
    assert merged["grpc.max_receive_message_length"] == 4 * 1024 * 1024
    server = dict(SERVER_GRPC_OPTIONS)
    # The server must tolerate the client's keepalive pings.
    assert (
        server["grpc.http2.min_ping_interval_without_data_ms"]
        <= dict(GRPC_OPTIONS)["grpc.keepalive_time_ms"]
    )


def test_reload_says_why_a_file_was_refused(own_fed: FederationPKI) -> None:
    revocations = RevocationList(own_fed.crl, _ca(own_fed), check_interval=0.0)
    assert revocations.reload() is None
    own_fed.crl.write_bytes(b"corrupt")
    assert "not a valid X.509 CRL" in (revocations.reload() or "")
    own_fed.crl.unlink()
    assert "disappeared" in (revocations.reload() or "")
