"""The federation's certificate authority: issue, revoke and list mTLS certificates.

One CA per federation, EC P-256 everywhere. A CA directory holds

* ``ca.crt`` (0644) and ``ca.key`` (0600, never world-readable, not even briefly),
* ``crl.pem``: the X.509 CRL signed by the CA, listing every revoked serial; servers
  watch this file (see :class:`common.identity.RevocationList`), so a revocation takes
  effect without a restart,
* ``issued.json``: the registry of every certificate the CA issued.

A peer's identity is the single URI SAN ``spiffe://<federation>/<role>/<name>`` of its
certificate, never a field in a request. The CA certificate carries
``spiffe://<federation>`` so the federation name can be read back from it.

Everything that another process may read while we write it (the CRL, the registry, a
rotated certificate) is written atomically: temporary file, fsync, ``os.replace``.
Read-modify-write of the registry is serialised with an advisory lock so two
``dermafed pki`` invocations cannot lose each other's records.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import DermafedError
from common.fsutil import atomic_write, fsync_dir

log = logging.getLogger(__name__)

ROLES: frozenset[str] = frozenset({"aggregator", "clinic", "admin"})
SPIFFE_SCHEME = "spiffe://"

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
CRL_FILE = "crl.pem"
REGISTRY_FILE = "issued.json"
_LOCK_FILE = ".pki.lock"

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_DNS_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# Leaves start a little in the past so a peer whose clock is slightly behind ours does
# not reject a certificate issued a moment ago.
_CLOCK_SKEW = timedelta(minutes=5)
_REGISTRY_VERSION = 1


class PkiError(DermafedError, ValueError):
    """A PKI operation was refused: bad name, missing CA, unknown serial, ..."""


class PeerVerificationError(DermafedError):
    """A peer's certificate or signature did not verify (one opaque error for every cause)."""


@dataclass(frozen=True)
class IssuedCert:
    serial: int
    role: str
    name: str
    uri: str
    not_after: datetime
    cert_path: Path
    key_path: Path


@dataclass(frozen=True)
class IssuedRecord:
    serial: int
    role: str
    name: str
    uri: str
    not_before: datetime
    not_after: datetime
    revoked: bool
    revoked_at: datetime | None

    def status(self, now: datetime) -> str:
        """``revoked``, ``expired``, ``not-yet-valid`` or ``valid`` at ``now``."""
        if self.revoked:
            return "revoked"
        if now >= self.not_after:
            return "expired"
        if now < self.not_before:
            return "not-yet-valid"
        return "valid"


# --------------------------------------------------------------------------- validation


def validate_name(value: str, what: str = "name") -> str:
    """Return ``value`` if it is a valid federation name / peer id, else raise PkiError."""
    if not isinstance(value, str) or _NAME_RE.fullmatch(value) is None:
        raise PkiError(
            f"invalid {what} {value!r}: must match [a-z0-9][a-z0-9._-]{{0,62}} "
            "(lowercase letters, digits, '.', '_', '-'; at most 63 characters)"
        )
    return value


def validate_role(role: str) -> str:
    if role not in ROLES:
        raise PkiError(f"invalid role {role!r}: must be one of {', '.join(sorted(ROLES))}")
    return role


def peer_uri(federation: str, role: str, name: str) -> str:
    """The URI SAN that names ``name`` acting as ``role`` in ``federation``."""
    return f"{SPIFFE_SCHEME}{federation}/{role}/{name}"


def federation_uri(federation: str) -> str:
    return f"{SPIFFE_SCHEME}{federation}"


def _validate_dns(name: str) -> str:
    host = name.lower().rstrip(".")
    labels = host.split(".")
    if not host or len(host) > 253 or any(_DNS_LABEL_RE.fullmatch(lb) is None for lb in labels):
        raise PkiError(f"invalid DNS name {name!r} (wildcards are not allowed)")
    return host


def _validate_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise PkiError(f"invalid IP address {value!r}") from None


def _utc_now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise PkiError("'now' must be timezone-aware (e.g. datetime.now(UTC))")
    return now.astimezone(UTC)


def _validate_days(days: int) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or days <= 0:
        raise PkiError(f"validity must be a positive number of days, got {days!r}")
    return days


# --------------------------------------------------------------------------- file helpers


# atomic_write and fsync_dir live in common.fsutil (shared with the stores).


