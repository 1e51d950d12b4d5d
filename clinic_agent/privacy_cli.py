"""``dermafed agent privacy``: what this clinic has spent, for its privacy officer."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from clinic_agent.config import load_clinic_config
from clinic_agent.privacy import MechanismStep, epsilon_for
from clinic_agent.privacy_ledger import PrivacyLedger, PrivacyLedgerError


def privacy_summary(config_path: Path) -> dict[str, Any]:
    config = load_clinic_config(config_path)
    pc = config.privacy
    path = config.storage.privacy_ledger
    summary: dict[str, Any] = {
        "ledger": str(path),
        "mechanism": {
            "mode": pc.mode,
            "noise_multiplier": pc.noise_multiplier,
            "target_epsilon_per_round": pc.target_epsilon_per_round,
            "noise_floor": pc.noise_floor,
            "max_grad_norm": pc.max_grad_norm,
            "accountant": pc.accountant,
            "delta": pc.delta,
        },
        "epsilon_max": pc.epsilon_max,
        "rounds": [],
    }
    if not path.exists() and not Path(str(path) + ".marker").exists():
        summary.update(epsilon_spent=0.0, epsilon_remaining=pc.epsilon_max, delta=pc.delta)
        return summary
    entries = PrivacyLedger(path, create=False).entries()
    delta = min((e.delta for e in entries), default=pc.delta or 0.0)
    history = []
    for e in entries:
        history.append(e.step)
        summary["rounds"].append(
            {
                "round": e.round,
                "round_id": e.round_id,
                "at": e.at,
                "noise_multiplier": e.noise_multiplier,
                "sample_rate": e.sample_rate,
                "steps": e.steps,
                "delta": e.delta,
                # ε of the history up to and including this round, at the common δ.
                "epsilon_total": epsilon_for(history, delta, pc.accountant),
            }
        )
    spent = summary["rounds"][-1]["epsilon_total"] if entries else 0.0
    summary.update(
        epsilon_spent=spent, epsilon_remaining=max(0.0, pc.epsilon_max - spent), delta=delta
    )
    # Clinic-level DP of the noised deltas (whole clinic as the unit, assuming at least t
    # honest survivors per secure round): one full-batch Gaussian step per noised round.
    noised = [
        MechanismStep(e.clinic_noise_multiplier, 1.0, 1)
        for e in entries
        if e.clinic_noise_multiplier > 0
    ]
    summary["clinic_level"] = {
        "rounds": len(noised),
        "epsilon": epsilon_for(noised, delta, pc.accountant) if noised else 0.0,
        "required_noise_multiplier": pc.clinic_noise_multiplier,
    }
    return summary


def run(args: argparse.Namespace) -> int:
    try:
        summary = privacy_summary(Path(args.config))
    except PrivacyLedgerError as exc:
        print(
            f"dermafed agent privacy: the privacy ledger failed its integrity check: {exc}\n"
            "the agent refuses to train until it is repaired",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    m = summary["mechanism"]
    print(f"privacy ledger   {summary['ledger']}")
    print(
        f"mechanism        {m['mode']}, noise multiplier {m['noise_multiplier']} "
        f"(floor {m['noise_floor']}), per-example clip {m['max_grad_norm']}, "
        f"{m['accountant'].upper()} accountant"
    )
    print(f"budget           ε_max {summary['epsilon_max']:g} at δ {summary['delta'] or 'auto'}")
    print(
        f"spent            ε {summary['epsilon_spent']:.3f}, "
        f"left {summary['epsilon_remaining']:.3f}"
    )
    cl = summary.get("clinic_level")
    if cl and cl["rounds"]:
        print(
            f"clinic level     ε {cl['epsilon']:.3f} over {cl['rounds']} noised round(s) "
            "(the clinic as a whole; needs t honest survivors per round)"
        )
    if summary["rounds"]:
        print()
        print(
            f"{'round':>5}  {'noise':>6}  {'rate':>7}  {'steps':>6}  {'delta':>8}  "
            f"{'ε total':>8}  charged at"
        )
        for r in summary["rounds"]:
            print(
                f"{r['round']:>5}  {r['noise_multiplier']:>6.3f}  {r['sample_rate']:>7.4f}  "
                f"{r['steps']:>6}  {r['delta']:>8.1e}  {r['epsilon_total']:>8.3f}  {r['at']}"
            )
    else:
        print("no rounds charged yet")
    return 0
