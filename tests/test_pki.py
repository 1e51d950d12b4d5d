"""The federation CA: issuing, revoking, listing, file permissions, peer signatures, CLI."""

from __future__ import annotations

import argparse
import base64
import json
import os
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pki_fixtures import FederationPKI, make_federation

from common import pki
from dermafed import cli_pki


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _crl(ca_dir: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((ca_dir / pki.CRL_FILE).read_bytes())


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> FederationPKI:
    """Shared by the tests that only read the PKI (building one costs a few fsyncs)."""
    return make_federation(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def own_fed(tmp_path: Path) -> FederationPKI:
    """A private PKI for tests that issue into it or revoke."""
    return make_federation(tmp_path)


# --------------------------------------------------------------------------- init_ca


def test_init_ca_writes_ca_files_with_safe_modes(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    old_umask = os.umask(0)  # even with a permissive umask the key must stay private
    try:
        cert_path = pki.init_ca("eu-derm", ca_dir)
    finally:
        os.umask(old_umask)

    assert cert_path == ca_dir / "ca.crt"
    assert _mode(ca_dir / "ca.key") == 0o600
    assert _mode(ca_dir / "ca.crt") == 0o644
    assert json.loads((ca_dir / "issued.json").read_text())["certificates"] == []

    cert = pki.load_certificate(cert_path)
    common_name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert common_name == "dermafed eu-derm CA"
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert pki.uri_sans(cert) == ["spiffe://eu-derm"]
    assert pki.load_federation(ca_dir) == "eu-derm"
    cert.verify_directly_issued_by(cert)  # self-signed

    crl = _crl(ca_dir)
    assert len(crl) == 0
    assert crl.is_signature_valid(cert.public_key())  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", "Upper", "-lead", "a/b", "a" * 64, "sp ace", "ü"])
def test_init_ca_rejects_invalid_federation_names(tmp_path: Path, bad: str) -> None:
    with pytest.raises(pki.PkiError, match="invalid federation name") as info:
        pki.init_ca(bad, tmp_path / "ca")
    assert isinstance(info.value, ValueError)
    assert not (tmp_path / "ca" / "ca.key").exists()


def test_init_ca_refuses_to_overwrite_an_existing_ca(tmp_path: Path) -> None:
    pki.init_ca("fed", tmp_path)
    key_before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(pki.PkiError, match="already exists"):
        pki.init_ca("fed", tmp_path)
    assert (tmp_path / "ca.key").read_bytes() == key_before


# --------------------------------------------------------------------------- issue


def test_issue_aggregator_certificate(fed: FederationPKI) -> None:
    cert = pki.load_certificate(fed.aggregator.cert)
    ca = pki.load_certificate(fed.ca_cert)
    cert.verify_directly_issued_by(ca)
    assert cert.serial_number == fed.aggregator.serial
    assert 0 < cert.serial_number < 2**128

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://testfed/aggregator/aggregator"
    ]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    out = fed.aggregator.cert.parent
    assert _mode(fed.aggregator.key) == 0o600
    assert _mode(fed.aggregator.cert) == 0o644
    assert (out / "ca.crt").read_bytes() == fed.ca_cert.read_bytes()
    key = pki.load_private_key(fed.aggregator.key)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]


def test_issue_clinic_and_admin_are_client_only(fed: FederationPKI) -> None:
    for pair, uri in [
        (fed.clinics["clinic-b"], "spiffe://testfed/clinic/clinic-b"),
        (fed.admins["alice"], "spiffe://testfed/admin/alice"),
    ]:
        cert = pki.load_certificate(pair.cert)
        assert pki.uri_sans(cert) == [uri]
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert _mode(pair.key) == 0o600


def test_issue_records_every_certificate_in_the_registry(fed: FederationPKI) -> None:
    records = {(r.role, r.name): r for r in pki.list_issued(fed.ca_dir)}
    assert set(records) == {
        ("aggregator", "aggregator"),
        ("clinic", "clinic-a"),
        ("clinic", "clinic-b"),
        ("clinic", "clinic-c"),
        ("clinic", "clinic-expired"),
        ("admin", "alice"),
    }
    rec = records[("clinic", "clinic-a")]
    assert rec.serial == fed.clinics["clinic-a"].serial
    assert rec.uri == "spiffe://testfed/clinic/clinic-a"
    assert not rec.revoked and rec.revoked_at is None
    now = datetime.now(UTC)
    assert rec.status(now) == "valid"
    assert records[("clinic", "clinic-expired")].status(now) == "expired"

    raw = json.loads((fed.ca_dir / "issued.json").read_text())["certificates"]
    entry = next(e for e in raw if e["name"] == "clinic-a")
    assert entry["serial"] == f"{fed.clinics['clinic-a'].serial:x}"
    assert set(entry) == {
        "serial",
        "role",
        "name",
        "uri",
        "not_before",
        "not_after",
        "revoked",
        "revoked_at",
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"role": "nurse"}, "invalid role"),
        ({"name": "Clinic A"}, "invalid clinic name"),
        ({"name": "ca"}, "reserved"),
        ({"dns": ["bad_host!"]}, "invalid DNS name"),
        ({"dns": ["*.example.org"]}, "invalid DNS name"),
        ({"ips": ["300.1.1.1"]}, "invalid IP address"),
        ({"valid_days": 0}, "positive number of days"),
    ],
)
def test_issue_rejects_bad_input(fed: FederationPKI, kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"role": "clinic", "name": "clinic-z"}
    args.update(kwargs)
    role, name = args.pop("role"), args.pop("name")
    with pytest.raises(pki.PkiError, match=message):
        pki.issue(fed.ca_dir, role, name, fed.ca_dir.parent / "z", **args)
    assert not (fed.ca_dir.parent / "z" / f"{name}.key").exists()