# Where the CLI reads the CA key's passphrase from when it is not asked in a terminal.
PASSPHRASE_ENV = "DERMAFED_CA_PASSPHRASE"


def _write_new_secret(path: Path, data: bytes) -> None:
    """Create ``path`` 0600 with O_EXCL: refuses to overwrite, never world-readable."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # in case the umask is unusual; never wider than 0600
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        os.close(fd)
    fsync_dir(path.parent)


@contextlib.contextmanager
def _ca_lock(ca_dir: Path) -> Iterator[None]:
    """Serialise registry/CRL updates between concurrent ``dermafed pki`` processes."""
    fd = os.open(ca_dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# --------------------------------------------------------------------------- loading


def load_private_key(path: Path, passphrase: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    """Load a PEM EC P-256 private key (encrypted only where ``passphrase`` is given)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read private key {path}: {exc.strerror or exc}") from None
    encrypted = b"ENCRYPTED PRIVATE KEY" in data
    if encrypted and not passphrase:
        raise PkiError(f"{path} is encrypted: set {PASSPHRASE_ENV} or run in a terminal")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
    except (ValueError, TypeError) as exc:
        if encrypted:
            raise PkiError(f"{path}: wrong passphrase") from None
        raise PkiError(f"{path} is not a PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise PkiError(f"{path}: expected an EC P-256 private key")
    return key


def load_certificate(path: Path) -> x509.Certificate:
    """Load the first PEM certificate in ``path``."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read certificate {path}: {exc.strerror or exc}") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise PkiError(f"{path} is not a PEM certificate: {exc}") from None


def uri_sans(cert: x509.Certificate) -> list[str]:
    """Every URI SubjectAlternativeName of ``cert`` (empty when it has no SAN extension)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]


def federation_of_ca(ca_cert: x509.Certificate) -> str:
    """The federation name carried by a dermafed CA certificate (its ``spiffe://<fed>`` SAN)."""
    feds = [
        u[len(SPIFFE_SCHEME) :]
        for u in uri_sans(ca_cert)
        if u.startswith(SPIFFE_SCHEME) and "/" not in u[len(SPIFFE_SCHEME) :]
    ]
    if len(feds) != 1 or _NAME_RE.fullmatch(feds[0]) is None:
        raise PkiError("CA certificate does not carry exactly one spiffe://<federation> URI SAN")
    return feds[0]


def _require_ca(
    ca_dir: Path, passphrase: bytes | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_dir = Path(ca_dir)
    cert_path, key_path = ca_dir / CA_CERT_FILE, ca_dir / CA_KEY_FILE
    if not cert_path.is_file() or not key_path.is_file():
        raise PkiError(
            f"no CA found in {ca_dir} (need {CA_CERT_FILE} and {CA_KEY_FILE}); "
            "run 'dermafed pki init' first"
        )
    cert = load_certificate(cert_path)
    key = load_private_key(key_path, passphrase)
    if not _same_public_key(cert, key):
        raise PkiError(f"{key_path} does not match {cert_path}")
    return cert, key


def _same_public_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)


def load_federation(ca_dir: Path) -> str:
    """The federation name of the CA in ``ca_dir``."""
    path = Path(ca_dir) / CA_CERT_FILE
    if not path.is_file():
        raise PkiError(f"no CA certificate at {path}; run 'dermafed pki init' first")
    return federation_of_ca(load_certificate(path))


