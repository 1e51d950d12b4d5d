"""``dermafed config check``: the daemon's config against its unit and its certificates."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from dermafed.config_check import Finding, check_readable, check_state_dir, check_tls

# Where the shipped units are installed (README "Deploying").
DEFAULT_UNITS = {
    "aggregator": Path("/etc/systemd/system/dermafed-aggregator.service"),
    "agent": Path("/etc/systemd/system/dermafed-agent@.service"),
}


def register(sub: argparse._SubParsersAction) -> None:
    config = sub.add_parser("config", help="check a daemon's configuration before starting it")
    actions = config.add_subparsers(dest="action", required=True)
    check = actions.add_parser(
        "check",
        help="validate a config: keys, TLS files and identity, state_dir writable under the unit",
    )
    check.add_argument("--role", required=True, choices=("aggregator", "agent"))
    check.add_argument("--config", required=True, type=Path, help="the daemon's TOML file")
    check.add_argument(
        "--unit",
        type=Path,
        default=None,
        help="systemd unit to check state_dir against (default: the installed dermafed unit)",
    )
    check.add_argument(
        "--instance",
        default=None,
        help="instance of the agent@ template (default: from the config name agent-NAME.toml)",
    )
    check.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    findings: list[Finding] = []
    if args.role == "aggregator":
        from aggregator.config import load_aggregator_config

        agg = load_aggregator_config(args.config)  # a bad key stops here with exit 2
        findings.append(Finding(True, f"{args.config} is a valid aggregator config"))
        state_dir = agg.storage.state_dir
        findings += check_tls(
            agg.tls.ca_cert, agg.tls.cert, agg.tls.key, agg.federation, "aggregator"
        )
        extra = [
            check_readable(agg.tls.crl, "tls.crl"),
            check_readable(agg.validation.holdout, "validation.holdout"),
        ]
    else:
        from clinic_agent.config import load_clinic_config

        clinic = load_clinic_config(args.config)
        findings.append(Finding(True, f"{args.config} is a valid clinic config"))
        state_dir = clinic.storage.state_dir
        findings += check_tls(
            clinic.tls.ca_cert, clinic.tls.cert, clinic.tls.key, clinic.federation, "clinic"
        )
        extra = [check_readable(clinic.data.path, "data.path")]
    findings += [f for f in extra if f is not None]
    unit = args.unit or DEFAULT_UNITS[args.role]
    if unit.is_file():
        instance = args.instance
        if instance is None:
            match = re.fullmatch(r"agent-(.+)\.toml", args.config.name)
            instance = match.group(1) if match else ""
        findings.append(check_state_dir(state_dir, unit.read_text(), unit.name, instance))
    elif args.unit is not None:
        findings.append(Finding(False, f"no unit file at {unit}"))
    else:
        findings.append(Finding(True, f"no unit at {unit}: state_dir not checked against systemd"))
    for finding in findings:
        print(finding.line())
    problems = sum(not f.ok for f in findings)
    print(f"{problems} problem(s)" if problems else "the configuration looks ready")
    return 1 if problems else 0