def test_issue_without_a_ca_explains_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(pki.PkiError, match="pki init"):
        pki.issue(tmp_path / "nowhere", "clinic", "c1", tmp_path / "out")


def test_issue_clamps_validity_to_the_ca(tmp_path: Path) -> None:
    pki.init_ca("fed", tmp_path / "ca", valid_days=10)
    issued = pki.issue(tmp_path / "ca", "clinic", "c1", tmp_path / "c1", valid_days=397)
    ca = pki.load_certificate(tmp_path / "ca" / "ca.crt")
    assert issued.not_after == ca.not_valid_after_utc
    assert pki.load_certificate(issued.cert_path).not_valid_after_utc == ca.not_valid_after_utc


def test_issue_refuses_to_overwrite_a_peers_key(own_fed: FederationPKI) -> None:
    """Before, issuing into an existing directory replaced the key in use and left the
    old certificate valid: three valid certificates for one clinic in 'pki list'."""
    old = own_fed.clinics["clinic-a"]
    key_before = old.key.read_bytes()
    with pytest.raises(pki.PkiError, match=r"refusing to overwrite .*pki renew"):
        pki.issue(own_fed.ca_dir, "clinic", "clinic-a", old.cert.parent)
    assert old.key.read_bytes() == key_before
    assert [r.serial for r in pki.list_issued(own_fed.ca_dir) if r.name == "clinic-a"] == [
        old.serial
    ]


def test_renew_rotates_files_and_revokes_the_old_certificate(own_fed: FederationPKI) -> None:
    old = own_fed.clinics["clinic-a"]
    new, old_serial = pki.renew(own_fed.ca_dir, "clinic", "clinic-a", old.cert.parent)
    assert old_serial == old.serial != new.serial
    assert new.cert_path == old.cert
    assert pki.load_certificate(old.cert).serial_number == new.serial
    records = {r.serial: r.revoked for r in pki.list_issued(own_fed.ca_dir) if r.name == "clinic-a"}
    assert records == {old.serial: True, new.serial: False}
    assert [r.serial_number for r in _crl(own_fed.ca_dir)] == [old.serial]