# --------------------------------------------------------------------------- registry


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse_iso(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def format_serial(serial: int) -> str:
    return f"{serial:x}"


def parse_serial(text: str) -> int:
    """Parse a hex serial as printed by ``pki list`` (``0x`` prefix and colons allowed)."""
    cleaned = text.strip().lower().replace(":", "")
    cleaned = cleaned.removeprefix("0x")
    if not cleaned or re.fullmatch(r"[0-9a-f]+", cleaned) is None:
        raise PkiError(f"invalid serial {text!r}: expected a hexadecimal number")
    return int(cleaned, 16)


def _read_registry(ca_dir: Path) -> dict[str, Any]:
    path = Path(ca_dir) / REGISTRY_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PkiError(
            f"no certificate registry at {path}; run 'dermafed pki init' first"
        ) from None
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot read certificate registry {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("certificates"), list):
        raise PkiError(f"certificate registry {path} is malformed")
    return data


def _write_registry(ca_dir: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(Path(ca_dir) / REGISTRY_FILE, text.encode("utf-8"), mode=0o644)


def _record_from_json(entry: dict[str, Any]) -> IssuedRecord:
    revoked_at = entry.get("revoked_at")
    return IssuedRecord(
        serial=int(entry["serial"], 16),
        role=entry["role"],
        name=entry["name"],
        uri=entry["uri"],
        not_before=_parse_iso(entry["not_before"]),
        not_after=_parse_iso(entry["not_after"]),
        revoked=bool(entry.get("revoked", False)),
        revoked_at=_parse_iso(revoked_at) if revoked_at else None,
    )


def list_issued(ca_dir: Path) -> list[IssuedRecord]:
    """Every certificate the CA in ``ca_dir`` issued, oldest first."""
    data = _read_registry(Path(ca_dir))
    try:
        return [_record_from_json(e) for e in data["certificates"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise PkiError(f"certificate registry in {ca_dir} is malformed: {exc}") from None


# --------------------------------------------------------------------------- CRL


def _build_crl(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    revoked: Sequence[tuple[int, datetime]],
    crl_number: int,
    now: datetime,
) -> bytes:
    # The CRL is distributed as a local file that servers watch; freshness comes from
    # re-reading it, so next_update simply follows the CA's own lifetime.
    next_update = max(ca_cert.not_valid_after_utc, now + timedelta(days=1))
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(crl_number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)


# --------------------------------------------------------------------------- CA


def init_ca(
    federation: str,
    out: Path,
    *,
    valid_days: int = 3650,
    now: datetime | None = None,
    passphrase: bytes | None = None,
) -> Path:
    """Create the federation CA in ``out`` and return the path of ``ca.crt``.

    With ``passphrase`` the CA key is stored encrypted (PKCS#8, the best scheme the
    library offers); every later operation that signs then needs the passphrase.

    Refuses to touch a directory that already holds a CA key: overwriting it would
    orphan every certificate of the federation.
    """
    validate_name(federation, "federation name")
    _validate_days(valid_days)
    now = _utc_now(now)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = out / CA_KEY_FILE, out / CA_CERT_FILE
    if key_path.exists() or cert_path.exists():
        raise PkiError(f"a CA already exists in {out}; refusing to overwrite it")

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"dermafed {federation}"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"dermafed {federation} CA"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(_random_serial(set()))
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(federation_uri(federation))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )

    # The key goes first and with O_EXCL: if two inits race, one of them fails here.
    try:
        _write_new_secret(key_path, _key_pem(key, passphrase))
    except FileExistsError:
        raise PkiError(f"a CA already exists in {out}; refusing to overwrite it") from None
    atomic_write(cert_path, _cert_pem(cert), mode=0o644)
    atomic_write(out / CRL_FILE, _build_crl(cert, key, [], 1, now), mode=0o644)
    _write_registry(
        out,
        {
            "version": _REGISTRY_VERSION,
            "federation": federation,
            "crl_number": 1,
            "certificates": [],
        },
    )
    log.info("created CA for federation %s in %s", federation, out)
    return cert_path


def _peer_subject(federation: str, role: str, name: str) -> x509.Name:
    """A peer's subject name (informational: identity is the URI SAN, never the subject)."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"dermafed {federation}"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )


def _random_serial(taken: set[int]) -> int:
    while True:
        serial = secrets.randbits(128)
        if serial != 0 and serial not in taken:
            return serial


def issue(
    ca_dir: Path,
    role: str,
    name: str,
    out: Path,
    *,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    valid_days: int = 397,
    now: datetime | None = None,
    replace: bool = False,
    passphrase: bytes | None = None,
) -> IssuedCert:
    """Issue a leaf certificate and a new key for ``name`` acting as ``role``, into ``out``.

    Refuses when ``out`` already holds a key or certificate for ``name``: overwriting
    would destroy a key in use and leave its certificate valid. Rotation is
    :func:`renew`; ``replace=True`` writes the new files over the old ones atomically (a
    server watching them picks them up) and leaves the old certificate valid. Where the
    key must never leave the peer's machine, use :func:`request` there and :func:`sign_request`
    at the CA instead.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    return _issue_leaf(
        ca_dir,
        role,
        name,
        out,
        public_key=key.public_key(),
        key_pem=_key_pem(key),
        dns=dns,
        ips=ips,
        valid_days=valid_days,
        now=now,
        replace=replace,
        passphrase=passphrase,
    )


def _issue_leaf(
    ca_dir: Path,
    role: str,
    name: str,
    out: Path,
    *,
    public_key: ec.EllipticCurvePublicKey,
    key_pem: bytes | None,
    dns: Sequence[str],
    ips: Sequence[str],
    valid_days: int,
    now: datetime | None,
    replace: bool,
    passphrase: bytes | None = None,
) -> IssuedCert:
    """Sign a certificate for ``public_key``, record it, and write it (with ``key_pem``)."""
    validate_role(role)
    validate_name(name, f"{role} name")
    if name == "ca":
        raise PkiError("the name 'ca' is reserved (it would clash with ca.crt / ca.key)")
    _validate_days(valid_days)
    dns_names = [_validate_dns(d) for d in dns]
    ip_addrs = [_validate_ip(i) for i in ips]
    now = _utc_now(now)
    ca_dir, out = Path(ca_dir), Path(out)

    ca_cert, ca_key = _require_ca(ca_dir, passphrase)
    federation = federation_of_ca(ca_cert)
    if not ca_cert.not_valid_before_utc <= now < ca_cert.not_valid_after_utc:
        raise PkiError(
            f"the CA certificate is not valid at {_iso(now)} "
            f"(valid {_iso(ca_cert.not_valid_before_utc)} .. {_iso(ca_cert.not_valid_after_utc)})"
        )
    not_before = max(now - _CLOCK_SKEW, ca_cert.not_valid_before_utc)
    not_after = now + timedelta(days=valid_days)
    if not_after > ca_cert.not_valid_after_utc:
        log.warning("validity of %s/%s clamped to the CA's expiry", role, name)
        not_after = ca_cert.not_valid_after_utc

    uri = peer_uri(federation, role, name)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    sans += [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ip) for ip in ip_addrs]
    ekus = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role == "aggregator":
        ekus.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)

    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / f"{name}.crt", out / f"{name}.key"
    with _ca_lock(ca_dir):
        ours = (key_path, cert_path) if key_pem is not None else (cert_path,)
        existing = [p.name for p in ours if p.exists()]
        if existing and not replace:
            raise PkiError(
                f"{out} already holds {' and '.join(existing)}; refusing to overwrite "
                f"(rotate with 'dermafed pki renew', which also revokes the old certificate)"
            )
        registry = _read_registry(ca_dir)
        taken = {int(e["serial"], 16) for e in registry["certificates"]}
        serial = _random_serial(taken)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_peer_subject(federation, role, name))
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        # Key before certificate: a watcher that sees the new certificate also finds its
        # key (and one that sees a mismatched pair keeps the old one, see common.tls).
        if key_pem is not None:
            atomic_write(key_path, key_pem, mode=0o600)
        atomic_write(cert_path, _cert_pem(cert), mode=0o644)
        if out.resolve() != ca_dir.resolve():
            atomic_write(out / CA_CERT_FILE, (ca_dir / CA_CERT_FILE).read_bytes(), mode=0o644)
        registry["certificates"].append(
            {
                "serial": format_serial(serial),
                "role": role,
                "name": name,
                "uri": uri,
                "not_before": _iso(not_before),
                "not_after": _iso(not_after),
                "revoked": False,
                "revoked_at": None,
            }
        )
        _write_registry(ca_dir, registry)
    log.info("issued %s certificate serial %s for %s", role, format_serial(serial), name)
    return IssuedCert(
        serial=serial,
        role=role,
        name=name,
        uri=uri,
        not_after=not_after,
        cert_path=cert_path,
        key_path=key_path,
    )


