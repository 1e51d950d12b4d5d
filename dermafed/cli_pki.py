"""``dermafed pki``: create the federation CA, issue, enrol by CSR, renew, revoke and list
certificates."""

from __future__ import annotations

import argparse
import functools
import getpass
import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from common import pki

_ERROR_PREFIX = "dermafed pki: error:"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``pki`` command and its subcommands to ``subparsers``."""
    parser = subparsers.add_parser(
        "pki",
        help="manage the federation CA and mTLS certificates",
        description="Create the federation CA, issue, revoke and list certificates.",
    )
    sub = parser.add_subparsers(dest="pki_command", metavar="SUBCOMMAND", required=True)

    p_init = sub.add_parser("init", help="create the federation CA")
    p_init.add_argument("--federation", required=True, help="federation name, e.g. 'eu-derm'")
    p_init.add_argument("--out", required=True, type=Path, help="directory for the CA files")
    p_init.add_argument("--days", type=int, default=3650, help="CA validity (default 3650)")
    p_init.add_argument(
        "--encrypt",
        action="store_true",
        help="encrypt the CA key with a passphrase (asked, or from $DERMAFED_CA_PASSPHRASE)",
    )
    p_init.set_defaults(func=_cmd_init)

    p_issue = sub.add_parser("issue", help="issue a certificate for an aggregator, clinic or admin")
    _add_identity_arguments(p_issue)
    p_issue.add_argument("--out", required=True, type=Path, help="directory for cert/key")
    p_issue.add_argument(
        "--ca", type=Path, default=None, help="CA directory (default: the --out directory)"
    )
    p_issue.add_argument("--days", type=int, default=397, help="validity (default 397)")
    p_issue.set_defaults(func=_cmd_issue)

    p_request = sub.add_parser(
        "request",
        help="at the clinic: a new key and a certificate request (the key never leaves)",
    )
    p_request.add_argument("--federation", required=True)
    _add_identity_arguments(p_request)
    p_request.add_argument("--out", required=True, type=Path, help="directory for key and CSR")
    p_request.set_defaults(func=_cmd_request)

    p_sign = sub.add_parser("sign", help="at the CA: certify the key in a request")
    p_sign.add_argument("--ca", required=True, type=Path, help="CA directory")
    p_sign.add_argument("--csr", required=True, type=Path, help="the request (.csr)")
    p_sign.add_argument("--role", required=True, choices=sorted(pki.ROLES), help="must match")
    p_sign.add_argument("--name", required=True, help="must match the request's identity")
    p_sign.add_argument("--out", required=True, type=Path, help="directory for the certificate")
    p_sign.add_argument("--days", type=int, default=397, help="validity (default 397)")
    p_sign.set_defaults(func=_cmd_sign)

    p_renew = sub.add_parser(
        "renew", help="rotate a certificate: new key and certificate, the old one revoked"
    )
    p_renew.add_argument("--role", required=True, choices=sorted(pki.ROLES))
    p_renew.add_argument("--name", required=True, help="peer id, e.g. 'clinic-graz'")
    p_renew.add_argument("--out", required=True, type=Path, help="directory holding cert/key")
    p_renew.add_argument("--ca", required=True, type=Path, help="CA directory")
    p_renew.add_argument("--days", type=int, default=397, help="validity (default 397)")
    p_renew.set_defaults(func=_cmd_renew)

    p_revoke = sub.add_parser("revoke", help="revoke certificates and rewrite the CRL")
    p_revoke.add_argument("--ca", required=True, type=Path, help="CA directory")
    which = p_revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", metavar="HEX", help="serial number as shown by 'pki list'")
    which.add_argument("--name", metavar="ID", help="revoke every certificate of this peer")
    p_revoke.set_defaults(func=_cmd_revoke)

    p_list = sub.add_parser("list", help="list issued certificates")
    p_list.add_argument("--ca", required=True, type=Path, help="CA directory")
    p_list.add_argument("--json", action="store_true", help="machine-readable output")
    p_list.set_defaults(func=_cmd_list)


def _add_identity_arguments(parser: argparse.ArgumentParser) -> None:
    """--role, --name and the DNS/IP names: what a new certificate (or request) names."""
    parser.add_argument("--role", required=True, choices=sorted(pki.ROLES))
    parser.add_argument("--name", required=True, help="peer id, e.g. 'clinic-graz'")
    parser.add_argument(
        "--dns", action="append", default=[], metavar="NAME", help="DNS SAN (repeatable)"
    )
    parser.add_argument(
        "--ip", action="append", default=[], metavar="ADDR", help="IP SAN (repeatable)"
    )


def _fail(message: str) -> int:
    print(f"{_ERROR_PREFIX} {message}", file=sys.stderr)
    return 2


_Command = Callable[[argparse.Namespace], int]


def _guarded(func: _Command) -> _Command:
    """Turn user errors (bad names, missing CA, unreadable files) into exit code 2."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except pki.PkiError as exc:
            return _fail(str(exc))
        except BrokenPipeError:
            raise  # the reader went away; dermafed.cli.main handles it
        except OSError as exc:
            where = f" {exc.filename}" if exc.filename else ""
            return _fail(f"{exc.strerror or exc}{where}")

    return run


