"""``dermafed config check``: will this daemon start, and keep its state, where it is deployed?

Operators changed `state_dir` to paths the shipped systemd units cannot write
(`ProtectSystem=strict` makes everything read-only but the unit's own directories), and
then to a fresh directory to make the daemon start, which silently reset a clinic's
privacy ledger. This check reads the config the daemon would read and tells, before any
start, whether the state directory is one the unit may write, and whether the TLS files
load and belong to this federation and role.

Each check returns findings; the CLI prints one line per finding and exits 1 on any
problem. Nothing here writes anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from common.errors import DermafedError
from common.identity import own_identity
from common.pki import load_certificate, load_private_key

# systemd's per-unit directories and where they live for a system service.
_UNIT_DIRECTORIES = {
    "StateDirectory": "/var/lib",
    "CacheDirectory": "/var/cache",
    "LogsDirectory": "/var/log",
    "RuntimeDirectory": "/run",
}


@dataclass(frozen=True)
class Finding:
    ok: bool
    text: str

    def line(self) -> str:
        return f"{'ok     ' if self.ok else 'PROBLEM'}  {self.text}"


def writable_paths(unit_text: str, instance: str = "") -> tuple[bool, list[PurePosixPath]]:
    """(whether the unit makes the file system read-only, the paths it may write).

    ``%i`` is replaced by ``instance`` (a template unit's instance name). Without
    ``ProtectSystem=strict`` the unit restricts nothing this check can reason about.
    """
    # Repeated keys (ReadWritePaths= twice) are legal in units: keep every value.
    values: dict[str, list[str]] = {}
    section = ""
    for raw in unit_text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service" and "=" in line:
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip().replace("%i", instance))
    strict = any(v == "strict" for v in values.get("ProtectSystem", []))
    paths: list[PurePosixPath] = []
    for key, base in _UNIT_DIRECTORIES.items():
        for value in values.get(key, []):
            paths += [PurePosixPath(base) / d for d in value.split()]
    for value in values.get("ReadWritePaths", []):
        paths += [PurePosixPath(p.lstrip("-+")) for p in value.split()]
    return strict, paths


def check_state_dir(state_dir: Path, unit_text: str, unit_name: str, instance: str = "") -> Finding:
    strict, paths = writable_paths(unit_text, instance)
    if not strict:
        return Finding(
            True, f"state_dir {state_dir}: {unit_name} does not make the system read-only"
        )
    target = PurePosixPath(str(state_dir))
    if not target.is_absolute():
        return Finding(
            False,
            f"state_dir {state_dir} is relative; under {unit_name} give an absolute path "
            f"inside {', '.join(map(str, paths)) or 'a writable directory'}",
        )
    for allowed in paths:
        if target == allowed or allowed in target.parents:
            return Finding(True, f"state_dir {state_dir} is writable under {unit_name} ({allowed})")
    return Finding(
        False,
        f"state_dir {state_dir} is read-only under {unit_name} (ProtectSystem=strict); "
        f"use {paths[0] if paths else 'a path in ReadWritePaths='}",
    )


def check_tls(
    ca_cert: Path, cert: Path, key: Path, federation: str, role: str, now: datetime | None = None
) -> list[Finding]:
    """The certificate loads, chains to the CA, names this federation and role, and the key
    is its key."""
    now = now or datetime.now(UTC)
    try:
        ca = load_certificate(ca_cert)
        leaf = load_certificate(cert)
        private = load_private_key(key)
    except (DermafedError, OSError, ValueError) as exc:
        return [Finding(False, f"TLS files: {exc}")]
    findings = []
    try:
        leaf.verify_directly_issued_by(ca)
        findings.append(Finding(True, f"{cert} is signed by {ca_cert}"))
    except (ValueError, TypeError, InvalidSignature):
        findings.append(Finding(False, f"{cert} is not signed by the CA in {ca_cert}"))
    try:
        identity = own_identity(leaf, federation, role, str(cert))
    except DermafedError as exc:
        findings.append(Finding(False, str(exc)))
    else:
        findings.append(Finding(True, f"{cert} is {identity.uri}"))
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if leaf.public_key().public_bytes(*spki) != private.public_key().public_bytes(*spki):
        findings.append(Finding(False, f"{key} is not the key of {cert}"))
    if not leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc:
        findings.append(
            Finding(False, f"{cert} is not valid now (until {leaf.not_valid_after_utc:%Y-%m-%d})")
        )
    else:
        days = (leaf.not_valid_after_utc - now).days
        findings.append(Finding(days >= 14, f"{cert} expires in {days} day(s)"))
    return findings


def check_readable(path: Path | None, what: str) -> Finding | None:
    if path is None or not str(path):
        return None
    if path.exists():
        return Finding(True, f"{what} {path} exists")
    return Finding(False, f"{what} {path} does not exist")
