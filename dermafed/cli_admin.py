"""``dermafed admin``: drive a running federation with an admin certificate.

Human-readable tables by default, ``--json`` for scripts. Every action is authorised by
the admin role in the certificate named in the admin config, and audited in the ledger.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from dermafed.admin_client import AdminClient, load_admin_config
from dermafed.v1 import admin_pb2


def register(sub: argparse._SubParsersAction) -> None:
    admin = sub.add_parser("admin", help="operate a running aggregator (admin certificate)")
    admin.add_argument("--config", required=True, help="admin TOML file")
    admin.add_argument("--json", action="store_true", help="machine-readable output")
    actions = admin.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("status", help="federation and round status").set_defaults(
        func=_run(_status)
    )
    rounds = actions.add_parser("rounds", help="recent rounds, newest first")
    rounds.add_argument("--limit", type=int, default=20)
    rounds.set_defaults(func=_run(_rounds))
    gate = actions.add_parser(
        "gate", help="the evidence behind one round's gate decision (counts, bounds, p-values)"
    )
    gate.add_argument("round", type=int, help="the round's number, as 'rounds' shows it")
    gate.set_defaults(func=_run(_gate))
    ckpts = actions.add_parser("checkpoints", help="stored checkpoints")
    ckpts.add_argument("--limit", type=int, default=20)
    ckpts.set_defaults(func=_run(_checkpoints))
    actions.add_parser("clinics", help="clinics and their participation").set_defaults(
        func=_run(_clinics)
    )
    actions.add_parser("trigger", help="start a round now").set_defaults(func=_run(_trigger))
    abort = actions.add_parser("abort", help="abort the running round")
    abort.add_argument("round", type=int, help="the running round's number")
    abort.add_argument("--reason", default="")
    abort.set_defaults(func=_run(_abort))
    rollback = actions.add_parser("rollback", help="publish an earlier checkpoint again")
    target = rollback.add_mutually_exclusive_group(required=True)
    target.add_argument("--round", type=int, help="roll back to the checkpoint of this round")
    target.add_argument("--checkpoint", help="roll back to this checkpoint id")
    rollback.add_argument("--reason", default="")
    rollback.set_defaults(func=_run(_rollback))
    actions.add_parser("reload-revocations", help="re-read the CRL now").set_defaults(
        func=_run(_reload)
    )
    ack = actions.add_parser(
        "ack-privacy-reset",
        help="accept that a clinic's spent epsilon went down (its privacy ledger was reset)",
    )
    ack.add_argument("clinic", help="the clinic id, as 'clinics' shows it")
    ack.add_argument("--reason", required=True, help="why; recorded in the audit log")
    ack.set_defaults(func=_run(_ack_privacy_reset))
    for verb, excluded, text in (
        ("exclude", True, "take a clinic out of the federation (no cohort, polls refused)"),
        ("include", False, "bring an excluded clinic back"),
    ):
        member = actions.add_parser(verb, help=text)
        member.add_argument("clinic", help="the clinic id, as 'clinics' shows it")
        member.add_argument("--reason", required=True, help="why; recorded in the audit log")
        member.set_defaults(func=_run(_set_excluded(excluded)))
    audit = actions.add_parser("audit", help="the audit log: who did what, newest first")
    audit.add_argument("--limit", type=int, default=50)
    audit.set_defaults(func=_run(_audit))
    # `--json` also after the action (`admin rounds --json`); SUPPRESS keeps the value given
    # before the action when it is not repeated after it.
    for action_parser in actions.choices.values():
        action_parser.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
        )


class UsageError(Exception):
    """A bad command-line value, reported with exit code 2 before any call is made."""


def _non_negative(value: int | None, what: str) -> None:
    if value is not None and value < 0:
        raise UsageError(f"{what} must be >= 0, got {value}")


def _run(
    action: Callable[[AdminClient, argparse.Namespace], Message | None],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        client = AdminClient(load_admin_config(Path(args.config)))
        try:
            response = action(client, args)
        except UsageError as exc:
            print(f"dermafed admin: {exc}", file=sys.stderr)
            return 2
        except grpc.RpcError as exc:
            print(f"dermafed admin: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        finally:
            client.close()
        if args.json and response is not None:
            print(
                json.dumps(
                    MessageToDict(
                        response,
                        preserving_proto_field_name=True,
                        always_print_fields_with_no_presence=True,
                    ),
                    indent=2,
                    sort_keys=True,
                )
            )
        elif response is not None:
            _print_human(args.action, response)
        return 0

    return run


def _status(c: AdminClient, a: argparse.Namespace) -> Message:
    return c.status()


def _audit(c: AdminClient, a: argparse.Namespace) -> Message:
    _non_negative(a.limit, "--limit")
    return c.audit(limit=a.limit)


def _rounds(c: AdminClient, a: argparse.Namespace) -> Message:
    _non_negative(a.limit, "--limit")
    return c.rounds(limit=a.limit)


def _gate(c: AdminClient, a: argparse.Namespace) -> Message:
    if a.round < 1:
        raise UsageError(f"the round must be >= 1, got {a.round}")
    # The newest round before round + 1: that round itself, however old (listing the
    # rounds and searching would miss any beyond the server's 1,000-row page).
    found = c.rounds(limit=1, before=a.round + 1).rounds
    if found and found[0].round == a.round:
        return found[0]
    raise UsageError(f"no round {a.round} in the ledger (see 'rounds')")


def _checkpoints(c: AdminClient, a: argparse.Namespace) -> Message:
    _non_negative(a.limit, "--limit")
    return c.checkpoints(limit=a.limit)


def _clinics(c: AdminClient, a: argparse.Namespace) -> Message:
    return c.clinics()


def _trigger(c: AdminClient, a: argparse.Namespace) -> Message:
    return c.trigger()


def _abort(c: AdminClient, a: argparse.Namespace) -> Message:
    if a.round < 1:
        raise UsageError(f"the round to abort must be >= 1, got {a.round}")
    return c.abort(a.round, a.reason)


def _rollback(c: AdminClient, a: argparse.Namespace) -> Message:
    _non_negative(a.round, "--round")
    checkpoint = a.checkpoint
    if checkpoint is not None:
        checkpoint = resolve_prefix(
            checkpoint, [i.id for i in c.checkpoints(limit=1000).checkpoints]
        )
    return c.rollback(round_number=a.round, checkpoint=checkpoint, reason=a.reason)


def resolve_prefix(prefix: str, ids: list[str]) -> str:
    """The one id that starts with ``prefix`` (what the tables show is enough to type back)."""
    text = prefix.strip().lower()
    if len(text) < 4:
        raise UsageError(f"give at least 4 characters of the checkpoint id, got {prefix!r}")
    matches = sorted({i for i in ids if i.startswith(text)})
    if len(matches) == 1:
        return matches[0]
    if not matches:
        if len(text) == 64:
            return text  # older than the listing: let the server decide
        raise UsageError(f"no checkpoint id starts with {prefix!r} (see 'checkpoints')")
    shown = ", ".join(m[:16] for m in matches[:5])
    raise UsageError(
        f"{prefix!r} matches {len(matches)} checkpoints ({shown}); give more characters"
    )


def _reload(c: AdminClient, a: argparse.Namespace) -> Message:
    return c.reload_revocations()


def _ack_privacy_reset(c: AdminClient, a: argparse.Namespace) -> Message:
    if not a.reason.strip():
        raise UsageError("--reason must say why the reset is accepted (it is audited)")
    return c.ack_privacy_reset(a.clinic, a.reason)


def _set_excluded(excluded: bool) -> Callable[[AdminClient, argparse.Namespace], Message]:
    def action(c: AdminClient, a: argparse.Namespace) -> Message:
        if not a.reason.strip():
            raise UsageError("--reason must say why (it is audited)")
        return c.set_clinic_excluded(a.clinic, excluded, a.reason)

    return action


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _num(value: float, spec: str = ".3f") -> str:
    return format(value, spec)


LAST_COLUMN_WIDTH = 60


def _table(headers: list[str], rows: list[list[Any]]) -> None:
    """Columns padded to their widest cell; the last one (a reason) wraps instead of being
    cut, its continuation lines indented under it."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    widths[-1] = min(widths[-1], LAST_COLUMN_WIDTH)
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    indent = sum(w + 2 for w in widths[:-1])
    for row in cells:
        last = textwrap.wrap(row[-1], LAST_COLUMN_WIDTH) or [""]
        head = [c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)]
        print("  ".join([*head, last[0]]).rstrip())
        for more in last[1:]:
            print(" " * indent + more)


