#!/usr/bin/env python
"""Does the gate say yes to honest rounds and no to poisoned ones? The v1 rule and the new
ones, side by side, on the same candidates.

    python benchmarks/gate.py --features-file /tmp/feat128.npz   # full run (README)
    python benchmarks/gate.py --quick                             # smoke run, a few minutes

One process, the project's real code paths:

1. ``../shared/data/ham10000_200x150`` is split by lesion: 20% test lesions first (the
   final report; no gate ever sees them), then the aggregator's held-out set (15% of the
   remaining lesions: what the gate scores candidates on), then 4 clinics with
   Dirichlet(0.5) label skew.
2. The model is the DP recipe (``efficientnet_lite0_head``: frozen ImageNet trunk,
   linear head; front-end features cached once; without DP at ``--nodp-lr`` 0.003 instead
   of the DP rate 0.1, which makes noise-free rounds swing between classes). Each round
   every clinic trains from the
   published model — ``train_local`` without DP, or ``train_dp`` (Opacus DP-SGD, each
   clinic's noise set for ε = 8 over all rounds at δ = 1e-5) — clips its whole delta to
   the plan's bound and the four go through a real secure-aggregation round
   (``SecAggClient`` x 4 against ``SecAggServer``) weighted by example count.
3. **Poisoned candidates**, formed every round from the same honest deltas with clinic 1
   replaced by an attacker: its delta scaled x10 and x100, sign-flipped, trained on labels
   where every high-risk lesion is called a naevus, a random direction at the clip bound,
   and an honest delta with a weight coordinate that cancels the others' (summed weight
   one quantum). An attacker's ring vector is unmasked to exactly the weighted sum it
   encodes, so these sums are formed in float64 as the unmasked sum decodes them
   (``tests/test_sum_checks.py`` sends the same attacks through a real masked round).
   Poisoned candidates are judged, never published.
4. **Evaluation slices.** Each clinic keeps a fifth of its lesions (at most 200 images,
   ``clinic_agent.eval_slice.choose_lesions``, the agent's default) out of training in
   every pipeline, so all pipelines judge the same candidates.
5. **Pipelines** judged on every candidate against the same published model: ``v1``
   (the fixed-tolerance rule, no checks on the sum: what shipped), ``harm`` (checks on
   the unmasked sum, then the paired harm test on the held-out set), ``noninferiority``
   (sum checks, then the strict paired non-inferiority test), and ``harm+fed`` /
   ``noninf+fed``: the same with the clinics' slice counts pooled into the evidence, as
   secure federated evaluation does (the counts are summed here in the clear through the
   production count vector and its checks; the secure session returns exactly that sum,
   as the tests show). The honest federation publishes what ``harm+fed`` (a secure
   federation's default) accepts; the other pipelines run federations of their own, to
   report the balanced accuracy each reaches on the test lesions after the same number
   of rounds.

Honest false-reject rates count the rounds after the first (against the initial model
only the balanced-accuracy floor applies, and every rule accepts). Whether a candidate was
*really* worse is judged on the test lesions, which no gate sees: the same paired harm
test run there ("worse on test"). A rejected honest candidate that the test split does not
find worse is a false reject; an accepted poisoned one that it finds worse got through.

Nothing here is a test: the numbers are measured and printed, including missed targets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for _path in (REPO, HERE):  # runnable as a plain script from any directory
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from privacy import DP_RECIPE, noise_for_budget, subset  # noqa: E402
from quality import (  # noqa: E402
    ClinicData,
    Recipe,
    SecureAggregation,
    clinic_seed,
    default_data_dir,
    load_set,
)

from aggregator.fedavg import AggregateResult  # noqa: E402
from aggregator.federated_evaluation import evidence_of  # noqa: E402
from aggregator.gate import GateSettings, PairedEvidence, decide  # noqa: E402
from aggregator.schedule import round_learning_rate  # noqa: E402
from aggregator.sum_checks import SumBounds, SumCheckError, check_sum  # noqa: E402
from clinic_agent.dp_training import train_dp  # noqa: E402
from clinic_agent.eval_slice import choose_lesions  # noqa: E402
from clinic_agent.privacy import MechanismStep  # noqa: E402
from clinic_agent.training import (  # noqa: E402
    DP_LOGIT_ADJUSTMENT,
    compute_delta,
    torch_threads,
    train_local,
)
from common.clipping import clip_l2  # noqa: E402
from common.datasets import (  # noqa: E402
    CLASSES,
    ImageCache,
    group_split,
    load_records,
    public_logit_offsets,
)
from common.evaluation import compute_metrics, predict_proba  # noqa: E402
from common.features import FeatureCache  # noqa: E402
from common.federated_eval import EvaluationCounts, decode_sum  # noqa: E402
from common.model import initial_state  # noqa: E402
from common.partition import dirichlet_partition  # noqa: E402
from common.secagg.messages import plan_quantization  # noqa: E402
from common.secagg.quantize import QuantizationPlan  # noqa: E402
from common.tensors import flatten, specs_of, unflatten  # noqa: E402

DELTA = 1e-5
SLICE_MAX = 200  # the agent's default evaluation.max_cases
EPSILON = 8.0
HIGH_RISK = ("mel", "bcc", "akiec")
KINDS = (
    "scaled_x10",
    "scaled_x100",
    "sign_flip",
    "label_flip",
    "random_at_bound",
    "tiny_weight",
)
PIPELINES: dict[str, tuple[str, bool, bool]] = {
    # name: (gate rule, checks on the unmasked sum, clinics' slices in the evidence)
    "v1": ("tolerance", False, False),
    "harm": ("harm", True, False),
    "noninferiority": ("noninferiority", True, False),
    "harm+fed": ("harm", True, True),
    "noninf+fed": ("noninferiority", True, True),
}
# The pipeline whose federation the poisoned candidates are judged in: the default of a
# secure federation (sum checks, the harm rule, secure federated evaluation).
DRIVER = "harm+fed"
GOAL_HONEST_REJECT = 0.05


@dataclass
class Published:
    state: dict[str, torch.Tensor]
    metrics: dict[str, Any]
    predicted: np.ndarray
    initial: bool
    # Its predictions on the test split, computed once for all the candidates judged on it.
    test_predicted: np.ndarray | None = None
    # Its predictions on each clinic's evaluation slice (federated evaluation), once.
    slice_predicted: list[np.ndarray] | None = None


@dataclass
class Verdict:
    accept: bool
    by: str  # "" (accepted), "sum:<check>", or "gate"
    reason: str


@dataclass
class Tally:
    """Decisions of one pipeline on one kind of candidate."""

    judged: int = 0
    rejected: int = 0
    by_sum: int = 0
    # Honest candidates only: whether the test split (independent of the gate's held-out
    # set) shows the same candidate significantly worse (the harm test on the test lesions).
    worse_on_test: int = 0
    rejected_and_worse: int = 0
    reasons: list[str] = field(default_factory=list)

    def add(self, v: Verdict, worse_on_test: bool = False) -> None:
        self.judged += 1
        self.worse_on_test += worse_on_test
        if not v.accept:
            self.rejected += 1
            self.by_sum += v.by.startswith("sum:")
            self.rejected_and_worse += worse_on_test
            if len(self.reasons) < 3:
                self.reasons.append(v.reason[:200])

    @property
    def false_rejects(self) -> int:
        """Rejected although the test split shows no significant drop."""
        return self.rejected - self.rejected_and_worse

    @property
    def rate(self) -> float:
        return self.rejected / self.judged if self.judged else math.nan


class Judge:
    """Scores candidates on the aggregator's held-out set and applies each pipeline."""

    def __init__(
        self,
        recipe: Recipe,
        holdout: ClinicData,
        test: ClinicData,
        features: FeatureCache,
        slices: Sequence[ClinicData] = (),
    ) -> None:
        self.model_cfg = recipe.model_config()
        self.holdout = holdout
        self.test = test
        self.features = features
        self.slices = list(slices)

    def _labels_on(self, state: dict[str, torch.Tensor], data: ClinicData) -> np.ndarray:
        probs = predict_proba(self.model_cfg, state, data.images, features=self.features)
        return np.nan_to_num(probs, nan=0.0).argmax(axis=1)

    def federated(
        self, candidate: dict[str, torch.Tensor], published: Published
    ) -> PairedEvidence | None:
        """What secure federated evaluation adds: the sum of every clinic's slice counts.

        Summed here in the clear: the secure session returns exactly this sum
        (tests/test_federated_eval.py, tests/test_federated_evaluation.py)."""
        if not self.slices:
            return None
        if published.slice_predicted is None:
            published.slice_predicted = [self._labels_on(published.state, s) for s in self.slices]
        vectors = []
        for data, pub in zip(self.slices, published.slice_predicted, strict=True):
            cand = self._labels_on(candidate, data)
            vectors.append(EvaluationCounts.of(data.labels, cand, pub, len(CLASSES)).to_vector())
        summed = np.sum(vectors, axis=0, dtype=np.uint32)
        counts = decode_sum(
            summed, classes=len(CLASSES), contributors=len(self.slices), max_cases=SLICE_MAX
        )
        return evidence_of(counts)

    def worse_on_test(
        self, candidate: dict[str, torch.Tensor], published: Published, settings: GateSettings
    ) -> bool:
        """Does the test split show ``candidate`` significantly worse than ``published``?"""
        if published.initial:
            return False

        def predict(state: dict[str, torch.Tensor]) -> np.ndarray:
            probs = predict_proba(self.model_cfg, state, self.test.images, features=self.features)
            return np.nan_to_num(probs, nan=0.0).argmax(axis=1)

        if published.test_predicted is None:
            published.test_predicted = predict(published.state)
        cand = predict(candidate)
        metrics = compute_metrics(self.test.labels, np.eye(len(CLASSES))[cand]).to_dict()
        evidence = PairedEvidence.from_predictions(
            self.test.labels, cand, published.test_predicted, CLASSES
        )
        # Always the paired test: a candidate that collapsed to chance level is worse, not
        # exempt (the gate's chance-level exception is about the published model).
        harm = replace(settings, rule="harm", min_balanced_accuracy=0.0, chance_margin=-1.0)
        return not decide(metrics, metrics, harm, evidence=evidence).accept

    def score(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], np.ndarray]:
        probs = predict_proba(self.model_cfg, state, self.holdout.images, features=self.features)
        if not np.isfinite(probs).all():
            probs = np.nan_to_num(probs, nan=1.0 / len(CLASSES))
        return compute_metrics(self.holdout.labels, probs).to_dict(), probs.argmax(axis=1)

    def publish(self, state: dict[str, torch.Tensor], initial: bool) -> Published:
        metrics, predicted = self.score(state)
        return Published(state, metrics, predicted, initial)

    def candidate(
        self, published: Published, result: AggregateResult, specs: Sequence[Any]
    ) -> dict[str, torch.Tensor]:
        delta = unflatten(result.delta.astype(np.float32), specs)
        return {k: published.state[k] + delta[k] for k in published.state}

    def judge_all(
        self,
        published: Published,
        result: AggregateResult,
        bounds: SumBounds,
        specs: Sequence[Any],
        settings: dict[str, GateSettings],
    ) -> tuple[dict[str, Verdict], dict[str, torch.Tensor] | None]:
        """Every pipeline's verdict on one candidate (and the candidate's state)."""
        sum_error: SumCheckError | None = None
        try:
            check_sum(result, bounds)
        except SumCheckError as exc:
            sum_error = exc
        state: dict[str, torch.Tensor] | None = None
        scored: tuple[dict[str, Any], np.ndarray] | None = None
        verdicts: dict[str, Verdict] = {}
        federated: PairedEvidence | None = None
        for name, (rule, sum_checks, pooled) in PIPELINES.items():
            if sum_checks and sum_error is not None:
                verdicts[name] = Verdict(False, f"sum:{sum_error.check}", str(sum_error))
                continue
            if scored is None:
                state = self.candidate(published, result, specs)
                scored = self.score(state)
            metrics, predicted = scored
            evidence = PairedEvidence.from_predictions(
                self.holdout.labels, predicted, published.predicted, CLASSES
            )
            if pooled and not published.initial and state is not None:
                # Like the coordinator: no federated evaluation against the initial model.
                if federated is None:
                    federated = self.federated(state, published)
                if federated is not None:
                    evidence = evidence + federated
            d = decide(
                metrics,
                published.metrics,
                settings[name],
                published_is_initial=published.initial,
                evidence=None if rule == "tolerance" else evidence,
            )
            verdicts[name] = Verdict(d.accept, "" if d.accept else "gate", d.reason)
        return verdicts, state