def test_renew_keeps_the_aggregators_dns_names(own_fed: FederationPKI) -> None:
    agg = own_fed.aggregator
    before = pki.load_certificate(agg.cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    pki.renew(own_fed.ca_dir, "aggregator", "aggregator", agg.cert.parent)
    after = pki.load_certificate(agg.cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert after.value == before.value


def test_renew_refuses_a_missing_or_foreign_certificate(own_fed: FederationPKI, tmp_path) -> None:
    with pytest.raises(pki.PkiError, match="no certificate for 'clinic-z'"):
        pki.renew(own_fed.ca_dir, "clinic", "clinic-z", tmp_path)
    foreign = own_fed.foreign_clinic
    with pytest.raises(pki.PkiError, match="not this CA's clinic certificate"):
        pki.renew(own_fed.ca_dir, "clinic", foreign.cert.stem, foreign.cert.parent)


def test_concurrent_issues_do_not_lose_registry_records(tmp_path: Path) -> None:
    pki.init_ca("fed", tmp_path / "ca")
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            pki.issue(tmp_path / "ca", "clinic", f"c{i}", tmp_path / f"c{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(r.name for r in pki.list_issued(tmp_path / "ca")) == [f"c{i}" for i in range(8)]


# --------------------------------------------------------------------------- revoke


def test_revoke_by_serial_updates_registry_and_signed_crl(own_fed: FederationPKI) -> None:
    target = own_fed.clinics["clinic-b"].serial
    number_before = _crl(own_fed.ca_dir).extensions.get_extension_for_class(x509.CRLNumber)
    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)

    assert pki.revoke(own_fed.ca_dir, serial=target, now=when) == [target]

    crl = _crl(own_fed.ca_dir)
    ca = pki.load_certificate(own_fed.ca_cert)
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert [r.serial_number for r in crl] == [target]
    entry = crl.get_revoked_certificate_by_serial_number(target)
    assert entry is not None and entry.revocation_date_utc == when
    number_after = crl.extensions.get_extension_for_class(x509.CRLNumber)
    assert number_after.value.crl_number == number_before.value.crl_number + 1
    assert _mode(own_fed.ca_dir / "crl.pem") == 0o644

    rec = next(r for r in pki.list_issued(own_fed.ca_dir) if r.serial == target)
    assert rec.revoked and rec.revoked_at == when
    assert rec.status(datetime.now(UTC)) == "revoked"
    # Idempotent: a second revocation changes nothing.
    assert pki.revoke(own_fed.ca_dir, serial=target) == []
    assert [r.serial_number for r in _crl(own_fed.ca_dir)] == [target]


def test_revoke_by_name_revokes_every_certificate_of_that_peer(own_fed: FederationPKI) -> None:
    rotated = pki.issue(
        own_fed.ca_dir, "clinic", "clinic-c", own_fed.clinics["clinic-c"].cert.parent, replace=True
    )
    pki.revoke(own_fed.ca_dir, serial=own_fed.clinics["clinic-a"].serial)

    revoked = pki.revoke(own_fed.ca_dir, name="clinic-c")

    assert sorted(revoked) == sorted([own_fed.clinics["clinic-c"].serial, rotated.serial])
    listed = {r.serial_number for r in _crl(own_fed.ca_dir)}
    assert listed == {own_fed.clinics["clinic-a"].serial, *revoked}


def test_revoke_refuses_unknown_or_ambiguous_requests(own_fed: FederationPKI) -> None:
    with pytest.raises(pki.PkiError, match="no certificate with serial 0x1234"):
        pki.revoke(own_fed.ca_dir, serial=0x1234)
    with pytest.raises(pki.PkiError, match="no certificate was issued for 'nobody'"):
        pki.revoke(own_fed.ca_dir, name="nobody")
    with pytest.raises(pki.PkiError, match="exactly one"):
        pki.revoke(own_fed.ca_dir)
    with pytest.raises(pki.PkiError, match="exactly one"):
        pki.revoke(own_fed.ca_dir, serial=own_fed.clinics["clinic-a"].serial, name="clinic-a")
    assert len(_crl(own_fed.ca_dir)) == 0


def test_parse_serial_accepts_list_output_forms() -> None:
    assert pki.parse_serial("0xAB:cd") == 0xABCD
    assert pki.parse_serial(pki.format_serial(2**127 + 5)) == 2**127 + 5
    with pytest.raises(pki.PkiError, match="hexadecimal"):
        pki.parse_serial("xyz")


# --------------------------------------------------------------------------- signatures


def test_peer_signature_accepts_the_named_peer(fed: FederationPKI) -> None:
    now = datetime.now(UTC)
    key = pki.load_private_key(fed.clinics["clinic-a"].key)
    cert = pki.load_certificate(fed.clinics["clinic-a"].cert)
    ca = pki.load_certificate(fed.ca_cert)
    data = b"testfed|round 7|clinic-a|pk1|pk2"
    signature = pki.sign(key, data)
    pki.verify_peer_signature(
        cert, ca, data, signature, expected_uri="spiffe://testfed/clinic/clinic-a", now=now
    )


def test_peer_signature_rejects_every_forgery(fed: FederationPKI) -> None:
    now = datetime.now(UTC)
    uri = "spiffe://testfed/clinic/clinic-a"
    ca = pki.load_certificate(fed.ca_cert)
    cert_a = pki.load_certificate(fed.clinics["clinic-a"].cert)
    key_a = pki.load_private_key(fed.clinics["clinic-a"].key)
    key_b = pki.load_private_key(fed.clinics["clinic-b"].key)
    foreign_cert = pki.load_certificate(fed.foreign_clinic.cert)
    foreign_key = pki.load_private_key(fed.foreign_clinic.key)
    data = b"advertisement"
    good = pki.sign(key_a, data)

    cases = {
        "wrong key": (cert_a, ca, data, pki.sign(key_b, data), uri, now),
        "wrong uri": (cert_a, ca, data, good, "spiffe://testfed/clinic/clinic-b", now),
        # Same federation name and clinic name, but another CA.
        "foreign CA": (foreign_cert, ca, data, pki.sign(foreign_key, data), uri, now),
        "tampered data": (cert_a, ca, data + b"!", good, uri, now),
        "after expiry": (cert_a, ca, data, good, uri, now + timedelta(days=400)),
        "before validity": (cert_a, ca, data, good, uri, now - timedelta(days=1)),
        "garbage signature": (cert_a, ca, data, b"\x30\x00", uri, now),
        "CA as peer": (ca, ca, data, good, "spiffe://testfed", now),
    }
    for label, (cert, ca_cert, payload, sig, expected, when) in cases.items():
        # One error class for every cause, so callers cannot mishandle a subset.
        try:
            pki.verify_peer_signature(cert, ca_cert, payload, sig, expected_uri=expected, now=when)
        except pki.PeerVerificationError:
            continue
        pytest.fail(f"forgery accepted: {label}")


def test_load_private_key_rejects_non_keys(tmp_path: Path) -> None:
    (tmp_path / "x.key").write_text("not a key")
    with pytest.raises(pki.PkiError, match="is not a PEM private key"):
        pki.load_private_key(tmp_path / "x.key")
    with pytest.raises(pki.PkiError, match="cannot read"):
        pki.load_private_key(tmp_path / "missing.key")


# --------------------------------------------------------------------------- CLI


def _cli(*argv: str) -> int:
    root = argparse.ArgumentParser(prog="dermafed")
    sub = root.add_subparsers(dest="command", required=True)
    cli_pki.register(sub)
    args = root.parse_args(list(argv))
    return int(args.func(args))


def test_cli_full_lifecycle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca"
    assert _cli("pki", "init", "--federation", "eu-derm", "--out", str(ca)) == 0
    assert "eu-derm" in capsys.readouterr().out

    issue_agg = f"pki issue --role aggregator --name agg --dns agg.example --ip 10.0.0.1 --out {ca}"
    assert _cli(*issue_agg.split()) == 0
    out = capsys.readouterr().out
    assert "spiffe://eu-derm/aggregator/agg" in out
    assert _mode(ca / "agg.key") == 0o600

    issue_graz = f"pki issue --role clinic --name graz --ca {ca} --out {tmp_path}/graz --days 30"
    assert _cli(*issue_graz.split()) == 0
    capsys.readouterr()
    assert (tmp_path / "graz" / "graz.crt").is_file()
    assert (tmp_path / "graz" / "ca.crt").read_bytes() == (ca / "ca.crt").read_bytes()

    # Issuing again into the same folder is refused; renew rotates and revokes the old one.
    assert _cli(*issue_graz.split()) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    renew_graz = f"pki renew --role clinic --name graz --ca {ca} --out {tmp_path}/graz"
    assert _cli(*renew_graz.split()) == 0
    renewed = capsys.readouterr().out
    assert "renewed clinic certificate for 'graz'" in renewed and "revoked:" in renewed

    assert _cli("pki", "list", "--ca", str(ca)) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["SERIAL", "ROLE", "NAME", "NOT", "AFTER", "STATUS"]
    assert [line.split()[1:3] for line in table[1:]] == [
        ["aggregator", "agg"],
        ["clinic", "graz"],
        ["clinic", "graz"],
    ]
    # One valid certificate per peer: the renewed one; the old one is revoked.
    assert [line.split()[-1] for line in table[1:]] == ["valid", "revoked", "valid"]

    assert _cli("pki", "list", "--ca", str(ca), "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    graz = next(r for r in rows if r["name"] == "graz" and r["status"] == "valid")
    assert graz["uri"] == "spiffe://eu-derm/clinic/graz" and graz["status"] == "valid"

    assert _cli("pki", "revoke", "--ca", str(ca), "--serial", "0x" + graz["serial"]) == 0
    assert f"revoked serial {graz['serial']}" in capsys.readouterr().out
    assert _cli("pki", "revoke", "--ca", str(ca), "--name", "graz") == 0
    assert "already revoked" in capsys.readouterr().out
    assert _cli("pki", "revoke", "--ca", str(ca), "--name", "agg") == 0
    capsys.readouterr()

    assert _cli("pki", "list", "--ca", str(ca), "--json") == 0
    assert [r["status"] for r in json.loads(capsys.readouterr().out)] == ["revoked"] * 3
    assert {r.serial_number for r in _crl(ca)} == {int(r["serial"], 16) for r in rows}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ("pki init --federation Bad_Name --out {tmp}/x", "invalid federation name"),
        ("pki init --federation fed --out {tmp}/ca", "already exists"),
        ("pki issue --role clinic --name c --out {tmp}/nowhere", "pki init"),
        ("pki issue --role clinic --name c --ip 1.2.3 --ca {tmp}/ca --out {tmp}/c", "invalid IP"),
        ("pki issue --role clinic --name C --ca {tmp}/ca --out {tmp}/c", "invalid clinic name"),
        ("pki issue --role clinic --name c --days -3 --ca {tmp}/ca --out {tmp}/c", "positive"),
        ("pki revoke --ca {tmp}/ca --serial beef", "no certificate with serial 0xbeef"),
        ("pki revoke --ca {tmp}/ca --serial zz", "invalid serial"),
        ("pki revoke --ca {tmp}/ca --name ghost", "no certificate was issued for 'ghost'"),
        ("pki list --ca {tmp}/empty", "no certificate registry"),
    ],
)
def test_cli_user_errors_exit_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: str, message: str
) -> None:
    pki.init_ca("fed", tmp_path / "ca")
    (tmp_path / "empty").mkdir()
    code = _cli(*(a.replace("{tmp}", str(tmp_path)) for a in argv.split()))
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("dermafed pki: error: ")
    assert message in captured.err
    assert "Traceback" not in captured.err


