"""``dermafed data …``, ``dermafed predict`` and ``dermafed evaluate``.

:func:`register` adds the commands to the root parser's subparsers; each sets
``func(args) -> int``. User errors (bad paths, malformed data or checkpoints) print one
line on stderr and return 2, without a traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import DermafedError

# The commands import NumPy, PyTorch and the data code when they run, so `dermafed --help`
# and every other command start without loading them.
if TYPE_CHECKING:
    import torch

    from common.model import ModelConfig

USAGE_ERROR = 2
Handler = Callable[[argparse.Namespace], int]


def _user_errors(func: Handler) -> Handler:
    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (DermafedError, ValueError) as exc:
            print(f"dermafed: error: {exc}", file=sys.stderr)
            return USAGE_ERROR
        except BrokenPipeError:
            raise  # the reader went away; dermafed.cli.main handles it
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"dermafed: error: {where}{exc.strerror or exc}", file=sys.stderr)
            return USAGE_ERROR

    return wrapper


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (or 'inf' for IID), got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


@_user_errors
def cmd_partition(args: argparse.Namespace) -> int:
    from common.partition import partition_to_dir

    result = partition_to_dir(
        Path(args.src), Path(args.out), args.clinics, args.alpha, args.seed, args.holdout
    )
    print(result.table())
    print(f"wrote {len(result.clinic_files)} clinic index file(s) to {result.out}")
    return 0


@_user_errors
def cmd_synth(args: argparse.Namespace) -> int:
    from common.datasets import CLASSES
    from common.synthetic import generate_synthetic

    out = generate_synthetic(
        Path(args.out), images_per_class=args.per_class, size=args.size, seed=args.seed
    )
    n = args.per_class * len(CLASSES)
    print(f"wrote {n} SYNTHETIC images (not patient data) to {out}")
    return 0


def _load_model_checkpoint(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from common.model import ModelConfig
    from common.tensors import load_checkpoint_file

    state, meta = load_checkpoint_file(path)
    return ModelConfig.from_metadata(meta), state


@_user_errors
def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from common.datasets import HIGH_RISK, DatasetError, ImageCache
    from common.evaluation import class_names, predict_proba

    model_cfg, state = _load_model_checkpoint(Path(args.checkpoint))
    cache = ImageCache()
    paths = [Path(p) for p in args.images]
    for p in paths:
        if not p.is_file():
            raise DatasetError(f"{p}: no such image file")
    images = np.stack([cache.load_one(p, model_cfg.input_size) for p in paths])
    probs = predict_proba(model_cfg, state, images)
    names = class_names(model_cfg.num_classes)
    top = max(1, min(args.top, len(names)))
    for path, row in zip(paths, probs, strict=True):
        print(path)
        for c in np.argsort(-row, kind="stable")[:top]:
            flag = "  (high risk)" if names[c] in HIGH_RISK else ""
            print(f"  {names[c]:<6} {row[c]:7.3f}{flag}")
    print("research use only: not a diagnosis", file=sys.stderr)
    return 0


@_user_errors
def cmd_evaluate(args: argparse.Namespace) -> int:
    from common.clinical_metrics import clinical_metrics, record_groups
    from common.datasets import labels_of
    from common.evaluation import checkpoint_predictions, compute_metrics
    from dermafed.clinical_report import check_html_target, render_text, write_html

    html = Path(args.html) if args.html else None
    if html is not None:
        check_html_target(html)  # before the slow part
    records, probs = checkpoint_predictions(Path(args.checkpoint), Path(args.data), args.size)
    labels = labels_of(records)
    report = clinical_metrics(labels, probs, record_groups(records))
    if args.json:
        # The flat keys the gate records (sensitivity by class, ...) stay as they were;
        # their values are the gate's own numbers.
        print(
            json.dumps(
                {**report.to_dict(), **compute_metrics(labels, probs).to_dict()},
                indent=2,
                sort_keys=True,
                allow_nan=False,
            )
        )
    else:
        print(render_text(report), end="")
    if html is not None:
        write_html(html, report, args.checkpoint, args.data)
        print(f"wrote {html}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` (``partition``, ``synth``), ``predict`` and ``evaluate``."""
    data = subparsers.add_parser("data", help="prepare data sets (partition, synthesize)")
    data_sub = data.add_subparsers(dest="data_command", metavar="{partition,synth}")

    def data_help(args: argparse.Namespace) -> int:
        data.print_help(sys.stderr)
        return USAGE_ERROR

    data.set_defaults(func=data_help)

    part = data_sub.add_parser(
        "partition",
        help="split a data set into non-IID clinic shards (index CSVs, images not copied)",
    )
    part.add_argument("--clinics", type=_positive_int, required=True, help="number of clinics")
    part.add_argument(
        "--alpha",
        type=_alpha,
        required=True,
        help="Dirichlet concentration: small = strong label skew, 'inf' = IID",
    )
    part.add_argument("--seed", type=int, default=0)
    part.add_argument(
        "--holdout",
        type=_fraction,
        default=0.0,
        help="fraction of lesions held out first, written as holdout.csv (default 0)",
    )
    part.add_argument("src", metavar="SRC", help="HAM10000 folder, class folders or index CSV")
    part.add_argument("out", metavar="OUT", help="output folder for clinic-<i>.csv")
    part.set_defaults(func=cmd_partition)

    synth = data_sub.add_parser("synth", help="generate a small SYNTHETIC data set")
    synth.add_argument("--out", required=True, help="output folder (HAM10000 layout)")
    synth.add_argument("--per-class", type=_positive_int, default=40, help="images per class")
    synth.add_argument("--size", type=_positive_int, default=64, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_synth)

    predict = subparsers.add_parser("predict", help="class probabilities for images")
    predict.add_argument("--checkpoint", required=True, help="safetensors checkpoint")
    predict.add_argument("--top", type=_positive_int, default=7, help="classes shown per image")
    predict.add_argument("images", metavar="IMAGE", nargs="+")
    predict.set_defaults(func=cmd_predict)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="metrics of a checkpoint on a data set",
        description="Per-class sensitivity and specificity with 95 % intervals and case "
        "counts, AUROC, calibration, the confusion matrix, and the same by sex, age band "
        "and body site where the data has that metadata.",
    )
    evaluate.add_argument("--checkpoint", required=True, help="safetensors checkpoint")
    evaluate.add_argument("--data", required=True, help="HAM10000 folder, class folders or CSV")
    evaluate.add_argument("--size", type=_positive_int, default=None, help=argparse.SUPPRESS)
    evaluate.add_argument("--json", action="store_true", help="print metrics as JSON")
    evaluate.add_argument(
        "--html", metavar="OUT.html", default=None, help="also write a standalone HTML page"
    )
    evaluate.set_defaults(func=cmd_evaluate)