@dataclass
class Federation:
    recipe: Recipe
    clinics: Sequence[ClinicData]
    rounds: int
    private: bool
    features: FeatureCache
    threads: int
    seed: int
    mechanisms: list[MechanismStep] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.private:
            self.mechanisms = [
                noise_for_budget(
                    EPSILON,
                    DELTA,
                    len(c),
                    self.recipe.batch_size,
                    self.recipe.local_epochs,
                    self.rounds,
                )[1]
                for c in self.clinics
            ]

    def train(
        self,
        state: dict[str, torch.Tensor],
        clinic: int,
        round_index: int,
        labels: np.ndarray | None = None,
    ) -> np.ndarray:
        """One clinic's clipped delta from ``state`` (``labels`` overrides its labels)."""
        r = self.recipe
        data = self.clinics[clinic]
        lr = round_learning_rate(
            r.learning_rate,
            round_index,
            self.rounds,
            schedule=r.lr_schedule,
            min_factor=r.lr_min_factor,
        )
        cfg = r.train_config(
            learning_rate=lr, fedprox_mu=0.0, seed=clinic_seed(self.seed, clinic, round_index)
        )
        y = data.labels if labels is None else labels
        model_cfg = r.model_config()
        if self.private:
            new_state = train_dp(
                model_cfg,
                state,
                data.images,
                y,
                cfg,
                self.mechanisms[clinic],
                max_grad_norm=1.0,
                logit_offsets=public_logit_offsets(DP_LOGIT_ADJUSTMENT),
                threads=self.threads,
                features=self.features,
            ).state
        else:
            new_state = train_local(
                model_cfg,
                state,
                data.images,
                y,
                cfg,
                threads=self.threads,
                features=self.features,
            ).state
        clipped, _ = clip_l2(flatten(compute_delta(new_state, state)), r.clip_norm)
        return clipped.astype(np.float32)