def test_cli_argument_errors_are_argparse_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _cli("pki", "revoke", "--ca", "x", "--serial", "1", "--name", "y")
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_csr_enrolment_keeps_the_key_at_the_clinic(own_fed: FederationPKI, tmp_path: Path) -> None:
    clinic_dir, ca_out = tmp_path / "at-clinic", tmp_path / "from-ca"
    key, csr = pki.request(own_fed.federation, "clinic", "clinic-graz", clinic_dir)
    assert _mode(key) == 0o600
    issued = pki.sign_request(own_fed.ca_dir, csr, ca_out, role="clinic", name="clinic-graz")
    assert not list(ca_out.glob("*.key")), "the CA side never holds the clinic's key"
    cert = pki.load_certificate(issued.cert_path)
    assert pki.uri_sans(cert) == [f"spiffe://{own_fed.federation}/clinic/clinic-graz"]
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert cert.public_key().public_bytes(*spki) == pki.load_private_key(
        key
    ).public_key().public_bytes(*spki)
    cert.verify_directly_issued_by(pki.load_certificate(own_fed.ca_cert))
    assert issued.serial in {r.serial for r in pki.list_issued(own_fed.ca_dir)}
    with pytest.raises(pki.PkiError, match="refusing to overwrite a key"):
        pki.request(own_fed.federation, "clinic", "clinic-graz", clinic_dir)


