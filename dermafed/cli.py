"""``dermafed``: one command line for every role.

Each role's subcommands live in their own module with a ``register(subparsers)``
function; this file only wires them together and turns domain errors into a clear
message and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.build_info import version
from common.errors import DermafedError
from dermafed.runtime_versions import installed_mismatch


def _add_daemon_commands(sub: argparse._SubParsersAction) -> None:
    agg = sub.add_parser("aggregator", help="run the aggregator service")
    agg_sub = agg.add_subparsers(dest="action", required=True)
    serve = agg_sub.add_parser("serve", help="serve the federation until SIGTERM")
    serve.add_argument("--config", required=True, help="aggregator TOML file")
    serve.add_argument(
        "--no-gate",
        action="store_true",
        help="start even though the validation gate is off (no held-out set, or gate = false): "
        "every candidate is then published unchecked",
    )
    serve.set_defaults(func=_aggregator_serve)
    _add_backup_commands(agg_sub, "aggregator", "the ledger and its checkpoints")

    agent = sub.add_parser("agent", help="run a clinic agent")
    agent_sub = agent.add_subparsers(dest="action", required=True)
    run = agent_sub.add_parser("run", help="poll the aggregator and train when asked")
    run.add_argument("--config", required=True, help="clinic TOML file")
    run.set_defaults(func=_agent_run)
    privacy = agent_sub.add_parser(
        "privacy", help="the clinic's spent differential-privacy budget, round by round"
    )
    privacy.add_argument("--config", required=True, help="clinic TOML file")
    privacy.add_argument("--json", action="store_true")
    privacy.set_defaults(func=_agent_privacy)
    _add_backup_commands(agent_sub, "agent", "the clinic's privacy ledger")


def _add_backup_commands(sub: argparse._SubParsersAction, role: str, what: str) -> None:
    config = "aggregator TOML file" if role == "aggregator" else "clinic TOML file"
    backup = sub.add_parser(
        "backup", help=f"copy {what} to a new folder (consistent while the {role} runs)"
    )
    backup.add_argument("--config", required=True, help=config)
    backup.add_argument("--out", required=True, type=Path, help="a new, empty folder")
    backup.set_defaults(func=_backup, role=role)
    restore = sub.add_parser(
        "restore", help=f"put back {what} from a backup (never rolls privacy state back)"
    )
    restore.add_argument("--config", required=True, help=config)
    restore.add_argument("--from", dest="source", required=True, type=Path, help="backup folder")
    restore.set_defaults(func=_restore, role=role)


def _backup_target(args: argparse.Namespace) -> tuple[Any, Any]:
    """The role's backup module and the storage section of its config."""
    if args.role == "aggregator":
        from aggregator import backup as agg_backup
        from aggregator.config import load_aggregator_config

        return agg_backup, load_aggregator_config(args.config).storage
    from clinic_agent import backup as agent_backup
    from clinic_agent.config import load_clinic_config

    return agent_backup, load_clinic_config(args.config).storage


def _backup_contents(role: str, manifest: dict[str, Any]) -> str:
    if role == "aggregator":
        return (
            f"the ledger (round {manifest['last_round']}) and "
            f"{len(manifest['checkpoints'])} checkpoint(s)"
        )
    return (
        f"the privacy ledger ({manifest['entries']} charged round(s), "
        f"epsilon {manifest['epsilon_spent']:.3f})"
    )


def _backup(args: argparse.Namespace) -> int:
    module, storage = _backup_target(args)
    manifest = module.backup(storage, args.out)
    print(f"backed up {_backup_contents(args.role, manifest)} to {args.out}")
    return 0


def _restore(args: argparse.Namespace) -> int:
    module, storage = _backup_target(args)
    manifest = module.restore(storage, args.source)
    print(f"restored {_backup_contents(args.role, manifest)} from {args.source}")
    return 0


def _aggregator_serve(args: argparse.Namespace) -> int:
    from aggregator.config import gate_off_reason, load_aggregator_config
    from aggregator.server import serve_forever
    from common.logs import setup_logging

    config = load_aggregator_config(Path(args.config))
    off = gate_off_reason(config)
    if off is not None and not args.no_gate:
        # A federation without its gate publishes whatever a round produces; that must be
        # a decision the operator states, not the silent result of a missing setting.
        print(
            f"dermafed aggregator: the validation gate is off ({off}), so every candidate "
            "would be published unchecked; configure a held-out set (README: Validation "
            "gate and rollback) or start with --no-gate to accept that",
            file=sys.stderr,
        )
        return 2
    setup_logging(config.logging.level, json_lines=config.logging.json)
    if off is not None:
        logging.getLogger("dermafed.aggregator").warning(
            "the validation gate is off (%s; --no-gate): every candidate is published "
            "unchecked, only the checks on the unmasked sum apply",
            off,
        )
    return serve_forever(config)


def _agent_run(args: argparse.Namespace) -> int:
    from clinic_agent.config import load_clinic_config
    from clinic_agent.service import run_agent_forever
    from common.logs import setup_logging

    config = load_clinic_config(Path(args.config))
    setup_logging(config.logging.level, json_lines=config.logging.json)
    return run_agent_forever(config)


def _agent_privacy(args: argparse.Namespace) -> int:
    from clinic_agent.privacy_cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    from dermafed import cli_admin, cli_config, cli_data, cli_demo, cli_pki, cli_report

    parser = argparse.ArgumentParser(
        prog="dermafed",
        description="Federated skin-lesion classification with secure aggregation, "
        "differential privacy and a validation gate.",
    )
    parser.add_argument("--version", action="version", version=f"dermafed {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cli_demo.register(sub)
    cli_pki.register(sub)
    _add_daemon_commands(sub)
    cli_admin.register(sub)
    cli_config.register(sub)
    cli_data.register(sub)
    cli_report.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Before build_parser: the admin commands import the generated stubs, which would
    # refuse an old grpcio with a traceback.
    problem = installed_mismatch()
    if problem is not None:
        print(f"dermafed: error: {problem}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DermafedError as exc:
        print(f"dermafed: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`dermafed admin rounds | head`): not an error of ours. Point
        # stdout at /dev/null so the interpreter's final flush does not fail again.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