def request(
    federation: str,
    role: str,
    name: str,
    out: Path,
    *,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
) -> tuple[Path, Path]:
    """At the peer: a new key (``out/<name>.key``, 0600) and a CSR for it (``<name>.csr``).

    The key never leaves ``out``; only the CSR goes to the CA operator, who signs it with
    :func:`sign_request`. Refuses to overwrite an existing key.
    """
    validate_name(federation, "federation name")
    validate_role(role)
    validate_name(name, f"{role} name")
    if name == "ca":
        raise PkiError("the name 'ca' is reserved (it would clash with ca.crt / ca.key)")
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(peer_uri(federation, role, name))
    ]
    sans += [x509.DNSName(_validate_dns(d)) for d in dns]
    sans += [x509.IPAddress(_validate_ip(i)) for i in ips]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key_path, csr_path = out / f"{name}.key", out / f"{name}.csr"
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_peer_subject(federation, role, name))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    try:
        _write_new_secret(key_path, _key_pem(key))
    except FileExistsError:
        raise PkiError(f"{key_path} exists; refusing to overwrite a key") from None
    atomic_write(csr_path, csr.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return key_path, csr_path


def sign_request(
    ca_dir: Path,
    csr_path: Path,
    out: Path,
    *,
    role: str,
    name: str,
    valid_days: int = 397,
    now: datetime | None = None,
    passphrase: bytes | None = None,
) -> IssuedCert:
    """At the CA: a certificate for the key in a CSR, written to ``out/<name>.crt``.

    The operator states the ``role`` and ``name`` they mean to certify; a CSR asking for
    anything else, for another federation, or whose signature does not verify (the
    requester does not hold the key) is refused. Only the CSR's public key and its DNS/IP
    names are used; every other field of the certificate is the CA's own.
    """
    try:
        csr = x509.load_pem_x509_csr(Path(csr_path).read_bytes())
    except OSError as exc:
        raise PkiError(f"cannot read {csr_path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise PkiError(f"{csr_path} is not a PEM certificate request: {exc}") from None
    if not csr.is_signature_valid:
        raise PkiError(f"{csr_path}: the request's signature does not verify")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise PkiError(f"{csr_path}: expected an EC P-256 key")
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PkiError(f"{csr_path} names no identity (no subject alternative name)") from None
    ca_cert, _ = _require_ca(Path(ca_dir), passphrase)
    wanted = peer_uri(federation_of_ca(ca_cert), validate_role(role), validate_name(name))
    asked = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if asked != [wanted]:
        raise PkiError(f"{csr_path} asks for {', '.join(asked) or 'no identity'}, not {wanted}")
    return _issue_leaf(
        ca_dir,
        role,
        name,
        out,
        public_key=public_key,
        key_pem=None,
        dns=sans.get_values_for_type(x509.DNSName),
        ips=[str(ip) for ip in sans.get_values_for_type(x509.IPAddress)],
        valid_days=valid_days,
        now=now,
        replace=False,
        passphrase=passphrase,
    )


def renew(
    ca_dir: Path,
    role: str,
    name: str,
    out: Path,
    *,
    valid_days: int = 397,
    now: datetime | None = None,
    passphrase: bytes | None = None,
) -> tuple[IssuedCert, int]:
    """Rotate the certificate of ``name`` in ``out``; returns the new one and the old serial.

    A new key and certificate with the old one's DNS and IP names replace the files
    atomically, then the old serial is revoked, so one certificate per peer stays valid.
    """
    ca_dir, out = Path(ca_dir), Path(out)
    cert_path = out / f"{validate_name(name, f'{role} name')}.crt"
    if not cert_path.exists():
        raise PkiError(f"no certificate for {name!r} in {out} to renew; use 'pki issue'")
    old = load_certificate(cert_path)
    ca_cert, _ = _require_ca(ca_dir, passphrase)
    wanted = peer_uri(federation_of_ca(ca_cert), validate_role(role), name)
    try:
        # The signature, not the issuer name: a foreign CA can carry the same name.
        old.verify_directly_issued_by(ca_cert)
        ours = wanted in uri_sans(old)
    except (ValueError, TypeError, InvalidSignature):
        ours = False
    if not ours:
        raise PkiError(f"{cert_path} is not this CA's {role} certificate for {name!r}")
    sans = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    new = issue(
        ca_dir,
        role,
        name,
        out,
        dns=sans.get_values_for_type(x509.DNSName),
        ips=[str(ip) for ip in sans.get_values_for_type(x509.IPAddress)],
        valid_days=valid_days,
        now=now,
        replace=True,
        passphrase=passphrase,
    )
    revoke(ca_dir, serial=old.serial_number, now=now, passphrase=passphrase)
    return new, old.serial_number


def revoke(
    ca_dir: Path,
    *,
    serial: int | None = None,
    name: str | None = None,
    role: str | None = None,
    now: datetime | None = None,
    passphrase: bytes | None = None,
) -> list[int]:
    """Revoke one serial, or every unrevoked certificate of ``name`` (optionally of one role).

    Returns the serials newly revoked (empty when they were all revoked already) and
    rewrites ``crl.pem`` atomically so watching servers refuse them on their next call.
    """
    if (serial is None) == (name is None):
        raise PkiError("give exactly one of serial or name to revoke")
    if role is not None:
        validate_role(role)
    now = _utc_now(now)
    ca_dir = Path(ca_dir)
    ca_cert, ca_key = _require_ca(ca_dir, passphrase)
    with _ca_lock(ca_dir):
        registry = _read_registry(ca_dir)
        entries: list[dict[str, Any]] = registry["certificates"]
        if serial is not None:
            matches = [e for e in entries if int(e["serial"], 16) == serial]
            if not matches:
                raise PkiError(f"no certificate with serial 0x{format_serial(serial)} was issued")
        else:
            matches = [
                e for e in entries if e["name"] == name and (role is None or e["role"] == role)
            ]
            if not matches:
                which = f"{role} {name!r}" if role else repr(name)
                raise PkiError(f"no certificate was issued for {which}")
        newly: list[int] = []
        for entry in matches:
            if not entry.get("revoked"):
                entry["revoked"] = True
                entry["revoked_at"] = _iso(now)
                newly.append(int(entry["serial"], 16))
        if not newly:
            return []
        crl_number = int(registry.get("crl_number", 1)) + 1
        registry["crl_number"] = crl_number
        revoked = [
            (int(e["serial"], 16), _parse_iso(e["revoked_at"])) for e in entries if e.get("revoked")
        ]
        crl_pem = _build_crl(ca_cert, ca_key, revoked, crl_number, now)
        # Registry first: if we die between the two writes the next revoke rebuilds the
        # CRL from the registry; the reverse order could lose a revocation record.
        _write_registry(ca_dir, registry)
        atomic_write(ca_dir / CRL_FILE, crl_pem, mode=0o644)
    for s in newly:
        log.info("revoked certificate serial %s", format_serial(s))
    return newly


# --------------------------------------------------------------------------- signatures


def sign(private_key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA P-256 / SHA-256 signature (DER) of ``data``."""
    return private_key.sign(data, ec.ECDSA(hashes.SHA256()))


def verify_peer_signature(
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    data: bytes,
    signature: bytes,
    *,
    expected_uri: str,
    now: datetime,
) -> None:
    """Check that ``signature`` over ``data`` was made by the peer ``expected_uri``.

    The certificate must be a leaf issued by ``ca_cert``, valid at ``now`` and carry
    ``expected_uri`` as its URI SAN. Every failure raises the same
    :class:`PeerVerificationError` (the message says which check failed, for logs).
    Revocation is not checked here: the relaying aggregator refuses revoked peers at
    connection time.
    """
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise PeerVerificationError(
            "peer certificate was not issued by the federation CA"
        ) from None
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = constraints.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if is_ca:
        raise PeerVerificationError("peer certificate is a CA certificate, not a leaf")
    if now.tzinfo is None:
        raise PeerVerificationError("'now' must be timezone-aware")
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise PeerVerificationError(
            f"peer certificate serial 0x{format_serial(cert.serial_number)} is not valid at "
            f"{_iso(now)}"
        )
    if uri_sans(cert) != [expected_uri]:
        raise PeerVerificationError(f"peer certificate does not name {expected_uri}")
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise PeerVerificationError("peer certificate key is not EC P-256")
    try:
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise PeerVerificationError(f"signature by {expected_uri} does not verify") from None


def certificate_expiry_reader(path: Path) -> Callable[[], float]:
    """A callable giving the certificate's expiry (Unix seconds), re-read when the file
    changes: for a metric that must follow certificate rotation without a restart."""
    cache: dict[str, Any] = {}

    def read() -> float:
        try:
            st = Path(path).stat()
        except OSError:
            return float("nan")
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if cache.get("stamp") != stamp:
            try:
                cache["value"] = load_certificate(Path(path)).not_valid_after_utc.timestamp()
            except Exception:  # a half-written file during rotation: keep the last value
                cache.setdefault("value", float("nan"))
            cache["stamp"] = stamp
        return float(cache["value"])

    return read