def test_sign_refuses_requests_for_another_identity_or_federation(
    own_fed: FederationPKI, tmp_path: Path
) -> None:
    _, csr = pki.request(own_fed.federation, "admin", "mallory", tmp_path / "m")
    # The operator means to certify a clinic; the request asks for an admin.
    with pytest.raises(pki.PkiError, match=r"asks for .*admin/mallory, not .*clinic/mallory"):
        pki.sign_request(own_fed.ca_dir, csr, tmp_path / "o", role="clinic", name="mallory")
    _, foreign = pki.request("otherfed", "clinic", "c1", tmp_path / "f")
    with pytest.raises(pki.PkiError, match="spiffe://otherfed/clinic/c1"):
        pki.sign_request(own_fed.ca_dir, foreign, tmp_path / "o", role="clinic", name="c1")
    # A request whose signature does not match its key (edited after signing).
    tampered = tmp_path / "t.csr"
    pem = csr.read_bytes()
    der = x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)
    broken = bytearray(der)
    broken[-5] ^= 0x01
    tampered.write_bytes(
        b"-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bytes(broken))
        + b"-----END CERTIFICATE REQUEST-----\n"
    )
    with pytest.raises(pki.PkiError, match=r"signature does not verify|not a PEM"):
        pki.sign_request(own_fed.ca_dir, tampered, tmp_path / "o", role="admin", name="mallory")
    assert (
        _cli(
            "pki",
            "sign",
            "--ca",
            str(own_fed.ca_dir),
            "--csr",
            str(tmp_path / "nope.csr"),
            "--role",
            "clinic",
            "--name",
            "x",
            "--out",
            str(tmp_path / "o"),
        )
        == 2
    )


