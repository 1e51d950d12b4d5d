"""``dermafed admin``: drive a running federation with an admin certificate."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from dermafed.admin_client import AdminClient, load_admin_config


def register(sub: argparse._SubParsersAction) -> None:
    admin = sub.add_parser("admin", help="operate a running aggregator (admin certificate)")
    admin.add_argument("--config", required=True, help="admin TOML file")
    admin.add_argument("--json", action="store_true", help="machine-readable output")
    actions = admin.add_subparsers(dest="action", required=True)
    status = actions.add_parser("status", help="federation and round status")
    status.set_defaults(func=_status)


def _status(args: argparse.Namespace) -> int:
    config = load_admin_config(Path(args.config))
    client = AdminClient(config)
    try:
        resp = client.status()
    except grpc.RpcError as exc:
        print(f"dermafed admin: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if args.json:
        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True), indent=2))
        return 0
    print(f"federation         {resp.federation}")
    print(f"published round    {resp.published_round}  checkpoint {resp.published_checkpoint[:16]}")
    print(f"rounds completed   {resp.rounds_completed}")
    print(f"connected clinics  {', '.join(resp.connected_clinics) or '-'}")
    if resp.HasField("current_round"):
        cur = resp.current_round
        print(f"running round      {cur.round} ({cur.state}), cohort {', '.join(cur.cohort)}")
    if resp.HasField("last_round"):
        last = resp.last_round
        print(f"last round         {last.round}: {last.outcome} {last.reason}".rstrip())
    return 0
