"""What secure federated evaluation adds to a round's wall time, measured side by side.

Runs the real federation twice on real HAM10000 images (``dermafed demo`` machinery: an
aggregator process and one agent process per clinic, mutual TLS, secure aggregation,
DP-SGD, the default recipe), identical except for ``validation.federated_evaluation``,
and prints per round: wall time, local training (slowest clinic), and the evaluation
session's stages (the clinics scoring the candidate and the published model on their
slices, then a second secure-aggregation session over the counts). Then the summary:

* the evaluation's share of the wall time of the rounds it ran in (the issue's target is
  at most 20 % at 10 clinics);
* the mean wall time of those rounds with evaluation against the same rounds of the run
  without it (the two federations may publish different models, so this ratio carries
  the noise of two runs; the share above is measured within one run).

Round 1 is never evaluated (its candidate is compared with the initial model, where only
the floor applies), so ``--rounds`` should be at least 3. Nothing here is asserted.

    python benchmarks/evaluation.py                 # 10 clinics, 6 rounds, both runs
    python benchmarks/evaluation.py --no-dp --rounds 4 --max-images 1500
    python benchmarks/evaluation.py --quick         # 3 clinics, 3 rounds, fewer images
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from dermafed.demo import DemoOptions, RoundRow, run_demo  # noqa: E402

HAM = Path(
    os.environ.get("DERMAFED_HAM10000", HERE.parents[1] / "shared" / "data" / "ham10000_200x150")
)


def evaluation_seconds(row: RoundRow) -> float:
    return sum(v for k, v in row.stage_seconds.items() if k.startswith("evaluate_"))


def run(opts: DemoOptions, label: str) -> list[RoundRow]:
    lines: list[str] = []
    rows = run_demo(opts, out=lines.append)
    if len(rows) < opts.rounds:
        print("\n".join(lines[-30:]))
        raise SystemExit(f"{label}: only {len(rows)} of {opts.rounds} rounds finished")
    return rows


def report(on: Sequence[RoundRow], off: Sequence[RoundRow], clinics: int) -> str:
    out = [
        f"secure federated evaluation at {clinics} clinics (wall seconds per round)",
        "",
        "round  with eval: total  training  evaluation  share  outcome    |  "
        "without: total  outcome",
    ]
    by_round = {r.round: r for r in off}
    evaluated = []
    for r in on:
        ev = evaluation_seconds(r)
        other = by_round.get(r.round)
        share = ev / r.seconds if r.seconds > 0 else 0.0
        if ev > 0:
            evaluated.append(r)
        out.append(
            f"{r.round:>5}  {r.seconds:>16.1f}  {r.stage_seconds.get('local_training', 0.0):>8.1f}"
            f"  {ev:>10.1f}  {100 * share:>4.0f}%  {r.outcome:<9}  |  "
            + (f"{other.seconds:>15.1f}  {other.outcome}" if other else "-")
        )
        out.append(f"       bal. acc {r.balanced_accuracy}; gate: {r.gate_reason[:110]}")
    out.append("")
    if not evaluated:
        out.append("no round ran a federated evaluation (raise --rounds)")
        return "\n".join(out)
    ev_total = sum(evaluation_seconds(r) for r in evaluated)
    wall = sum(r.seconds for r in evaluated)
    numbers = [r.round for r in evaluated]
    paired = [by_round[n] for n in numbers if n in by_round]
    out.append(
        f"evaluation's share of the rounds it ran in ({len(evaluated)}): "
        f"{ev_total:.1f}s of {wall:.1f}s = {100 * ev_total / wall:.1f}% (target <= 20%)"
    )
    if paired:
        mean_on = wall / len(evaluated)
        mean_off = sum(r.seconds for r in paired) / len(paired)
        out.append(
            f"the same rounds without evaluation: {mean_off:.1f}s mean against {mean_on:.1f}s "
            f"with it (x{mean_on / mean_off:.2f})"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 clinics, 3 rounds, 700 images")
    parser.add_argument("--clinics", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument(
        "--epsilon-max",
        type=float,
        default=50.0,
        help="each clinic's budget: large enough for every round (time, not privacy, is "
        "measured here)",
    )
    parser.add_argument("--max-images", type=int, default=2500)
    parser.add_argument("--data", type=Path, default=HAM)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary dir")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument(
        "--no-dp",
        dest="dp",
        action="store_false",
        help="the non-private recipe (efficientnet_lite0 fine-tuned end to end): local "
        "training costs minutes instead of seconds",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.clinics, args.rounds, args.max_images = 3, 3, 700
    if not (args.data / "HAM10000_metadata.csv").exists() and not args.data.is_file():
        raise SystemExit(f"HAM10000 not found at {args.data} (set DERMAFED_HAM10000)")
    with tempfile.TemporaryDirectory(prefix="dermafed-eval-bench-") as tmp:
        base = args.workdir or Path(tmp)
        results = {}
        for label, enabled in (("with", True), ("without", False)):
            opts = DemoOptions(
                clinics=args.clinics,
                rounds=args.rounds,
                data=args.data,
                workdir=base / label,
                alpha=0.5,
                local_epochs=args.epochs,
                max_images=args.max_images,
                federated_evaluation=enabled,
                epsilon_max=args.epsilon_max,
                dp=args.dp,
            )
            print(f"running the federation {label} federated evaluation ...", flush=True)
            results[label] = run(opts, label)
    recipe = "DP-SGD, efficientnet_lite0_head" if args.dp else "no DP, efficientnet_lite0"
    print(f"{recipe}; {args.max_images} images; {args.epochs} local epoch(s)")
    print(report(results["with"], results["without"], args.clinics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