def weighted_mean(
    vectors: Sequence[np.ndarray], weights: Sequence[float], total_weight: float | None = None
) -> np.ndarray:
    acc = np.zeros(vectors[0].size, dtype=np.float64)
    for v, w in zip(vectors, weights, strict=True):
        acc += w * v.astype(np.float64)
    return (acc / (total_weight or sum(weights))).astype(np.float32)


def poisoned(
    kind: str,
    honest: Sequence[np.ndarray],
    weights: Sequence[float],
    names: tuple[str, ...],
    quant: QuantizationPlan,
    clip: float,
    rng: np.random.Generator,
    label_flipped: np.ndarray,
) -> AggregateResult:
    """The unmasked sum when clinic 0 attacks and the others are honest."""
    vectors = list(honest)
    total: float | None = None
    if kind == "scaled_x10":
        vectors[0] = honest[0] * 10
    elif kind == "scaled_x100":
        vectors[0] = honest[0] * 100
    elif kind == "sign_flip":
        vectors[0] = -honest[0]
    elif kind == "label_flip":
        vectors[0] = label_flipped
    elif kind == "random_at_bound":
        noise = rng.standard_normal(honest[0].size)
        vectors[0] = (noise / np.linalg.norm(noise) * clip).astype(np.float32)
    elif kind == "tiny_weight":
        total = 1.0 / quant.weight_scale  # the weight coordinate cancels the others'
    else:
        raise ValueError(kind)
    weight = total if total is not None else float(sum(weights))
    return AggregateResult(weighted_mean(vectors, weights, weight), weight, None, names)