def _round_row(r: admin_pb2.RoundSummary) -> list[Any]:
    m = r.metrics
    seconds = (r.finished_at - r.started_at) if r.finished_at else 0.0
    return [
        r.round,
        r.outcome or r.state,
        r.gate or "-",
        f"{len(r.contributors)}/{len(r.cohort)}",
        _num(m.balanced_accuracy) if m.examples else "-",
        _num(m.sensitivity["mel"]) if m.examples and "mel" in m.sensitivity else "-",
        f"{seconds:.1f}",
        r.checkpoint[:12] or "-",
        r.reason,
    ]


def _duration(seconds: float) -> str:
    """'45s', '12m 05s', '3h 02m': what an operator reads at a glance."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def _print_gate(r: admin_pb2.RoundSummary) -> None:
    print(f"round {r.round}: {r.outcome or r.state}")
    if r.sum_check_failed:
        print(f"sum check          {r.sum_check_failed} failed: {r.reason}")
        return
    if not r.gate:
        print("gate               no decision recorded (running, aborted, or no held-out set)")
        return
    print(f"gate               {r.gate} by rule '{r.gate_rule or 'tolerance'}'")
    for i, line in enumerate(textwrap.wrap(r.gate_reason, 70) or [""]):
        print(("reason             " if i == 0 else " " * 19) + line)
    if r.federated_cases:
        print(
            f"evidence           the held-out set + {r.federated_cases} cases from "
            f"{r.federated_contributors} clinics' slices (secure federated evaluation)"
        )
    elif r.federated_note:
        print(f"evidence           the held-out set only ({r.federated_note})")
    tests = sorted(r.gate_checks, key=lambda g: (g.name == "balanced_accuracy", g.name))
    if not tests:
        return
    print()
    _table(
        [
            "test",
            "cases",
            "published",
            "candidate",
            "only pub",
            "only cand",
            "change",
            "bounds",
            "p",
            "alpha",
            "result",
        ],
        [
            [
                g.name,
                g.cases or "-",
                "-" if math.isnan(g.published) else _num(g.published),
                _num(g.candidate),
                g.published_only if g.cases else "-",
                g.candidate_only if g.cases else "-",
                "-" if math.isnan(g.difference) else f"{g.difference:+.3f}",
                "-" if math.isnan(g.lower) else f"[{g.lower:+.3f}, {g.upper:+.3f}]",
                "-" if math.isnan(g.p_value) else f"{g.p_value:.2g}",
                "-" if math.isnan(g.alpha) else f"{g.alpha:.3g}",
                "FAIL" if g.failed else "ok",
            ]
            for g in tests
        ],
    )


def _print_human(action: str, resp: Message) -> None:
    if isinstance(resp, admin_pb2.RoundSummary):
        _print_gate(resp)
        return
    if isinstance(resp, admin_pb2.GetStatusResponse):
        print(f"federation         {resp.federation}")
        print(
            f"published          round {resp.published_round}, checkpoint "
            f"{resp.published_checkpoint[:16]}"
        )
        finished = f"rounds finished    {resp.rounds_completed}"
        if resp.max_rounds and resp.rounds_completed >= resp.max_rounds:
            # Rounds an admin triggers run past max_rounds, so the count can exceed it.
            finished += f" (max_rounds {resp.max_rounds} reached; more only by 'trigger')"
        elif resp.max_rounds:
            finished += f" of max_rounds {resp.max_rounds}"
        print(finished)
        print(f"connected clinics  {', '.join(resp.connected_clinics) or '-'}")
        if resp.HasField("next_round_at"):
            wait = resp.next_round_at - time.time()
            print(
                f"next round due     {_when(resp.next_round_at)}"
                + (f" (in {_duration(wait)})" if wait > 0 else " (once enough clinics connect)")
            )
        if resp.HasField("current_round"):
            cur = resp.current_round
            print(
                f"running            round {cur.round} in stage {cur.state}; cohort "
                f"{', '.join(cur.cohort)}"
            )
        if resp.HasField("last_round"):
            last = resp.last_round
            print(
                f"last round         {last.round}: {last.outcome}"
                + (f" ({last.reason})" if last.reason else "")
            )
    elif isinstance(resp, admin_pb2.ListRoundsResponse):
        _table(
            [
                "round",
                "outcome",
                "gate",
                "clinics",
                "bal.acc",
                "mel",
                "seconds",
                "checkpoint",
                "reason",
            ],
            [_round_row(r) for r in resp.rounds],
        )
    elif isinstance(resp, admin_pb2.ListCheckpointsResponse):
        _table(
            ["checkpoint", "round", "published", "bal.acc", "mel", "created"],
            [
                [
                    c.id[:16],
                    c.round,
                    "yes (now)" if c.published else ("before" if c.was_published else "no"),
                    _num(c.metrics.balanced_accuracy) if c.metrics.examples else "-",
                    _num(c.metrics.sensitivity["mel"])
                    if c.metrics.examples and "mel" in c.metrics.sensitivity
                    else "-",
                    _when(c.created_at),
                ]
                for c in resp.checkpoints
            ],
        )
    elif isinstance(resp, admin_pb2.ListAuditResponse):
        _table(
            ["when", "actor", "action", "detail"],
            [[_when(e.at), e.actor, e.action, e.detail_json] for e in resp.entries],
        )
        if not resp.entries:
            print("no admin action recorded yet")
    elif isinstance(resp, admin_pb2.ListClinicsResponse):
        _table(
            [
                "clinic",
                "connected",
                "last seen",
                "rounds",
                "declines",
                "dropouts",
                "epsilon spent",
                "epsilon left",
                "privacy",
                "membership",
            ],
            [
                [
                    c.clinic,
                    "yes" if c.connected else "no",
                    _when(c.last_seen),
                    c.rounds_contributed,
                    c.declines,
                    c.dropouts,
                    _num(c.epsilon_spent, ".2f") if c.HasField("epsilon_spent") else "-",
                    _num(c.epsilon_remaining, ".2f") if c.HasField("epsilon_remaining") else "-",
                    (f"RESET (was {_num(c.epsilon_floor, '.2f')})" if c.privacy_reset else "ok"),
                    f"EXCLUDED: {c.excluded_reason}" if c.excluded else "member",
                ]
                for c in resp.clinics
            ],
        )
    elif isinstance(resp, admin_pb2.TriggerRoundResponse):
        print(resp.detail)
    elif isinstance(resp, admin_pb2.AbortRoundResponse):
        print(f"round {resp.round} aborted")
    elif isinstance(resp, admin_pb2.RollbackResponse):
        if resp.changed:
            print(
                f"published checkpoint {resp.checkpoint[:16]} (round {resp.round}) again; "
                "the next round starts from it"
            )
        else:
            print(f"checkpoint {resp.checkpoint[:16]} (round {resp.round}) is already published")
    elif isinstance(resp, admin_pb2.AcknowledgePrivacyResetResponse):
        print(
            f"privacy reset acknowledged: epsilon floor {resp.previous_floor:.2f} -> "
            f"{resp.new_floor:.2f}; the clinic is served again"
        )
    elif isinstance(resp, admin_pb2.SetClinicExcludedResponse):
        if action == "exclude":
            print("clinic excluded: it is in no cohort and its polls are refused until 'include'")
        else:
            print("clinic included again: it joins cohorts from its next poll")
    elif isinstance(resp, admin_pb2.ReloadRevocationsResponse):
        print(f"revocation list reloaded: {resp.revoked} revoked serial(s)")