def _passphrase(ca_dir: Path | None, *, new: bool = False) -> bytes | None:
    """The CA key's passphrase: from the environment, else asked in a terminal.

    None when the key is not encrypted (or, outside a terminal, when nothing says it;
    loading the key then fails with a message that says how to give it).
    """
    env = os.environ.get(pki.PASSPHRASE_ENV)
    if not new and ca_dir is not None:
        try:
            encrypted = b"ENCRYPTED" in (ca_dir / pki.CA_KEY_FILE).read_bytes()[:64]
        except OSError:
            return None  # no CA here: the operation itself reports it
        if not encrypted:
            return None
    if env:
        secret = env
    elif sys.stdin.isatty():
        secret = getpass.getpass("CA key passphrase: ")
        if new and getpass.getpass("again: ") != secret:
            raise pki.PkiError("the passphrases differ")
    elif new:
        raise pki.PkiError(
            f"--encrypt needs a passphrase: set {pki.PASSPHRASE_ENV} or use a terminal"
        )
    else:
        return None
    if new and len(secret) < 12:
        raise pki.PkiError("use a passphrase of at least 12 characters")
    return secret.encode()


@_guarded
def _cmd_init(args: argparse.Namespace) -> int:
    passphrase = _passphrase(None, new=True) if args.encrypt else None
    cert_path = pki.init_ca(args.federation, args.out, valid_days=args.days, passphrase=passphrase)
    print(f"created CA for federation {args.federation!r}")
    print(f"  certificate: {cert_path}")
    print(f"  private key: {args.out / pki.CA_KEY_FILE}  (keep it offline; mode 0600)")
    print(f"  CRL:         {args.out / pki.CRL_FILE}")
    return 0


@_guarded
def _cmd_issue(args: argparse.Namespace) -> int:
    ca_dir = args.ca if args.ca is not None else args.out
    issued = pki.issue(
        ca_dir,
        args.role,
        args.name,
        args.out,
        dns=args.dns,
        ips=args.ip,
        valid_days=args.days,
        passphrase=_passphrase(ca_dir),
    )
    print(f"issued {issued.role} certificate for {issued.name!r}")
    _print_issued(issued)
    return 0


def _print_issued(issued: pki.IssuedCert) -> None:
    print(f"  identity:    {issued.uri}")
    print(f"  serial:      {pki.format_serial(issued.serial)}")
    print(f"  valid until: {issued.not_after.isoformat()}")
    print(f"  certificate: {issued.cert_path}")
    print(f"  private key: {issued.key_path}")


@_guarded
def _cmd_request(args: argparse.Namespace) -> int:
    key, csr = pki.request(
        args.federation, args.role, args.name, args.out, dns=args.dns, ips=args.ip
    )
    print(f"private key: {key} (mode 0600; it stays here)")
    print(f"request:     {csr} (send this to the federation's CA operator)")
    return 0


@_guarded
def _cmd_sign(args: argparse.Namespace) -> int:
    issued = pki.sign_request(
        args.ca,
        args.csr,
        args.out,
        role=args.role,
        name=args.name,
        valid_days=args.days,
        passphrase=_passphrase(args.ca),
    )
    print(f"signed {issued.role} certificate for {issued.name!r}")
    print(f"  identity:    {issued.uri}")
    print(f"  serial:      {pki.format_serial(issued.serial)}")
    print(f"  valid until: {issued.not_after.isoformat()}")
    print(f"  certificate: {issued.cert_path} (send it and ca.crt back; no key was involved)")
    return 0


@_guarded
def _cmd_renew(args: argparse.Namespace) -> int:
    issued, old = pki.renew(
        args.ca,
        args.role,
        args.name,
        args.out,
        valid_days=args.days,
        passphrase=_passphrase(args.ca),
    )
    print(f"renewed {issued.role} certificate for {issued.name!r}")
    _print_issued(issued)
    print(f"  revoked:     {pki.format_serial(old)} (the previous certificate; CRL rewritten)")
    return 0


@_guarded
def _cmd_revoke(args: argparse.Namespace) -> int:
    if args.serial is not None:
        newly = pki.revoke(
            args.ca, serial=pki.parse_serial(args.serial), passphrase=_passphrase(args.ca)
        )
    else:
        newly = pki.revoke(args.ca, name=args.name, passphrase=_passphrase(args.ca))
    if not newly:
        print("nothing to do: already revoked")
        return 0
    for serial in newly:
        print(f"revoked serial {pki.format_serial(serial)}")
    print(f"CRL updated: {args.ca / pki.CRL_FILE}")
    return 0


@_guarded
def _cmd_list(args: argparse.Namespace) -> int:
    records = pki.list_issued(args.ca)
    now = datetime.now(UTC)
    if args.json:
        rows = [
            {
                "serial": pki.format_serial(r.serial),
                "role": r.role,
                "name": r.name,
                "uri": r.uri,
                "not_before": r.not_before.isoformat(),
                "not_after": r.not_after.isoformat(),
                "revoked": r.revoked,
                "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
                "status": r.status(now),
            }
            for r in records
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if not records:
        print("no certificates issued")
        return 0
    header = ("SERIAL", "ROLE", "NAME", "NOT AFTER", "STATUS")
    table = [
        (
            pki.format_serial(r.serial),
            r.role,
            r.name,
            r.not_after.strftime("%Y-%m-%d %H:%M"),
            r.status(now),
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in (header, *table)) for i in range(len(header))]
    for row in (header, *table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0
