#!/usr/bin/env python
"""Record-level differential privacy at every clinic: what each ε budget costs in quality and time.

    python benchmarks/privacy.py            # default: 4 rows on the full pool, ~10 min on 2 cores
    python benchmarks/privacy.py --quick    # smoke run, about a minute
    python benchmarks/privacy.py --json out.json

One process, the project's real code paths (setup reused from ``benchmarks/quality.py``):

1. ``../shared/data/ham10000_200x150`` is split by lesion: the test lesions (20%,
   stratified by class) are held out first; the training pool is the rest (or a
   lesion-grouped, class-stratified subset of it with ``--train-fraction``).
2. The pool is split into 4 clinics with Dirichlet(0.5) label skew (whole lesions).
3. Every row trains the DP recipe's model (``efficientnet_lite0_head``: the public
   ImageNet EfficientNet-Lite0 trunk as a fixed feature extractor and a linear head, see
   ``common/model.py``) with the same budget: ``rounds x local_epochs`` passes of every
   clinic over its data, the same optimiser, learning-rate schedule and batch size. Per
   round each clinic trains from the global weights, either

   * ``ε < ∞``: ``clinic_agent.dp_training.train_dp`` (Opacus DP-SGD: Poisson sampling at
     q = B/n, per-example clipping to ``--max-grad-norm``, Gaussian noise, the public
     HAM10000 prior as a logit adjustment at strength ``DP_LOGIT_ADJUSTMENT``). Each
     clinic's noise multiplier is chosen so that its *total* ε over all rounds equals the
     row's target at δ = 1e-5 (Opacus ``get_noise_multiplier``, RDP accountant), and the
     composed ε of the mechanisms that actually ran is checked with
     ``clinic_agent.privacy.epsilon_for``;
   * ``ε = ∞``: ``clinic_agent.training.train_local`` (plain minibatch training, the
     public prior as a logit adjustment at strength 1);

   then clips its whole delta to the plan's clip norm (``common.clipping.clip_l2``); the
   clipped deltas go through a real secure-aggregation round (``SecAggClient`` x 4 against
   ``SecAggServer``) and the global model moves by their unweighted mean.
   The front end's features of every image are computed once
   (``common.features.FeatureCache``), as the agent does across rounds.
4. Each row is evaluated on the test lesions (``common.evaluation.compute_metrics``):
   balanced accuracy, accuracy, macro AUROC, melanoma sensitivity.
5. Training throughput is measured in the same run, interleaved: DP-SGD against plain
   training of the same model on the same clinic data and batch size (the features
   already cached, as in every round after the first), the one-time cost of the
   features, and plain training of the non-private recipe (``lesionres``, end to end
   with augmentation) for scale. With ``--compare-lesionres`` the ε = 8 row is also run
   with the end-to-end ``lesionres`` model, to show what DP-SGD does to it.

Aggregation weights are uniform (a plain mean of the clipped deltas) and no training loss
is sent: under DP the clinic's loss on its private data must not leave it.

Nothing here is a test: numbers are measured and reported, including missed goals.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for _path in (REPO, HERE):  # runnable as a plain script from any directory
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402

# benchmarks/ is a folder of scripts, not a package (and site-packages has an unrelated
# ``benchmarks``), so quality.py is imported by its module name from this folder.
from quality import (  # noqa: E402
    ClinicData,
    Recipe,
    SecureAggregation,
    clinic_seed,
    default_data_dir,
    evaluate_state,
    lesion_subset,
    load_set,
    test_summary,
)

from aggregator.schedule import round_learning_rate  # noqa: E402
from clinic_agent.dp_training import train_dp  # noqa: E402
from clinic_agent.privacy import MechanismStep, epsilon_for, round_mechanism  # noqa: E402
from clinic_agent.training import (  # noqa: E402
    DP_LOGIT_ADJUSTMENT,
    compute_delta,
    torch_threads,
    train_local,
)
from common.architectures import ARCHITECTURES  # noqa: E402
from common.clipping import clip_l2  # noqa: E402
from common.datasets import (  # noqa: E402
    CLASSES,
    ImageCache,
    Record,
    class_counts,
    group_split,
    labels_of,
    load_records,
    public_logit_offsets,
)
from common.features import FeatureCache  # noqa: E402
from common.model import (  # noqa: E402
    DP_ARCH,
    RECIPE_PLANS,
    build_model,
    frontend_of,
    initial_state,
    parameter_count,
)
from common.partition import dirichlet_partition  # noqa: E402
from common.secagg.messages import plan_quantization  # noqa: E402
from common.tensors import flatten, specs_of, unflatten  # noqa: E402

DELTA = 1e-5
# Goals from the issue.
GOAL_EPSILON = 8.0
GOAL_FRACTION_OF_NONPRIVATE_BA = 0.85
GOAL_MAX_DP_SLOWDOWN = 3.0
TABLE_COLUMNS = (
    "model",
    "eps_target",
    "eps_achieved",
    "noise_multiplier",
    "bal_acc",
    "acc",
    "macro_auroc",
    "mel_sens",
    "pct_nonprivate_BA",
    "train_ex_per_s",
    "wall_s",
)


@dataclass(frozen=True)
class Settings:
    """Everything a row depends on, identical for every row."""

    recipe: Recipe
    rounds: int
    max_grad_norm: float
    delta: float = DELTA


@dataclass
class RowOutcome:
    arch: str
    epsilon_target: float
    epsilon_achieved: float  # composed over all rounds, max over clinics; inf for non-private
    epsilon_per_clinic: list[float]
    noise_multipliers: list[float]  # per clinic; empty for non-private
    test: dict[str, Any]
    wall_seconds: float
    train_seconds: float
    aggregation_seconds: float
    examples_processed: int
    empty_batches: int = 0
    delta_norms: list[float] = field(default_factory=list)
    # Headline test metrics of every repetition of this row (DP noise is drawn from OS
    # entropy, so repetitions differ); ``test`` is the first repetition's full report.
    runs: list[dict[str, float]] = field(default_factory=list)

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon_target)

    def mean(self, metric: str) -> float:
        values = [r[metric] for r in self.runs] if self.runs else [self.test[metric]]
        return float(np.mean(values))

    def spread(self, metric: str) -> float:
        """Sample standard deviation over repetitions (0 for a single run)."""
        values = [r[metric] for r in self.runs]
        return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    @property
    def train_examples_per_second(self) -> float:
        return self.examples_processed / self.train_seconds if self.train_seconds > 0 else math.inf


# --------------------------------------------------------------------------- accounting


def noise_for_budget(
    epsilon: float, delta: float, n: int, batch_size: int, local_epochs: int, rounds: int
) -> tuple[float, MechanismStep]:
    """(σ, one round's mechanism) so that ``rounds`` rounds compose to ``epsilon`` at ``delta``.

    Opacus's search stops within its tolerance *below* the target; the composed ε is then
    re-checked with the project's own accountant wrapper and σ nudged up if it ever lands
    above (it should not: both use the same RDP analysis).
    """
    if batch_size > n:
        raise ValueError(
            f"batch size {batch_size} exceeds a clinic's {n} examples; lower --batch-size"
        )
    probe = round_mechanism(n, batch_size, local_epochs, 1.0)
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": the bound could be tighter, never looser.
        warnings.simplefilter("ignore")
        sigma = float(
            get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=probe.sample_rate,
                steps=rounds * probe.steps,
                accountant="rdp",
            )
        )
    for _ in range(20):
        mechanism = round_mechanism(n, batch_size, local_epochs, sigma)
        if epsilon_for([mechanism] * rounds, delta) <= epsilon:
            return sigma, mechanism
        sigma *= 1.01
    raise RuntimeError(f"could not find a noise multiplier for ε={epsilon:g} on n={n}")


# --------------------------------------------------------------------------- one row


def run_privacy_row(
    epsilon: float,
    settings: Settings,
    clinics: Sequence[ClinicData],
    test: ClinicData,
    *,
    secure: SecureAggregation,
    seed: int,
    threads: int,
    log: Callable[[str], None],
    features: FeatureCache,
    recipe: Recipe | None = None,
) -> RowOutcome:
    """One row: ``rounds`` federated rounds at ``epsilon`` (inf: non-private).

    ``recipe`` overrides the settings' model (the lesionres comparison row); everything
    else — rounds, batch size, optimiser, schedule, clips, δ — is the settings'.
    """
    recipe = recipe or settings.recipe
    model_cfg = recipe.model_config()
    state = initial_state(model_cfg, seed)
    names = list(state)
    specs = specs_of(state)
    quant = plan_quantization(
        recipe.clip_norm, len(clinics), weight_max=recipe.weight_max, loss_max=recipe.loss_max
    )
    offsets = public_logit_offsets(DP_LOGIT_ADJUSTMENT)
    private = math.isfinite(epsilon)
    mechanisms: list[MechanismStep] = []
    sigmas: list[float] = []
    if private:
        for c in clinics:
            sigma, mech = noise_for_budget(
                epsilon,
                settings.delta,
                len(c),
                recipe.batch_size,
                recipe.local_epochs,
                settings.rounds,
            )
            sigmas.append(sigma)
            mechanisms.append(mech)
    ran: list[list[MechanismStep]] = [[] for _ in clinics]  # what actually ran, per clinic
    norms: list[float] = []
    train_s = agg_s = 0.0
    processed = empty = 0
    started = time.perf_counter()
    for r in range(settings.rounds):
        lr = round_learning_rate(
            recipe.learning_rate,
            r,
            settings.rounds,
            schedule=recipe.lr_schedule,
            min_factor=recipe.lr_min_factor,
        )
        contributions: dict[str, tuple[np.ndarray, float, float]] = {}
        for i, clinic in enumerate(clinics):
            cfg = recipe.train_config(
                learning_rate=lr, fedprox_mu=0.0, seed=clinic_seed(seed, i, r)
            )
            t0 = time.perf_counter()
            if private:
                dp = train_dp(
                    model_cfg,
                    state,
                    clinic.images,
                    clinic.labels,
                    cfg,
                    mechanisms[i],
                    max_grad_norm=settings.max_grad_norm,
                    logit_offsets=offsets,
                    threads=threads,
                    features=features,
                )
                ran[i].append(dp.mechanism)
                empty += dp.empty_batches
                new_state = dp.state
            else:
                new_state = train_local(
                    model_cfg,
                    state,
                    clinic.images,
                    clinic.labels,
                    cfg,
                    threads=threads,
                    features=features,
                ).state
            train_s += time.perf_counter() - t0
            processed += recipe.local_epochs * len(clinic)
            clipped, norm = clip_l2(flatten(compute_delta(new_state, state)), recipe.clip_norm)
            norms.append(norm)
            # Uniform weight, no loss: the clinic's loss on private data must not leave it.
            contributions[clinic.name] = (clipped.astype(np.float32), 1.0, 0.0)
        t0 = time.perf_counter()
        aggregate = secure.aggregate(r + 1, contributions, quant)
        global_vec = flatten(state) + aggregate.delta
        restored = unflatten(global_vec, specs)
        state = {k: restored[k].clone() for k in names}
        agg_s += time.perf_counter() - t0
        log(
            f"  {recipe.arch} ε={epsilon:g} round {r + 1}/{settings.rounds} lr {lr:.2e} "
            f"|delta| median {np.median(norms[-len(clinics) :]):.2f}"
        )
    wall = time.perf_counter() - started
    per_clinic = [epsilon_for(h, settings.delta) if h else math.inf for h in ran]
    metrics = evaluate_state(model_cfg, state, test, features)
    return RowOutcome(
        arch=recipe.arch,
        epsilon_target=epsilon,
        epsilon_achieved=max(per_clinic),
        epsilon_per_clinic=per_clinic,
        noise_multipliers=sigmas,
        test=test_summary(metrics),
        wall_seconds=wall,
        train_seconds=train_s,
        aggregation_seconds=agg_s,
        examples_processed=processed,
        empty_batches=empty,
        delta_norms=norms,
    )


# --------------------------------------------------------------------------- throughput


def measure_dp_throughput(
    settings: Settings,
    data: ClinicData,
    sigma: float,
    *,
    examples: int,
    repeats: int,
    threads: int,
    seed: int,
) -> dict[str, float]:
    """Training examples/s of ``train_dp`` vs ``train_local``: same data, batch size, model.

    One local epoch each, interleaved ``repeats`` times on the shared machine; the best
    run of each counts (the least disturbed by other work). For a model with a fixed
    front end the features are computed once beforehand, as in every round after a
    clinic's first, and their one-time cost is reported on its own
    (``features_images_per_s``). ``lesionres_plain_examples_per_s`` is plain end-to-end
    training of the non-private recipe's model on the same images, for scale.
    """
    recipe = settings.recipe
    model_cfg = recipe.model_config()
    n = min(examples, len(data))
    images = np.ascontiguousarray(data.images[:n])
    labels = data.labels[:n]
    state = initial_state(model_cfg, seed)
    cfg = replace(
        recipe.train_config(learning_rate=recipe.learning_rate, fedprox_mu=0.0, seed=seed),
        epochs=1,
    )
    mechanism = round_mechanism(n, recipe.batch_size, 1, sigma)
    offsets = public_logit_offsets(DP_LOGIT_ADJUSTMENT)
    out: dict[str, float] = {}
    features = FeatureCache()
    frontend = frontend_of(build_model(model_cfg))
    if frontend is not None:
        # Timed as the agent pays it: hashing each image and computing its features,
        # which also fills the cache for the training runs below.
        with torch_threads(threads):
            t0 = time.perf_counter()
            features.features(model_cfg, images)
            out["features_images_per_s"] = n / (time.perf_counter() - t0)
    # Untimed warm-up of both trainers on a couple of batches.
    warm = min(n, 2 * recipe.batch_size)
    train_local(
        model_cfg, state, images[:warm], labels[:warm], cfg, threads=threads, features=features
    )
    train_dp(
        model_cfg,
        state,
        images[:warm],
        labels[:warm],
        cfg,
        round_mechanism(warm, recipe.batch_size, 1, sigma),
        max_grad_norm=settings.max_grad_norm,
        threads=threads,
        features=features,
    )
    end_to_end = replace(Recipe(), input_size=recipe.input_size).model_config()
    e2e_state = initial_state(end_to_end, seed)
    e2e_cfg = replace(
        Recipe().train_config(learning_rate=2e-3, fedprox_mu=0.0, seed=seed),
        epochs=1,
        batch_size=recipe.batch_size,
    )
    plain: list[float] = []
    private: list[float] = []
    e2e: list[float] = []
    for _ in range(repeats):
        plain.append(
            train_local(
                model_cfg, state, images, labels, cfg, threads=threads, features=features
            ).examples_per_second
        )
        private.append(
            train_dp(
                model_cfg,
                state,
                images,
                labels,
                cfg,
                mechanism,
                max_grad_norm=settings.max_grad_norm,
                logit_offsets=offsets,
                threads=threads,
                features=features,
            ).examples_per_second
        )
        if frontend is not None:
            e2e.append(
                train_local(
                    end_to_end, e2e_state, images, labels, e2e_cfg, threads=threads
                ).examples_per_second
            )
    best_plain, best_dp = max(plain), max(private)
    out.update(
        {
            "plain_examples_per_s": best_plain,
            "dp_examples_per_s": best_dp,
            "dp_slowdown_x": best_plain / best_dp,
            "examples": n,
            "repeats": repeats,
            "batch_size": recipe.batch_size,
            "noise_multiplier": sigma,
        }
    )
    if e2e:
        out["lesionres_plain_examples_per_s"] = max(e2e)
    return out


# --------------------------------------------------------------------------- report


def fmt_target(e: float) -> str:
    return "inf" if math.isinf(e) else f"{e:g}"


def fmt_eps(e: float) -> str:
    return "inf" if math.isinf(e) else f"{e:.3f}"


HEADLINE = ("balanced_accuracy", "accuracy", "macro_auroc", "mel_sensitivity")


def headline(test: dict[str, Any]) -> dict[str, float]:
    return {k: float(test[k]) for k in HEADLINE}


def fmt_metric(o: RowOutcome, metric: str) -> str:
    if len(o.runs) > 1:
        return f"{o.mean(metric):.3f} ± {o.spread(metric):.3f}"
    return f"{o.mean(metric):.3f}"


def table_rows(outcomes: Sequence[RowOutcome]) -> list[dict[str, str]]:
    rows = []
    for o in outcomes:
        # Each model against its own non-private row (a baseline model has its own).
        baseline = next((b for b in outcomes if not b.private and b.arch == o.arch), None)
        base_ba = baseline.mean("balanced_accuracy") if baseline is not None else 0.0
        pct = f"{100 * o.mean('balanced_accuracy') / base_ba:.0f}%" if base_ba > 0 else "n/a"
        rows.append(
            {
                "model": o.arch,
                "eps_target": fmt_target(o.epsilon_target),
                "eps_achieved": fmt_eps(o.epsilon_achieved),
                "noise_multiplier": (
                    "/".join(f"{s:.2f}" for s in o.noise_multipliers) if o.private else "—"
                ),
                "bal_acc": fmt_metric(o, "balanced_accuracy"),
                "acc": fmt_metric(o, "accuracy"),
                "macro_auroc": fmt_metric(o, "macro_auroc"),
                "mel_sens": fmt_metric(o, "mel_sensitivity"),
                "pct_nonprivate_BA": pct,
                "train_ex_per_s": f"{o.train_examples_per_second:.1f}",
                "wall_s": f"{o.wall_seconds:.0f}",
            }
        )
    return rows


def render_table(outcomes: Sequence[RowOutcome]) -> str:
    lines = [
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + "---|" * len(TABLE_COLUMNS),
    ]
    for row in table_rows(outcomes):
        lines.append("| " + " | ".join(row[c] for c in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def goals(outcomes: Sequence[RowOutcome], throughput: dict[str, float]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    baseline = next((o for o in outcomes if not o.private), None)
    at_goal = next(
        (
            o
            for o in outcomes
            if o.epsilon_target == GOAL_EPSILON and baseline is not None and o.arch == baseline.arch
        ),
        None,
    )
    if baseline is not None and at_goal is not None:
        need = GOAL_FRACTION_OF_NONPRIVATE_BA * baseline.mean("balanced_accuracy")
        got = at_goal.mean("balanced_accuracy")
        out.append(
            {
                "goal": f"ε={GOAL_EPSILON:g} keeps ≥ {GOAL_FRACTION_OF_NONPRIVATE_BA:.0%} of "
                "non-private balanced accuracy",
                "value": got / baseline.mean("balanced_accuracy")
                if baseline.mean("balanced_accuracy") > 0
                else math.nan,
                "met": bool(got >= need),
            }
        )
        chance = 1.0 / len(CLASSES)
        if baseline.mean("balanced_accuracy") <= chance + 0.01:
            out[-1]["note"] = (
                "non-private row is at chance balanced accuracy: the comparison is vacuous"
            )
    if throughput:
        out.append(
            {
                "goal": f"DP-SGD costs ≤ {GOAL_MAX_DP_SLOWDOWN:g}x non-private training time",
                "value": throughput["dp_slowdown_x"],
                "met": bool(throughput["dp_slowdown_x"] <= GOAL_MAX_DP_SLOWDOWN),
            }
        )
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=default_data_dir(), help="HAM10000 folder")
    p.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench-out" / "privacy",
        help="decoded-image cache and table.md (default bench-out/privacy)",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="default <out>/cache")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="smoke run: small subset, 3 rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--clinics", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew (default 0.5)")
    p.add_argument("--epsilons", default="1,3,8,inf", help="ε targets; inf = non-private")
    p.add_argument("--delta", type=float, default=DELTA)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--local-epochs", type=int, default=None)
    p.add_argument(
        "--train-fraction",
        type=float,
        default=None,
        help="lesion-grouped, class-stratified share of the training pool used",
    )
    p.add_argument(
        "--train-images",
        type=int,
        default=None,
        help="about this many training images (overrides --train-fraction)",
    )
    p.add_argument(
        "--test-images",
        type=int,
        default=None,
        help="about this many test images (lesion-grouped subset of the test split)",
    )
    p.add_argument("--arch", default=None, help=f"model (default {DP_RECIPE.arch})")
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="DP-SGD per-example clip")
    p.add_argument("--clip-norm", type=float, default=None, help="whole-delta clip norm")
    p.add_argument("--min-per-clinic", type=int, default=20)
    p.add_argument("--throughput-examples", type=int, default=None)
    p.add_argument("--throughput-repeats", type=int, default=None)
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of each DP row (fresh noise each; mean ± sd reported)",
    )
    p.add_argument("--no-throughput", action="store_true", help="skip the throughput measurement")
    p.add_argument(
        "--baseline",
        action="append",
        choices=ARCHITECTURES,
        help="also run this model at ε=8 and without DP, trained like the recipe (repeatable; "
        "e.g. scatternet, the former DP recipe)",
    )
    p.add_argument(
        "--features-file",
        type=Path,
        default=None,
        help="keep the front end's features in this .npz across runs (computed once)",
    )
    p.add_argument(
        "--compare-lesionres",
        action="store_true",
        help="also run the ε=8 row with the end-to-end lesionres model",
    )
    return p.parse_args(argv)


# The DP recipe (what `dermafed demo` trains with DP on): the ImageNet EfficientNet-Lite0
# trunk as a fixed feature extractor and a linear head (common/model.py,
# "efficientnet_lite0_head"), Adam at 0.1 with batches of 512 for 30 rounds of one local
# epoch (RECIPE_PLANS says what else was tried). The former recipe, "scatternet" at 0.02
# with batches of 64, runs beside it with --baseline scatternet (at the same input size).
DP_RECIPE = replace(
    Recipe(),
    arch=DP_ARCH,
    class_prior="public",
    learning_rate=RECIPE_PLANS[DP_ARCH].learning_rate,
    batch_size=RECIPE_PLANS[DP_ARCH].batch_size,
    input_size=RECIPE_PLANS[DP_ARCH].input_size,
    clip_norm=10.0,
)
DP_ROUNDS = 30


def build_settings(args: argparse.Namespace) -> Settings:
    recipe = DP_RECIPE
    rounds, local_epochs = DP_ROUNDS, 1
    if args.quick:
        rounds = 3
        recipe = replace(recipe, batch_size=16)  # the quick run's smallest clinic is ~40
    overrides = {
        "arch": args.arch,
        "input_size": args.input_size,
        "width": args.width,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "clip_norm": args.clip_norm,
    }
    recipe = replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    rounds = args.rounds if args.rounds is not None else rounds
    local_epochs = args.local_epochs if args.local_epochs is not None else local_epochs
    recipe = replace(recipe, local_epochs=local_epochs, epochs=rounds * local_epochs)
    if rounds < 1 or local_epochs < 1:
        raise ValueError("--rounds and --local-epochs must be >= 1")
    if args.repeats < 1:
        raise ValueError("--repeats must be >= 1")
    if not (math.isfinite(args.max_grad_norm) and args.max_grad_norm > 0):
        raise ValueError("--max-grad-norm must be > 0")
    recipe.model_config()  # validate before spending any time
    recipe.train_config(learning_rate=recipe.learning_rate, fedprox_mu=0.0, seed=0).validate()
    return Settings(
        recipe=recipe, rounds=rounds, max_grad_norm=args.max_grad_norm, delta=args.delta
    )


def lesionres_recipe(settings: Settings) -> Recipe:
    """The end-to-end comparison model, trained exactly like the DP recipe otherwise."""
    return replace(settings.recipe, arch="lesionres", width=24, dropout=0.1)


def subset(
    records: Sequence[Record], fraction: float | None, count: int | None, seed: int
) -> list[Record]:
    if count is not None:
        fraction = min(1.0, count / max(len(records), 1))
    return lesion_subset(records, 1.0 if fraction is None else fraction, seed)


def parse_epsilons(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(not v > 0 for v in values):
        raise ValueError(f"--epsilons: need positive values or inf, got {text!r}")
    # The non-private row first: every other row is reported as a share of it.
    return sorted(values, key=lambda e: (math.isfinite(e), e))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = build_settings(args)
        epsilons = parse_epsilons(args.epsilons)
    except ValueError as exc:
        print(f"privacy: {exc}", file=sys.stderr)
        return 2
    recipe = settings.recipe
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    started = time.perf_counter()
    if not (args.data / "HAM10000_metadata.csv").is_file():
        print(
            f"privacy: no HAM10000 data at {args.data} (set --data or DERMAFED_HAM10000)",
            file=sys.stderr,
        )
        return 2
    records = load_records(args.data)
    rest, test_records = group_split(records, 0.2, args.seed)
    train_fraction = args.train_fraction
    if train_fraction is None:
        train_fraction = 0.1 if args.quick else 1.0
    test_fraction = 0.3 if args.quick and args.test_images is None else None
    train = subset(rest, train_fraction, args.train_images, args.seed + 2)
    test_records = subset(test_records, test_fraction, args.test_images, args.seed + 4)
    subset_note = (
        f"training on a lesion-grouped, class-stratified subset: {len(train)} of {len(rest)} "
        f"pool images"
        if len(train) < len(rest)
        else f"training on the full pool ({len(rest)})"
    )
    log(
        f"data: {len(records)} images; {subset_note}; test {len(test_records)} images "
        f"(lesion-disjoint, held out before partitioning)"
    )
    log(f"test class counts {dict(zip(CLASSES, class_counts(test_records).tolist(), strict=True))}")

    cache = ImageCache(args.cache_dir or out / "cache")
    size = recipe.input_size
    tag = f"s{args.seed}-{size}px-{len(train)}-{len(test_records)}"
    t0 = time.perf_counter()
    test = load_set(cache, f"{tag}-test", test_records, size)
    clinic_names = [f"clinic-{i + 1}" for i in range(args.clinics)]
    min_per = min(args.min_per_clinic, max(1, len(train) // (2 * args.clinics)))
    shards = dirichlet_partition(train, args.clinics, args.alpha, args.seed, min_per_clinic=min_per)
    clinics = [
        # In RAM (writable): every trainer reads the same arrays; torch warns on read-only.
        ClinicData(
            name,
            np.array(cache.load(shard, size, name=f"{tag}-a{args.alpha:g}-{name}")),
            labels_of(shard),
        )
        for name, shard in zip(clinic_names, shards, strict=True)
    ]
    log(
        f"decode/cache: {time.perf_counter() - t0:.1f}s; clinics {[len(c) for c in clinics]} "
        f"(Dirichlet α={args.alpha:g})"
    )
    features = FeatureCache()
    if frontend_of(build_model(recipe.model_config())) is not None:
        # Once per image, before any row (the agent does it in its first round), so that
        # no row's training time includes it.
        t0 = time.perf_counter()
        if args.features_file is not None and args.features_file.is_file():
            log(
                f"front-end features: {features.load(args.features_file)} read from "
                f"{args.features_file}"
            )
        with torch_threads(args.threads):
            for data in (*clinics, test):
                features.features(recipe.model_config(), data.images)
        if args.features_file is not None and features.computed:
            features.save(args.features_file)
        log(
            f"front-end features: {features.computed} images in "
            f"{time.perf_counter() - t0:.1f}s, once for every row"
        )
    log(
        f"model {recipe.arch} width {recipe.width} at {size}px: "
        f"{parameter_count(build_model(recipe.model_config())):,} parameters; "
        f"{settings.rounds} rounds x {recipe.local_epochs} local epoch(s), batch "
        f"{recipe.batch_size}, {recipe.optimizer} lr {recipe.learning_rate:g} "
        f"({recipe.lr_schedule}); DP clip {settings.max_grad_norm:g}, delta clip "
        f"{recipe.clip_norm:g}; ε targets {[fmt_target(e) for e in epsilons]} at "
        f"δ={settings.delta:g}"
    )

    # Measured before the rows: it also warms up torch (the first steps of a process are
    # slow), which would otherwise be charged to whichever row runs first.
    throughput: dict[str, float] = {}
    finite_targets = [e for e in epsilons if math.isfinite(e)]
    if finite_targets and len(finite_targets) < len(epsilons) and not args.no_throughput:
        ref_eps = GOAL_EPSILON if GOAL_EPSILON in finite_targets else finite_targets[-1]
        largest = clinics[max(range(len(clinics)), key=lambda i: len(clinics[i]))]
        sigma, _ = noise_for_budget(
            ref_eps,
            settings.delta,
            len(largest),
            recipe.batch_size,
            recipe.local_epochs,
            settings.rounds,
        )
        throughput = measure_dp_throughput(
            settings,
            largest,
            sigma,
            examples=args.throughput_examples or (256 if args.quick else 512),
            repeats=args.throughput_repeats or (1 if args.quick else 2),
            threads=args.threads,
            seed=args.seed,
        )
        throughput["epsilon"] = ref_eps
        log(
            f"throughput (ε={ref_eps:g} noise on {largest.name}): plain "
            f"{throughput['plain_examples_per_s']:.1f} ex/s, DP-SGD "
            f"{throughput['dp_examples_per_s']:.1f} ex/s -> DP slowdown "
            f"{throughput['dp_slowdown_x']:.2f}x (same {int(throughput['examples'])} images, "
            f"batch {recipe.batch_size})"
        )

    workdir = Path(tempfile.mkdtemp(prefix="privacy-pki-"))
    outcomes: list[RowOutcome] = []
    try:
        secure = SecureAggregation(workdir, clinic_names)
        plan: list[tuple[float, Recipe]] = [(eps, recipe) for eps in epsilons]
        if args.compare_lesionres and recipe.arch != "lesionres":
            plan.append((GOAL_EPSILON, lesionres_recipe(settings)))
        for arch in args.baseline or ():
            # A former recipe, side by side: same data, rounds, batch, optimiser and ε.
            plan += [
                (math.inf, replace(recipe, arch=arch)),
                (GOAL_EPSILON, replace(recipe, arch=arch)),
            ]
        for eps, row_recipe in plan:
            # Non-private rows are seeded and repeat exactly; DP rows draw fresh noise.
            repeats = args.repeats if math.isfinite(eps) else 1
            outcome = run_privacy_row(
                eps,
                settings,
                clinics,
                test,
                secure=secure,
                seed=args.seed,
                threads=args.threads,
                log=log,
                features=features,
                recipe=row_recipe,
            )
            outcome.runs = [headline(outcome.test)]
            for _ in range(repeats - 1):
                again = run_privacy_row(
                    eps,
                    settings,
                    clinics,
                    test,
                    secure=secure,
                    seed=args.seed,
                    threads=args.threads,
                    log=log,
                    features=features,
                    recipe=row_recipe,
                )
                outcome.runs.append(headline(again.test))
            outcomes.append(outcome)
            t = outcome.test
            log(
                f"row {row_recipe.arch} ε={fmt_target(eps)}: achieved "
                f"{fmt_eps(outcome.epsilon_achieved)} σ "
                f"{[round(s, 3) for s in outcome.noise_multipliers]} BA "
                f"{fmt_metric(outcome, 'balanced_accuracy')} acc {t['accuracy']:.3f} AUROC "
                f"{t['macro_auroc']:.3f} mel {t['mel_sensitivity']:.3f} in "
                f"{outcome.wall_seconds:.0f}s (train {outcome.train_seconds:.0f}s, secagg "
                f"{outcome.aggregation_seconds:.1f}s)"
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    finite = [o for o in outcomes if o.private and o.arch == recipe.arch]
    plain_rows = [o for o in outcomes if not o.private and o.arch == recipe.arch]
    if throughput and finite and plain_rows:
        throughput["in_run_slowdown_x"] = plain_rows[0].train_examples_per_second / min(
            o.train_examples_per_second for o in finite
        )

    table = render_table(outcomes)
    checks = goals(outcomes, throughput)
    total = time.perf_counter() - started
    print()
    print(table)
    print()
    print(
        f"Every row: {subset_note}; {args.clinics} clinics, Dirichlet α={args.alpha:g}; "
        f"secure aggregation; {settings.rounds} rounds x {recipe.local_epochs} local "
        f"epoch(s), batch {recipe.batch_size}, {recipe.optimizer} lr "
        f"{recipe.learning_rate:g}; the public HAM10000 prior as a logit adjustment "
        f"(strength {DP_LOGIT_ADJUSTMENT:g} under DP-SGD, 1 without); δ={settings.delta:g}."
    )
    if throughput:
        print(
            f"DP-SGD throughput: {throughput['dp_examples_per_s']:.1f} vs "
            f"{throughput['plain_examples_per_s']:.1f} examples/s non-private = "
            f"{throughput['dp_slowdown_x']:.2f}x slower (in-run rows: "
            f"{throughput.get('in_run_slowdown_x', math.nan):.2f}x)"
        )
        if "features_images_per_s" in throughput:
            print(
                f"front end: {throughput['features_images_per_s']:.1f} images/s, once per "
                f"image; end-to-end lesionres (plain, with augmentation): "
                f"{throughput['lesionres_plain_examples_per_s']:.1f} examples/s"
            )
    for g in checks:
        note = f" ({g['note']})" if "note" in g else ""
        print(f"goal: {g['goal']}: {g['value']:.2f} -> {'MET' if g['met'] else 'MISSED'}{note}")
    print(f"total {total / 60:.1f} min")
    (out / "table.md").write_text(table + "\n", encoding="utf-8")

    if args.json is not None:
        report = {
            "mode": "quick" if args.quick else "default",
            "recipe": asdict(recipe),
            "rounds": settings.rounds,
            "max_grad_norm": settings.max_grad_norm,
            "delta": settings.delta,
            "clinics": [len(c) for c in clinics],
            "alpha": args.alpha,
            "train_images": len(train),
            "train_pool_images": len(rest),
            "test_images": len(test_records),
            "test_counts": class_counts(test_records).tolist(),
            "logit_offsets_dp": public_logit_offsets(DP_LOGIT_ADJUSTMENT),
            "columns": list(TABLE_COLUMNS),
            "table": table_rows(outcomes),
            "rows": [
                {**asdict(o), "train_examples_per_second": o.train_examples_per_second}
                for o in outcomes
            ],
            "throughput": throughput,
            "goals": checks,
            "total_seconds": total,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(report, indent=1, default=_json_default) + "\n", encoding="utf-8"
        )
    return 0


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    raise SystemExit(main())