def test_an_encrypted_ca_key_signs_only_with_its_passphrase(tmp_path: Path, monkeypatch) -> None:
    secret = b"correct horse battery staple"
    ca = tmp_path / "ca"
    pki.init_ca("fed", ca, passphrase=secret)
    assert b"ENCRYPTED PRIVATE KEY" in (ca / "ca.key").read_bytes()
    with pytest.raises(pki.PkiError, match="is encrypted: set DERMAFED_CA_PASSPHRASE"):
        pki.issue(ca, "clinic", "c1", tmp_path / "c1")
    with pytest.raises(pki.PkiError, match="wrong passphrase"):
        pki.issue(ca, "clinic", "c1", tmp_path / "c1", passphrase=b"nope nope nope")
    issued = pki.issue(ca, "clinic", "c1", tmp_path / "c1", passphrase=secret)
    assert pki.revoke(ca, serial=issued.serial, passphrase=secret) == [issued.serial]

    # The CLI takes it from the environment (no terminal here) and says how when missing.
    monkeypatch.delenv("DERMAFED_CA_PASSPHRASE", raising=False)
    assert (
        _cli(
            "pki",
            "issue",
            "--role",
            "clinic",
            "--name",
            "c2",
            "--ca",
            str(ca),
            "--out",
            str(tmp_path / "c2"),
        )
        == 2
    )
    monkeypatch.setenv("DERMAFED_CA_PASSPHRASE", secret.decode())
    assert (
        _cli(
            "pki",
            "issue",
            "--role",
            "clinic",
            "--name",
            "c2",
            "--ca",
            str(ca),
            "--out",
            str(tmp_path / "c2"),
        )
        == 0
    )
    monkeypatch.setenv("DERMAFED_CA_PASSPHRASE", "short")
    assert (
        _cli("pki", "init", "--federation", "f2", "--out", str(tmp_path / "ca2"), "--encrypt") == 2
    )