def high_risk_to_nv(labels: np.ndarray) -> np.ndarray:
    out = labels.copy()
    for cls in HIGH_RISK:
        out[labels == CLASSES.index(cls)] = CLASSES.index("nv")
    return out


def run_setting(
    private: bool,
    recipe: Recipe,
    clinics: Sequence[ClinicData],
    judge: Judge,
    test: ClinicData,
    secure: SecureAggregation,
    args: argparse.Namespace,
    features: FeatureCache,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Every pipeline's federation for one privacy setting, and the poisoned trials."""
    label = f"ε={EPSILON:g}" if private else "no DP"
    if not private:
        # Without DP noise the DP recipe's rate (0.1) makes consecutive FedAvg models swing
        # between classes; a non-private federation would train the head more gently.
        recipe = replace(recipe, learning_rate=args.nodp_lr)
    fed = Federation(recipe, clinics, args.rounds, private, features, args.threads, args.seed)
    names = tuple(c.name for c in clinics)
    weights = [float(min(len(c), recipe.weight_max)) for c in clinics]
    # Like privacy.py: no training loss leaves a clinic (the coordinate carries 0).
    quant = plan_quantization(
        recipe.clip_norm, len(clinics), weight_max=recipe.weight_max, loss_max=recipe.loss_max
    )
    bounds = SumBounds(
        min_weight=1.0,
        weight_max=quant.weight_max,
        norm_bound=recipe.clip_norm,
        delta_scale=quant.delta_scale,
        loss_max=quant.loss_max,
        loss_scale=quant.loss_scale or 0.0,
    )
    settings = {
        name: GateSettings(rule=rule, margin=args.margin, alpha=args.alpha)
        for name, (rule, _, _) in PIPELINES.items()
    }
    start = initial_state(recipe.model_config(), args.seed)
    specs = specs_of(start)
    honest = {p: Tally() for p in PIPELINES}  # judged in the driver federation
    own = {p: Tally() for p in PIPELINES}  # each pipeline in its own federation
    trials = {k: {p: Tally() for p in PIPELINES} for k in KINDS}
    final: dict[str, dict[str, float]] = {}
    rng = np.random.default_rng(args.seed + 99)
    order = [DRIVER] + [p for p in PIPELINES if p != DRIVER]
    started = time.perf_counter()
    for pipeline in order:
        published = judge.publish(start, initial=True)
        published_rounds = 0
        for r in range(args.rounds):
            deltas = [fed.train(published.state, i, r) for i in range(len(clinics))]
            contributions = {n: (d, w, 0.0) for n, d, w in zip(names, deltas, weights, strict=True)}
            result = secure.aggregate(r + 1, contributions, quant)
            verdicts, state = judge.judge_all(published, result, bounds, specs, settings)
            if not published.initial:
                assert state is not None
                worse = judge.worse_on_test(state, published, settings[DRIVER])
                own[pipeline].add(verdicts[pipeline], worse)
                if pipeline == DRIVER:
                    for p, v in verdicts.items():
                        honest[p].add(v, worse)
            if pipeline == DRIVER and not published.initial:
                flipped = fed.train(
                    published.state, 0, r, labels=high_risk_to_nv(clinics[0].labels)
                )
                for kind in KINDS:
                    bad = poisoned(
                        kind, deltas, weights, names, quant, recipe.clip_norm, rng, flipped
                    )
                    kind_verdicts, bad_state = judge.judge_all(
                        published, bad, bounds, specs, settings
                    )
                    # Did an accepted poisoned candidate do measurable harm? (test split)
                    harmful = bad_state is not None and judge.worse_on_test(
                        bad_state, published, settings[DRIVER]
                    )
                    for p, v in kind_verdicts.items():
                        trials[kind][p].add(v, harmful)
            if verdicts[pipeline].accept:
                assert state is not None
                published = judge.publish(state, initial=False)
                published_rounds += 1
            log(
                f"  {label} {pipeline}: round {r + 1}/{args.rounds} "
                f"{'published' if verdicts[pipeline].accept else 'rejected'}; held-out BA "
                f"{published.metrics['balanced_accuracy']:.3f}"
            )
        probs = predict_proba(
            recipe.model_config(), published.state, test.images, features=features
        )
        m = compute_metrics(test.labels, probs)
        final[pipeline] = {
            "balanced_accuracy": m.balanced_accuracy,
            "mel_sensitivity": m.sensitivity.get("mel", math.nan),
            "published_rounds": published_rounds,
        }
    return {
        "setting": label,
        "private": private,
        "honest": {
            p: vars(t) | {"rate": t.rate, "false_rejects": t.false_rejects}
            for p, t in honest.items()
        },
        "honest_own_federation": {
            p: vars(t) | {"rate": t.rate, "false_rejects": t.false_rejects} for p, t in own.items()
        },
        "poisoned": {
            k: {
                p: vars(t) | {"rate": t.rate, "false_rejects": t.false_rejects}
                for p, t in per.items()
            }
            for k, per in trials.items()
        },
        "final_test": final,
        "wall_seconds": time.perf_counter() - started,
    }


def pct(t: dict[str, Any]) -> str:
    if not t["judged"]:
        return "-"
    return f"{100 * t['rate']:.0f}% ({t['rejected']}/{t['judged']})"


def render(results: Sequence[dict[str, Any]]) -> str:
    head = [
        "setting",
        "pipeline",
        "honest rejected",
        "not worse on test",
        *KINDS,
        "by sum checks",
        "harmful accepted",
        "test BA",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        for p in PIPELINES:
            poisoned_total = sum(res["poisoned"][k][p]["rejected"] for k in KINDS)
            harmful_through = sum(
                res["poisoned"][k][p]["worse_on_test"] - res["poisoned"][k][p]["rejected_and_worse"]
                for k in KINDS
            )
            by_sum = sum(res["poisoned"][k][p]["by_sum"] for k in KINDS)
            row = [
                res["setting"],
                p,
                pct(res["honest"][p]),
                f"{res['honest'][p]['false_rejects']}/{res['honest'][p]['rejected']}",
                *(pct(res["poisoned"][k][p]) for k in KINDS),
                f"{by_sum}/{poisoned_total}",
                str(harmful_through),
                f"{res['final_test'][p]['balanced_accuracy']:.3f}",
            ]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=default_data_dir())
    p.add_argument("--out", type=Path, default=None, help="results folder (default: a temp dir)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per federation (20)")
    p.add_argument("--clinics", type=int, default=4)
    p.add_argument("--alpha-dirichlet", type=float, default=0.5)
    p.add_argument("--holdout-fraction", type=float, default=0.15)
    p.add_argument("--margin", type=float, default=0.0, help="gate margin (config default)")
    p.add_argument("--alpha", type=float, default=0.05, help="gate significance level")
    p.add_argument(
        "--nodp-lr", type=float, default=0.003, help="head learning rate without DP (0.003)"
    )
    p.add_argument("--settings", default="nodp,dp", help="comma list of nodp, dp")
    p.add_argument("--features-file", type=Path, default=None)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--slice-fraction",
        type=float,
        default=0.2,
        help="share of each clinic's lesions kept as its evaluation slice (0: none)",
    )
    p.add_argument("--quick", action="store_true", help="a small subset and 3 rounds")
    p.add_argument("--train-images", type=int, default=None, help="clinic pool subset (lesions)")
    p.add_argument("--holdout-images", type=int, default=None, help="held-out subset")
    p.add_argument("--test-images", type=int, default=None, help="test subset")
    p.add_argument("--input-size", type=int, default=None, help="image size (recipe: 128)")
    p.add_argument("--batch-size", type=int, default=None, help="local batch (recipe: 512)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 20
    if args.rounds < 2:
        p.error("--rounds must be at least 2 (the first round is judged by the floor only)")
    unknown = set(args.settings.split(",")) - {"nodp", "dp"}
    if unknown:
        p.error(f"--settings: unknown {sorted(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if not (args.data / "HAM10000_metadata.csv").is_file():
        print(f"gate: no HAM10000 data at {args.data}", file=sys.stderr)
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="dermafed-gate-"))
    out.mkdir(parents=True, exist_ok=True)
    recipe = DP_RECIPE
    records = load_records(args.data)
    rest, test_records = group_split(records, 0.2, args.seed)
    pool, holdout_records = group_split(rest, args.holdout_fraction, args.seed + 1)
    quick = 0.15 if args.quick else None
    pool = subset(pool, quick, args.train_images, args.seed + 2)
    holdout_records = subset(holdout_records, None, args.holdout_images, args.seed + 3)
    test_records = subset(
        test_records, 0.3 if args.quick else None, args.test_images, args.seed + 4
    )
    if args.quick:
        recipe = replace(recipe, batch_size=16)
    overrides = {"input_size": args.input_size, "batch_size": args.batch_size}
    recipe = replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    size = recipe.input_size
    cache = ImageCache(out / "cache")
    tag = f"gate-s{args.seed}-{size}px-{len(pool)}-{len(holdout_records)}-{len(test_records)}"
    test = load_set(cache, f"{tag}-test", test_records, size)
    holdout_set = load_set(cache, f"{tag}-holdout", holdout_records, size)
    # DP-SGD needs at least a batch per clinic.
    min_per = recipe.batch_size * 2
    if min_per * args.clinics > len(pool):  # a small subset: as much as it allows
        min_per = max(1, len(pool) // (2 * args.clinics))
    shards = dirichlet_partition(
        pool, args.clinics, args.alpha_dirichlet, args.seed, min_per_clinic=min_per
    )
    # Each clinic keeps an evaluation slice it never trains on (the agent's default rule and
    # code: a fifth of its lesions, at most SLICE_MAX images), in every pipeline, so every
    # pipeline judges the same candidates; only the "+fed" ones use the slices.
    slice_records = []
    for i, shard in enumerate(shards):
        lesions = choose_lesions(
            shard,
            fraction=args.slice_fraction,
            max_cases=SLICE_MAX if args.slice_fraction > 0 else 0,
            rng=random.Random(args.seed + 50 + i),
        )
        slice_records.append([r for r in shard if r.lesion_id in lesions])
        shards[i] = [r for r in shard if r.lesion_id not in lesions]
    clinics = [load_set(cache, f"{tag}-clinic{i}", shard, size) for i, shard in enumerate(shards)]
    slices = [
        load_set(cache, f"{tag}-slice{i}", held, size)
        for i, held in enumerate(slice_records)
        if held
    ]
    clinics = [
        ClinicData(f"clinic-{i + 1}", np.array(c.images), c.labels) for i, c in enumerate(clinics)
    ]
    counts = np.bincount(holdout_set.labels, minlength=len(CLASSES))
    log(
        f"data: test {len(test)} images; aggregator held-out {len(holdout_set)} "
        f"({', '.join(f'{c} {n}' for c, n in zip(CLASSES, counts, strict=True))}); clinics "
        f"{[len(c) for c in clinics]} (Dirichlet α={args.alpha_dirichlet:g}), their "
        f"evaluation slices {[len(c) for c in slices]}"
    )
    features = FeatureCache()
    t0 = time.perf_counter()
    if args.features_file is not None and args.features_file.is_file():
        log(f"features: {features.load(args.features_file)} read from {args.features_file}")
    with torch_threads(args.threads):
        for data in (*clinics, *slices, test, holdout_set):
            features.features(recipe.model_config(), data.images)
    if args.features_file is not None and features.computed:
        features.save(args.features_file)
    log(f"features: {features.computed} computed in {time.perf_counter() - t0:.1f}s")
    judge = Judge(recipe, holdout_set, test, features, slices)
    secure = SecureAggregation(
        Path(tempfile.mkdtemp(prefix="pki-", dir=out)), [c.name for c in clinics]
    )
    results = []
    for setting in args.settings.split(","):
        results.append(
            run_setting(setting == "dp", recipe, clinics, judge, test, secure, args, features, log)
        )
    table = render(results)
    print()
    print(
        f"{args.rounds} rounds per federation, {args.clinics} clinics, margin "
        f"{args.margin:g}, alpha {args.alpha:g}; poisoned candidates judged in the "
        f"'{DRIVER}' federation; honest rejects counted after round 1"
    )
    print(table)
    for res in results:
        h = res["honest"][DRIVER]
        ok = h["judged"] and h["rate"] <= GOAL_HONEST_REJECT
        print(
            f"{res['setting']}: target honest rejects <= {GOAL_HONEST_REJECT:.0%} with "
            f"'{DRIVER}': {'met' if ok else 'MISSED'} ({pct(h)}); every poisoned kind rejected "
            f"100%: "
            + (
                "met"
                if all(res["poisoned"][k][DRIVER]["rate"] == 1.0 for k in KINDS)
                else "MISSED for "
                + ", ".join(k for k in KINDS if res["poisoned"][k][DRIVER]["rate"] < 1.0)
            )
        )
    payload = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "results": results,
        "table": table,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
    if args.json is not None:
        shutil.copy(out / "results.json", args.json)
    log(f"results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
