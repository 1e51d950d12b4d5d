"""``dermafed demo``: run a whole federation locally and print a per-round table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.architectures import ARCHITECTURES


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo",
        help="run an aggregator and N clinic agents locally over mutual TLS",
        description="Builds a throwaway PKI, splits the data into a lesion-grouped held-out "
        "set and non-IID clinic shards, starts the aggregator and one agent per clinic as "
        "separate processes on free localhost ports, and prints one table row per round. "
        "Without --data it uses a small generated (synthetic, not patient) dataset.",
    )
    demo.add_argument("--clinics", type=int, default=3, help="number of clinics (default 3)")
    demo.add_argument("--rounds", type=int, default=3, help="rounds to run (default 3)")
    demo.add_argument(
        "--data",
        type=Path,
        default=None,
        help="HAM10000-layout folder, class folders or index CSV "
        "(default: generated synthetic data)",
    )
    demo.add_argument(
        "--workdir",
        type=Path,
        default=Path("dermafed-demo"),
        help="where PKI, configs, ledger, checkpoints and logs go",
    )
    demo.add_argument(
        "--alpha",
        type=float,
        default=1.0,
        help="Dirichlet label-skew concentration across clinics (default 1.0)",
    )
    demo.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    demo.add_argument(
        "--lr",
        type=float,
        default=None,
        help="base local learning rate (Adam; decays across rounds; default: "
        "the recipe's, 0.1 with DP, 0.0001 without)",
    )
    demo.add_argument(
        "--model",
        dest="arch",
        choices=ARCHITECTURES,
        default=None,
        help="model architecture (default: efficientnet_lite0_head with DP, "
        "efficientnet_lite0 without)",
    )
    demo.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="model input size in pixels (default: the recipe's, 128)",
    )
    demo.add_argument(
        "--max-images", type=int, default=0, help="use at most this many images of --data (0: all)"
    )
    demo.add_argument(
        "--aggregation",
        choices=("plain", "secure"),
        default="secure",
        help="secure (pairwise-masked, the default) or plain FedAvg",
    )
    demo.add_argument(
        "--no-dp",
        dest="dp",
        action="store_false",
        help="train without differential privacy (DP-SGD is on by default)",
    )
    demo.add_argument(
        "--epsilon-max", type=float, default=8.0, help="each clinic's privacy budget (default 8)"
    )
    demo.add_argument(
        "--no-federated-evaluation",
        dest="federated_evaluation",
        action="store_false",
        help="the gate judges on the aggregator's held-out set only (by default the clinics "
        "also score each candidate on their evaluation slices, summed securely)",
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--keep-running",
        action="store_true",
        help="after the rounds, keep the federation up for `dermafed admin`",
    )
    demo.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    # Here, not at the top: the demo pulls in PyTorch, which --help does not need.
    from dermafed.demo import DemoOptions, run_demo

    if args.clinics < 1 or args.rounds < 1:
        print("dermafed demo: --clinics and --rounds must be at least 1", file=sys.stderr)
        return 2
    if args.aggregation == "secure" and args.clinics < 2:
        print(
            "dermafed demo: secure aggregation needs at least 2 clinics "
            "(use --aggregation plain for one)",
            file=sys.stderr,
        )
        return 2
    opts = DemoOptions(
        clinics=args.clinics,
        rounds=args.rounds,
        data=args.data,
        workdir=args.workdir,
        alpha=args.alpha,
        local_epochs=args.epochs,
        learning_rate=args.lr,
        arch=args.arch,
        input_size=args.image_size,
        max_images=args.max_images,
        aggregation=args.aggregation,
        dp=args.dp,
        epsilon_max=args.epsilon_max,
        federated_evaluation=args.federated_evaluation,
        keep_running=args.keep_running,
        seed=args.seed,
    )
    rows = run_demo(opts)
    return 0 if rows and len(rows) >= args.rounds else 1
