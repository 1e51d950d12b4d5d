"""Who is calling: peer identity from the mTLS certificate, and live revocation.

Division of labour with the TLS layer (``common.tls.server_credentials``):

* The TLS handshake already refuses a peer without a client certificate, one that does
  not chain to the federation CA, and one outside its validity period.
* This module adds what TLS in gRPC Python cannot: the role/name taken from the single
  ``spiffe://<federation>/<role>/<name>`` URI SAN, the CRL (re-read when the file
  changes, so revocations apply to the very next call without restarting the server),
  a per-method role check, and an expiry re-check for connections that were
  established before their certificate expired.

A peer's identity is never taken from a request field.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import grpc
from cryptography import x509

from common.errors import ConfigError, DermafedError
from common.pki import ROLES, SPIFFE_SCHEME, format_serial, peer_uri, uri_sans, validate_name

log = logging.getLogger(__name__)

# gRPC's auth-context key for the peer's leaf certificate (PEM).
X509_PEM_CERT_PROPERTY = "x509_pem_cert"


class IdentityError(DermafedError):
    """A certificate does not carry a valid dermafed identity, or the CRL is unusable."""


@dataclass(frozen=True)
class Identity:
    federation: str
    role: str
    name: str
    serial: int

    @property
    def uri(self) -> str:
        return peer_uri(self.federation, self.role, self.name)


def identity_from_certificate(cert: x509.Certificate, federation: str) -> Identity:
    """The identity named by the one ``spiffe://<federation>/<role>/<name>`` URI SAN of ``cert``."""
    uris = uri_sans(cert)
    if not uris:
        raise IdentityError("certificate carries no URI SAN (expected spiffe://<federation>/...)")
    if len(uris) > 1:
        raise IdentityError(f"certificate carries {len(uris)} URI SANs; exactly one is allowed")
    uri = uris[0]
    if not uri.startswith(SPIFFE_SCHEME):
        raise IdentityError(f"certificate URI SAN {uri!r} is not a spiffe:// identity")
    parts = uri[len(SPIFFE_SCHEME) :].split("/")
    if len(parts) != 3:
        raise IdentityError(
            f"certificate URI SAN {uri!r} is not of the form spiffe://<federation>/<role>/<name>"
        )
    fed, role, name = parts
    if fed != federation:
        raise IdentityError(f"certificate belongs to federation {fed!r}, not {federation!r}")
    if role not in ROLES:
        raise IdentityError(f"certificate names unknown role {role!r}")
    try:
        validate_name(name)
    except ValueError as exc:
        raise IdentityError(f"certificate URI SAN {uri!r}: {exc}") from None
    return Identity(federation=fed, role=role, name=name, serial=cert.serial_number)


def own_identity(cert: x509.Certificate, federation: str, role: str, where: str) -> Identity:
    """A daemon's own identity, checked at start: this federation and this role.

    A daemon started with another federation's or another role's certificate would look
    healthy and then refuse (or be refused by) every peer; this stops it with one line
    naming the config key instead.
    """
    try:
        identity = identity_from_certificate(cert, federation)
    except IdentityError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if identity.role != role:
        raise ConfigError(
            f"{where} is the certificate of {identity.role} {identity.name!r}; this daemon "
            f"needs one for role {role!r} in federation {federation!r}"
        )
    return identity


# --------------------------------------------------------------------------- revocation

_Stamp = tuple[int, int, int, int]


