"""Throwaway federation PKI for tests: real CA, real certificates, in a temporary folder.

Usage from a test::

    from pki_fixtures import make_federation

    def test_something(tmp_path):
        fed = make_federation(tmp_path)
        creds = channel_credentials(fed.ca_cert, *fed.clinics["clinic-a"])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from common import pki


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path
    serial: int
    uri: str

    def __iter__(self) -> Iterator[Path]:
        # Lets a pair be unpacked as ``cert, key = pair`` or splatted into credentials.
        return iter((self.cert, self.key))


@dataclass(frozen=True)
class FederationPKI:
    federation: str
    ca_dir: Path
    ca_cert: Path
    crl: Path
    aggregator: CertPair
    clinics: dict[str, CertPair]
    admins: dict[str, CertPair]
    # A second CA with the same federation name, and a clinic certificate from it
    # (named like the first real clinic), for negative tests.
    foreign_ca_dir: Path
    foreign_ca_cert: Path
    foreign_clinic: CertPair
    # Issued by the real CA but expired long ago.
    expired_clinic: CertPair


def _pair(issued: pki.IssuedCert) -> CertPair:
    return CertPair(issued.cert_path, issued.key_path, issued.serial, issued.uri)


def make_federation(
    tmp: Path,
    federation: str = "testfed",
    clinics: Sequence[str] = ("clinic-a", "clinic-b", "clinic-c"),
    admins: Sequence[str] = ("alice",),
) -> FederationPKI:
    """Build a complete federation PKI under ``tmp`` (one folder per party, like a deployment)."""
    tmp = Path(tmp)
    now = datetime.now(UTC)
    ca_dir = tmp / "ca"
    # The CA starts in the past so the expired clinic certificate below lies inside it.
    ca_cert = pki.init_ca(federation, ca_dir, now=now - timedelta(days=60))

    aggregator = pki.issue(
        ca_dir,
        "aggregator",
        "aggregator",
        tmp / "aggregator",
        dns=("localhost",),
        ips=("127.0.0.1",),
        now=now,
    )
    clinic_pairs = {
        name: _pair(pki.issue(ca_dir, "clinic", name, tmp / "clinic" / name, now=now))
        for name in clinics
    }
    admin_pairs = {
        name: _pair(pki.issue(ca_dir, "admin", name, tmp / "admin" / name, now=now))
        for name in admins
    }
    expired = pki.issue(
        ca_dir,
        "clinic",
        "clinic-expired",
        tmp / "clinic" / "clinic-expired",
        valid_days=1,
        now=now - timedelta(days=30),
    )

    foreign_dir = tmp / "foreign-ca"
    foreign_ca_cert = pki.init_ca(federation, foreign_dir, now=now)
    foreign_name = clinics[0] if clinics else "clinic-a"
    foreign = pki.issue(
        foreign_dir, "clinic", foreign_name, tmp / "foreign" / foreign_name, now=now
    )

    return FederationPKI(
        federation=federation,
        ca_dir=ca_dir,
        ca_cert=ca_cert,
        crl=ca_dir / pki.CRL_FILE,
        aggregator=_pair(aggregator),
        clinics=clinic_pairs,
        admins=admin_pairs,
        foreign_ca_dir=foreign_dir,
        foreign_ca_cert=foreign_ca_cert,
        foreign_clinic=_pair(foreign),
        expired_clinic=_pair(expired),
    )