def _stamp(path: Path) -> _Stamp | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class RevocationList:
    """The set of revoked serials from a CA-signed CRL file, re-read when the file changes.

    * The file is stat'ed at most once per ``check_interval`` seconds and re-parsed only
      when its (device, inode, mtime_ns, size) changed; :meth:`reload` forces a re-read.
    * The CRL must be issued and signed by ``ca_cert``. A corrupt, foreign-signed or
      older (lower CRL number) file is refused with an error log and the last good list
      stays in force: a bad file never un-revokes anyone.
    * A CRL path that does not exist at start means "no revocations". If a CRL that was
      loaded disappears later, the last good list stays in force.
    * A CRL that is invalid when the list is first built raises :class:`IdentityError`,
      so a server refuses to start rather than run without its revocations.
    """

    def __init__(
        self,
        crl_path: Path | None,
        ca_cert: x509.Certificate,
        *,
        check_interval: float = 0.5,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = Path(crl_path) if crl_path is not None else None
        self._ca_cert = ca_cert
        self._check_interval = check_interval
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._revoked: frozenset[int] = frozenset()
        self._crl_number: int | None = None
        self._loaded = False
        self._stamp: _Stamp | None = None
        with self._lock:
            self._next_check = self._monotonic() + self._check_interval
            error = self._load()
        if error is not None:
            raise IdentityError(error)

    @property
    def revoked(self) -> frozenset[int]:
        self._maybe_reload()
        return self._revoked

    def is_revoked(self, serial: int) -> bool:
        self._maybe_reload()
        return serial in self._revoked

    def reload(self) -> str | None:
        """Re-read the CRL now, whether or not the file looks changed.

        Returns why the file was refused (the previous list stays in force), or None when
        it was loaded: an operator who asked for the reload must hear that it failed.
        """
        with self._lock:
            self._next_check = self._monotonic() + self._check_interval
            error = self._load()
        if error is not None:
            log.error("%s; keeping the previous %d revocation(s)", error, len(self._revoked))
        return error

    def _maybe_reload(self) -> None:
        if self._path is None or self._monotonic() < self._next_check:
            return
        error = None
        with self._lock:
            now = self._monotonic()
            if now < self._next_check:
                return  # another thread checked while we waited for the lock
            self._next_check = now + self._check_interval
            if _stamp(self._path) != self._stamp:
                error = self._load()
        if error is not None:
            log.error("%s; keeping the previous %d revocation(s)", error, len(self._revoked))

    def _load(self) -> str | None:
        """Re-read the file (lock held). Returns an error message when it was refused."""
        if self._path is None:
            return None
        stamp = _stamp(self._path)
        # Remember the stamp even when the file is refused, so a bad file is reported
        # once, not on every call; the next write changes the stamp and is examined.
        self._stamp = stamp
        if stamp is None:
            if self._loaded:
                return f"CRL {self._path} disappeared"
            return None
        try:
            data = self._path.read_bytes()
        except OSError as exc:
            return f"cannot read CRL {self._path}: {exc}"
        try:
            crl = (
                x509.load_pem_x509_crl(data)
                if data.lstrip().startswith(b"-----")
                else x509.load_der_x509_crl(data)
            )
        except ValueError:
            return f"CRL {self._path} is not a valid X.509 CRL"
        if crl.issuer != self._ca_cert.subject:
            return f"CRL {self._path} was not issued by the federation CA"
        try:
            signature_ok = crl.is_signature_valid(self._ca_cert.public_key())  # type: ignore[arg-type]
        except (TypeError, ValueError):
            signature_ok = False
        if not signature_ok:
            return f"CRL {self._path} signature does not verify against the federation CA"
        number = _crl_number(crl)
        if self._crl_number is not None and number is not None and number < self._crl_number:
            # Replaying an older CRL is how one would un-revoke a certificate.
            return f"CRL {self._path} has number {number}, older than the loaded {self._crl_number}"
        revoked = frozenset(entry.serial_number for entry in crl)
        dropped = self._revoked - revoked
        if dropped:
            log.warning(
                "CRL %s (number %s) no longer lists %d previously revoked serial(s)",
                self._path,
                number,
                len(dropped),
            )
        if revoked != self._revoked:
            log.info("CRL %s loaded: %d revoked certificate(s)", self._path, len(revoked))
        self._revoked = revoked
        self._crl_number = number
        self._loaded = True
        return None


def _crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


# --------------------------------------------------------------------------- gRPC


@functools.lru_cache(maxsize=1024)
def _parse_pem_certificate(pem: bytes) -> x509.Certificate:
    # Every call on a connection presents the same PEM; parse it once.
    return x509.load_pem_x509_certificate(pem)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class PeerAuthenticator:
    """Authenticate and authorise the caller of a gRPC method from its client certificate.

    The TLS layer has already verified the chain to the federation CA and the validity
    period at handshake time; this checks the identity SAN, the live CRL, the role, and
    re-checks expiry because a connection can outlive its certificate.
    """

    def __init__(
        self,
        federation: str,
        revocations: RevocationList,
        *,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._federation = validate_name(federation, "federation name")
        self._revocations = revocations
        self._clock = clock

    @property
    def federation(self) -> str:
        return self._federation

    def authenticate(
        self, context: grpc.ServicerContext, allowed_roles: Collection[str]
    ) -> Identity:
        """The caller's identity; aborts the call with UNAUTHENTICATED / PERMISSION_DENIED."""
        auth: Any = context.auth_context()
        pems = auth.get(X509_PEM_CERT_PROPERTY) if auth else None
        if not pems:
            self._deny(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "no client certificate was presented (mutual TLS is required)",
            )
        pem = pems[0]
        try:
            cert = _parse_pem_certificate(bytes(pem))
        except ValueError:
            self._deny(context, grpc.StatusCode.UNAUTHENTICATED, "client certificate is unreadable")
        try:
            identity = identity_from_certificate(cert, self._federation)
        except IdentityError as exc:
            self._deny(context, grpc.StatusCode.UNAUTHENTICATED, str(exc))
        serial = f"0x{format_serial(identity.serial)}"
        if self._revocations.is_revoked(identity.serial):
            self._deny(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                f"certificate serial {serial} ({identity.uri}) is revoked",
            )
        if self._clock() >= cert.not_valid_after_utc:
            self._deny(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                f"certificate serial {serial} ({identity.uri}) expired at "
                f"{cert.not_valid_after_utc.isoformat()}",
            )
        if identity.role not in allowed_roles:
            self._deny(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"role {identity.role!r} may not call this method "
                f"(allowed: {', '.join(sorted(allowed_roles)) or 'none'})",
            )
        return identity

    @staticmethod
    def _deny(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
        log.warning("refused peer %s: %s", context.peer(), message)
        context.abort(code, message)
        # abort() raises; this guards against a context implementation that does not.
        raise RuntimeError("grpc ServicerContext.abort returned")
