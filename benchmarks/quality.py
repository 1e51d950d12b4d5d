#!/usr/bin/env python
"""Model quality on real dermoscopy: pooled vs federated training, side by side.

    python benchmarks/quality.py            # full table (see benchmarks/README.md for runtime)
    python benchmarks/quality.py --quick    # smoke run, a few minutes

What it does, in one process, with the project's real code paths:

1. Splits ``../shared/data/ham10000_200x150`` by lesion: a test split is held out first
   (20% of the lesions, stratified by class), then a validation split (the aggregator's
   holdout, used only to follow training), and the rest is the training pool. The test
   and validation splits are written as index CSVs next to the checkpoints.
2. Decodes each data set once into a memory-mapped uint8 cache
   (``common.datasets.ImageCache`` with a cache directory; reused by later runs and
   rebuilt when an image changes).
3. Trains every row for the same number of epochs' worth of computation (``rounds x
   local epochs`` passes over the training pool):

   * **pooled**: one site holding the whole pool, the same round loop without clipping
     or aggregation (what a central data set would give);
   * **federated**: 4 clinics from a Dirichlet(alpha) label-skew partition of the pool
     (whole lesions; alpha = inf is an even stratified split), each training with
     ``clinic_agent.training.train_local`` from the global weights, clipping its whole
     delta (``common.clipping.clip_l2``) and aggregating it weighted by case count
     through the real secure-aggregation classes (``SecAggClient`` /
     ``SecAggServer``: signed key advertisement with throwaway certificates, sealed
     Shamir shares, masked ring upload, survivor signatures, unmasking) or through
     ``PlainFedAvg``; FedProx rows add the proximal term (``fedprox_mu``); the learning
     rate follows ``aggregator.schedule.round_learning_rate`` across rounds.

4. Reports accuracy, balanced accuracy, macro AUROC, melanoma sensitivity and wall time on
   the held-out test lesions, writes ``results.json`` and ``table.md``, and saves each
   row's final model as a safetensors checkpoint: ``dermafed evaluate --checkpoint
   <out>/checkpoints/<row>.safetensors --data <out>/test.csv`` prints the same metrics
   (the benchmark checks that itself). ``best-federated.safetensors`` is the federated
   row with the best *validation* balanced accuracy (never chosen on the test split).

Nothing here is a test: numbers are measured and reported, including rows that miss
the targets.
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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from any directory
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from aggregator.fedavg import AggregateResult, PlainFedAvg  # noqa: E402
from aggregator.schedule import round_learning_rate  # noqa: E402
from aggregator.secagg_server import SecAggServer  # noqa: E402
from aggregator.server_opt import ServerOptSettings, server_step  # noqa: E402
from clinic_agent.secagg_client import SecAggClient  # noqa: E402
from clinic_agent.training import (  # noqa: E402
    EpochBatches,
    TrainConfig,
    class_weights,
    compute_delta,
    make_model,
    make_optimizer,
    torch_threads,
    train_local,
    train_step,
)
from common import pki  # noqa: E402
from common.clipping import clip_l2  # noqa: E402
from common.datasets import (  # noqa: E402
    CLASSES,
    HAM10000_PUBLISHED_COUNTS,
    ImageCache,
    Record,
    class_counts,
    group_split,
    labels_of,
    lesion_groups,
    load_records,
)
from common.evaluation import EvalMetrics, compute_metrics, evaluate_checkpoint, predict_proba  # noqa: E402
from common.features import FeatureCache  # noqa: E402
from common.model import (  # noqa: E402
    PLAIN_ARCH,
    RECIPE_PLANS,
    ModelConfig,
    build_model,
    initial_state,
    parameter_count,
    to_input,
)
from common.partition import dirichlet_partition, write_index  # noqa: E402
from common.secagg.messages import minimum_threshold, plan_quantization  # noqa: E402
from common.secagg.quantize import QuantizationPlan  # noqa: E402
from common.tensors import checkpoint_bytes, flatten, specs_of, unflatten  # noqa: E402

FEDERATION = "quality-bench"
MEL = CLASSES.index("mel")
# Targets from the issue: pooled floor, and federated as a fraction of pooled.
POOLED_MIN_BALANCED_ACCURACY = 0.65
POOLED_MIN_MEL_SENSITIVITY = 0.60
FEDERATED_FRACTION = {0.5: 0.95, 0.1: 0.90}
# Class counts of the full HAM10000 release (Tschandl et al., Sci. Data 2018), in CLASSES
# order: public knowledge, so every clinic may derive the same class weights from it.


def default_data_dir() -> Path:
    env = os.environ.get("DERMAFED_HAM10000")
    return Path(env) if env else REPO.parent / "shared/data/ham10000_200x150"


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Recipe:
    """The model and training recipe every row uses (the project's defaults without DP:
    ImageNet EfficientNet-Lite0 fine-tuned at 128 px; ``--arch lesionres --input-size 64
    --lr 0.002 --epochs 30 --clip-norm 10`` is the former recipe)."""

    arch: str = PLAIN_ARCH
    input_size: int = RECIPE_PLANS[PLAIN_ARCH].input_size
    width: int = 24
    dropout: float = 0.1
    optimizer: str = "adam"
    learning_rate: float = RECIPE_PLANS[PLAIN_ARCH].learning_rate
    batch_size: int = 32
    weight_decay: float = 0.0
    class_weighting: str = "logit_adjusted"
    class_prior: str = "local"  # "local": weights from each clinic's counts; "public"
    sampling: str = "shuffle"
    crop_scale: float = 0.75
    color_jitter: float = 0.1
    channels_last: bool = False
    epochs: int = 3  # total passes over the training pool, for every row
    local_epochs: int = 1
    # Cap on each clinic's optimiser steps per round (0: none). Federated rows then run
    # more rounds, so that every row still does `epochs` passes over the pool.
    max_local_steps: int = 0
    lr_schedule: str = "cosine"
    lr_min_factor: float = 0.02
    # Whole-delta clip: a clinic's fine-tuning delta after one local epoch at Adam 1e-4
    # has an L2 norm of about 1 to 2 (results.json, delta_norms), so this never cuts one;
    # the aggregator's default of 10 would not either.
    clip_norm: float = 50.0
    weight_max: float = 10000.0
    loss_max: float = 20.0

    @property
    def rounds(self) -> int:
        return max(1, self.epochs // self.local_epochs)

    def rounds_for(self, sizes: Sequence[int], *, federated: bool) -> int:
        """Rounds that make ``epochs`` passes over the pool for sites of ``sizes``."""
        if not federated or not self.max_local_steps:
            return self.rounds
        cap = self.max_local_steps * self.batch_size
        per_round = sum(min(self.local_epochs * n, cap) for n in sizes)
        return max(1, round(self.epochs * sum(sizes) / per_round))

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            arch=self.arch, input_size=self.input_size, width=self.width, dropout=self.dropout
        )

    def train_config(self, *, learning_rate: float, fedprox_mu: float, seed: int) -> TrainConfig:
        return TrainConfig(
            epochs=self.local_epochs,
            optimizer=self.optimizer,
            learning_rate=learning_rate,
            weight_decay=self.weight_decay,
            fedprox_mu=fedprox_mu,
            batch_size=self.batch_size,
            class_weighting=self.class_weighting,
            class_prior=HAM10000_PUBLISHED_COUNTS if self.class_prior == "public" else None,
            sampling=self.sampling,
            crop_scale=self.crop_scale,
            color_jitter=self.color_jitter,
            channels_last=self.channels_last,
            seed=seed,
        )

    def federated_train_config(
        self, *, learning_rate: float, fedprox_mu: float, seed: int
    ) -> TrainConfig:
        cfg = self.train_config(learning_rate=learning_rate, fedprox_mu=fedprox_mu, seed=seed)
        return replace(cfg, max_steps=self.max_local_steps)


@dataclass(frozen=True)
class Row:
    name: str
    setting: str  # "pooled" or "federated"
    alpha: float | None = None  # Dirichlet label skew; inf = IID; None for pooled
    fedprox_mu: float = 0.0
    aggregation: str = "none"  # "none" (pooled), "plain" or "secure"
    server_momentum: float = 0.0
    quantity_beta: float | None = None  # quantity skew instead of label skew

    @property
    def algorithm(self) -> str:
        if self.setting == "pooled":
            return "centralised"
        name = "FedProx" if self.fedprox_mu > 0 else "FedAvg"
        return name + ("M" if self.server_momentum > 0 and name == "FedAvg" else "")


@dataclass
class RowResult:
    row: Row
    test: dict[str, Any]
    validation_curve: list[dict[str, float]]
    wall_seconds: float
    train_seconds: float
    aggregation_seconds: float
    examples_processed: int
    rounds: int
    clinic_sizes: list[int]
    clinic_counts: list[list[int]]
    delta_norms: list[float] = field(default_factory=list)  # per clinic-round, before clipping
    clipped_fraction: float = 0.0
    checkpoint: str = ""
    reproduced: bool | None = None


@dataclass
class Split:
    train: list[Record]
    validation: list[Record]
    test: list[Record]


# --------------------------------------------------------------------------- data


def lesion_subset(records: Sequence[Record], fraction: float, seed: int) -> list[Record]:
    """About ``fraction`` of the records, by whole lesions, stratified by class."""
    if fraction >= 1.0:
        return list(records)
    _, subset = group_split(records, fraction, seed)
    return subset


def make_split(
    records: Sequence[Record],
    *,
    test_fraction: float,
    validation_fraction: float,
    seed: int,
    train_fraction: float = 1.0,
    test_subset: float = 1.0,
) -> Split:
    """Test lesions first (before any partitioning), then validation, then the pool."""
    rest, test = group_split(records, test_fraction, seed)
    train, validation = group_split(rest, validation_fraction, seed + 1)
    return Split(
        train=lesion_subset(train, train_fraction, seed + 2),
        validation=lesion_subset(validation, test_subset, seed + 3),
        test=lesion_subset(test, test_subset, seed + 4),
    )


def quantity_skew_partition(
    records: Sequence[Record], clinics: int, beta: float, seed: int, min_per_clinic: int = 20
) -> list[list[Record]]:
    """Clinics of very different sizes but similar case mix (quantity skew).

    Clinic shares of every class are one Dirichlet(beta) draw (the same proportions for
    all classes, so label distributions stay alike while volumes differ); whole lesions
    only. Redraws (seeded ``(seed, attempt)``) until every clinic has ``min_per_clinic``
    images.
    """
    if clinics < 1 or not beta > 0:
        raise ValueError("need clinics >= 1 and beta > 0")
    groups = lesion_groups(records)
    by_class: dict[int, list[str]] = {}
    for lesion, group in groups.items():
        by_class.setdefault(group[0].label, []).append(lesion)
    for attempt in range(100):
        rng = np.random.default_rng([seed, attempt])
        shares = rng.dirichlet(np.full(clinics, beta))
        shards: list[list[str]] = [[] for _ in range(clinics)]
        for label in sorted(by_class):
            lesions = sorted(by_class[label])
            order = rng.permutation(len(lesions))
            cuts = (np.cumsum(shares)[:-1] * len(lesions)).round().astype(int)
            for clinic, part in enumerate(np.split(order, cuts)):
                shards[clinic].extend(lesions[i] for i in part)
        out = [
            sorted((r for lesion in s for r in groups[lesion]), key=lambda r: r.image_id)
            for s in shards
        ]
        if all(len(s) >= min_per_clinic for s in out):
            return out
    raise ValueError(f"could not give {clinics} clinics {min_per_clinic} images each")


@dataclass
class ClinicData:
    name: str
    images: np.ndarray  # uint8 (N, S, S, 3), a read-only memory map
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def load_set(cache: ImageCache, name: str, records: Sequence[Record], size: int) -> ClinicData:
    return ClinicData(name, cache.load(records, size, name=name), labels_of(records))


def partition(
    row: Row, pool: Sequence[Record], clinics: int, seed: int
) -> tuple[str, list[list[Record]]]:
    """(cache prefix, shards) of the row's federation."""
    if row.quantity_beta is not None:
        return f"q{row.quantity_beta:g}", quantity_skew_partition(
            pool, clinics, row.quantity_beta, seed
        )
    alpha = math.inf if row.alpha is None else row.alpha
    tag = "iid" if math.isinf(alpha) else f"a{alpha:g}"
    return tag, dirichlet_partition(pool, clinics, alpha, seed, min_per_clinic=20)


# --------------------------------------------------------------------------- aggregation


class SecureAggregation:
    """A real secure-aggregation round per call: SecAggClient x n against SecAggServer.

    The cohort's certificates come from a throwaway federation CA. Everything runs in
    this process, in the order the coordinator would drive it; nobody drops out.
    """

    def __init__(self, workdir: Path, clinics: Sequence[str]) -> None:
        ca_dir = workdir / "ca"
        self.ca_cert = pki.load_certificate(pki.init_ca(FEDERATION, ca_dir))
        self.parties = {}
        for clinic in clinics:
            issued = pki.issue(ca_dir, "clinic", clinic, workdir / "clinic" / clinic)
            self.parties[clinic] = (
                pki.load_private_key(issued.key_path),
                issued.cert_path.read_bytes(),
            )

    def aggregate(
        self,
        round_number: int,
        contributions: dict[str, tuple[np.ndarray, float, float]],
        plan: QuantizationPlan,
    ) -> AggregateResult:
        cohort = tuple(sorted(contributions))
        threshold = minimum_threshold(len(cohort))
        numel = next(iter(contributions.values()))[0].size
        now = lambda: datetime.now(UTC)  # noqa: E731
        server = SecAggServer(
            FEDERATION,
            round_number,
            cohort,
            threshold,
            plan.vector_length(numel),
            plan,
            self.ca_cert,
            now=now,
        )
        clients = {
            c: SecAggClient(
                FEDERATION,
                round_number,
                c,
                cohort,
                threshold,
                self.parties[c][0],
                self.parties[c][1],
                self.ca_cert,
                rand=os.urandom,
                now=now,
            )
            for c in cohort
        }
        for c in cohort:
            server.advertise(c, clients[c].advertise(), self.parties[c][1])
        server.close_stage("advertise", cohort)
        advertisements = server.advertisements()
        for c in cohort:
            server.submit_shares(c, clients[c].share_keys(advertisements))
        server.close_stage("share_keys", cohort)
        for c in cohort:
            delta, weight, loss = contributions[c]
            masked = clients[c].masked_input(
                server.shares_for(c), delta, weight=weight, plan=plan, loss=loss
            )
            upload = server.begin_upload(c)
            for chunk in masked.chunk_bytes():
                upload.write(chunk)
            server.commit(upload)
        server.close_stage("masked_input", cohort)
        survivors = server.survivors()
        for c in cohort:
            server.submit_signature(c, clients[c].consistency(survivors))
        server.close_stage("consistency", cohort)
        for c in cohort:
            server.reveal(c, clients[c].unmask(server.unmask_request_for(c)))
        server.close_stage("unmask", cohort)
        return server.finalize()


def plain_aggregate(
    contributions: dict[str, tuple[np.ndarray, float, float]], clip_norm: float
) -> AggregateResult:
    numel = next(iter(contributions.values()))[0].size
    fedavg = PlainFedAvg(numel, clip_norm)
    for clinic in sorted(contributions):
        delta, weight, loss = contributions[clinic]
        fedavg.add(clinic, delta, weight, loss)
    return fedavg.result()


# --------------------------------------------------------------------------- training


def evaluate_state(
    model_cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    data: ClinicData,
    features: FeatureCache | None = None,
) -> EvalMetrics:
    """Exactly what ``dermafed evaluate`` computes (same decoder, same predict_proba)."""
    probs = predict_proba(model_cfg, state, np.asarray(data.images), features=features)
    return compute_metrics(data.labels, probs)


def clinic_seed(base: int, clinic: int, round_index: int) -> int:
    return (base * 1_000_003 + clinic * 10_007 + round_index) % (2**31)


def run_row(
    row: Row,
    recipe: Recipe,
    clinics: list[ClinicData],
    validation: ClinicData,
    *,
    seed: int,
    threads: int,
    secure: SecureAggregation | None,
    log: Callable[[str], None],
) -> tuple[RowResult, dict[str, torch.Tensor]]:
    model_cfg = recipe.model_config()
    state = initial_state(model_cfg, seed)
    names = list(state)
    specs = specs_of(state)
    # server_lr = 1 - momentum keeps the long-run step of a constant delta at 1x (the
    # velocity converges to delta / (1 - momentum)), so rows differ in smoothing only.
    settings = ServerOptSettings(momentum=row.server_momentum, server_lr=1.0 - row.server_momentum)
    velocity: np.ndarray | None = None
    quant = None
    if row.aggregation == "secure":
        quant = plan_quantization(
            recipe.clip_norm, len(clinics), weight_max=recipe.weight_max, loss_max=recipe.loss_max
        )
    curve: list[dict[str, float]] = []
    norms: list[float] = []
    train_s = agg_s = 0.0
    processed = 0
    federated = row.setting != "pooled"
    rounds = recipe.rounds_for([len(c) for c in clinics], federated=federated)
    evaluate_every = max(1, rounds // 30)  # about 30 validation points per row
    started = time.perf_counter()
    for r in range(rounds):
        lr = round_learning_rate(
            recipe.learning_rate,
            r,
            rounds,
            schedule=recipe.lr_schedule,
            min_factor=recipe.lr_min_factor,
        )
        contributions: dict[str, tuple[np.ndarray, float, float]] = {}
        losses = []
        for i, clinic in enumerate(clinics):
            make_cfg = recipe.federated_train_config if federated else recipe.train_config
            cfg = make_cfg(
                learning_rate=lr, fedprox_mu=row.fedprox_mu, seed=clinic_seed(seed, i, r)
            )
            t0 = time.perf_counter()
            result = train_local(
                model_cfg, state, clinic.images, clinic.labels, cfg, threads=threads
            )
            train_s += time.perf_counter() - t0
            processed += round(result.examples_per_second * result.seconds)
            losses.append(result.mean_loss)
            if row.setting == "pooled":
                state = result.state
                continue
            vector = flatten(compute_delta(result.state, state))
            clipped, norm = clip_l2(vector, recipe.clip_norm)
            norms.append(norm)
            weight = float(min(result.num_examples, recipe.weight_max))
            loss = min(max(result.mean_loss, 0.0), recipe.loss_max)
            contributions[clinic.name] = (clipped.astype(np.float32), weight, loss)
        if row.setting != "pooled":
            t0 = time.perf_counter()
            if row.aggregation == "secure":
                if secure is None or quant is None:
                    raise RuntimeError("secure row without a secure-aggregation setup")
                aggregate = secure.aggregate(r + 1, contributions, quant)
            else:
                aggregate = plain_aggregate(contributions, recipe.clip_norm)
            update, velocity = server_step(aggregate.delta, velocity, settings)
            global_vec = flatten(state) + update
            state = {k: v.clone() for k, v in unflatten(global_vec, specs).items()}
            state = {k: state[k] for k in names}
            agg_s += time.perf_counter() - t0
        if (r + 1) % evaluate_every and r + 1 != rounds:
            continue
        m = evaluate_state(model_cfg, state, validation)
        curve.append(
            {
                "round": r + 1,
                "lr": lr,
                "train_loss": float(np.mean(losses)),
                "val_accuracy": m.accuracy,
                "val_balanced_accuracy": m.balanced_accuracy,
                "val_macro_auroc": m.macro_auroc,
                "val_mel_sensitivity": m.sensitivity.get("mel", float("nan")),
            }
        )
        log(
            f"  {row.name} round {r + 1}/{rounds} lr {lr:.2e} loss {np.mean(losses):.3f} "
            f"val BA {m.balanced_accuracy:.3f} AUROC {m.macro_auroc:.3f}"
            + (f" |delta| median {np.median(norms[-len(clinics) :]):.2f}" if norms else "")
        )
    wall = time.perf_counter() - started
    clipped_fraction = float(np.mean([n > recipe.clip_norm for n in norms])) if norms else 0.0
    return (
        RowResult(
            row=row,
            test={},
            validation_curve=curve,
            wall_seconds=wall,
            train_seconds=train_s,
            aggregation_seconds=agg_s,
            examples_processed=processed,
            rounds=rounds,
            clinic_sizes=[len(c) for c in clinics],
            clinic_counts=[np.bincount(c.labels, minlength=len(CLASSES)).tolist() for c in clinics],
            delta_norms=norms,
            clipped_fraction=clipped_fraction,
        ),
        state,
    )


# --------------------------------------------------------------------------- throughput


def measure_throughput(
    recipe: Recipe, data: ClinicData, *, threads: int, examples: int, repeats: int, seed: int
) -> dict[str, float]:
    """Training examples/s: the real data path vs the same model fed from memory.

    * ``data_path``: ``train_local`` on the memory-mapped cache (batch gather, per-batch
      augmentation, class-weighted loss) — what clinics run;
    * ``data_path_in_ram``: the same on an in-RAM copy of the images (isolates the
      memory map);
    * ``from_memory``: the same model and optimiser stepping over batches that were
      gathered, normalised and stored as float tensors beforehand (no loading, no
      augmentation): the ceiling the data path is compared with;
    * ``channels_last``: ``train_local`` with ``channels_last=True``.

    The machine is shared, so each is measured ``repeats`` times, interleaved, and the
    best run counts.
    """
    model_cfg = recipe.model_config()
    n = min(examples, len(data))
    images = data.images[:n]
    labels = data.labels[:n]
    in_ram = np.array(images)
    state = initial_state(model_cfg, seed)
    cfg = recipe.train_config(learning_rate=recipe.learning_rate, fedprox_mu=0.0, seed=seed)

    def data_path(imgs: np.ndarray, c: TrainConfig) -> float:
        return train_local(model_cfg, state, imgs, labels, c, threads=threads).examples_per_second

    def from_memory() -> float:
        with torch_threads(threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = make_model(model_cfg, state)
            optimizer = make_optimizer(model, cfg)
            weights = class_weights(labels, model_cfg.num_classes, cfg.class_weighting)
            loss_fn = nn.CrossEntropyLoss(weight=weights)
            batches = [
                (to_input(x), y)
                for x, y in EpochBatches(in_ram, labels, cfg.batch_size, seed, "shuffle")
            ]
            model.train()
            t0 = time.perf_counter()
            for x, y in batches:
                train_step(model, optimizer, x, y, loss_fn)
            return n / (time.perf_counter() - t0)

    runs: dict[str, list[float]] = {
        "data_path": [],
        "data_path_in_ram": [],
        "from_memory": [],
        "channels_last": [],
    }
    for _ in range(repeats):
        runs["from_memory"].append(from_memory())
        runs["data_path"].append(data_path(images, cfg))
        runs["data_path_in_ram"].append(data_path(in_ram, cfg))
        runs["channels_last"].append(data_path(images, replace(cfg, channels_last=True)))
    best = {k: max(v) for k, v in runs.items()}
    return {
        **{f"{k}_examples_per_s": v for k, v in best.items()},
        "ratio_data_path_vs_memory": best["data_path"] / best["from_memory"],
        "ratio_memmap_vs_in_ram": best["data_path"] / best["data_path_in_ram"],
        "ratio_channels_last_vs_default": best["channels_last"] / best["data_path"],
        "examples": n,
        "repeats": repeats,
    }


# --------------------------------------------------------------------------- rows and report


def default_rows(
    alphas: Sequence[float],
    mu: float,
    *,
    secure: bool,
    plain_check: bool,
    server_momentum: float,
    quantity_beta: float | None,
) -> list[Row]:
    aggregation = "secure" if secure else "plain"
    rows = [Row("pooled", "pooled")]
    for alpha in alphas:
        tag = "iid" if math.isinf(alpha) else f"a{alpha:g}"
        rows.append(Row(f"{tag}-fedavg", "federated", alpha, 0.0, aggregation))
        rows.append(Row(f"{tag}-fedprox", "federated", alpha, mu, aggregation))
    if plain_check and secure:
        ref = 0.5 if 0.5 in alphas else alphas[0]
        tag = "iid" if math.isinf(ref) else f"a{ref:g}"
        rows.append(Row(f"{tag}-fedavg-plain", "federated", ref, 0.0, "plain"))
    if server_momentum > 0:
        ref = 0.1 if 0.1 in alphas else alphas[0]
        tag = "iid" if math.isinf(ref) else f"a{ref:g}"
        rows.append(Row(f"{tag}-fedavgm", "federated", ref, 0.0, aggregation, server_momentum))
    if quantity_beta is not None:
        rows.append(
            Row(
                f"q{quantity_beta:g}-fedavg",
                "federated",
                None,
                0.0,
                aggregation,
                quantity_beta=quantity_beta,
            )
        )
    return rows


def describe(row: Row) -> str:
    if row.setting == "pooled":
        return "pooled (1 site)"
    if row.quantity_beta is not None:
        skew = f"quantity skew β={row.quantity_beta:g}"
    elif row.alpha is None or math.isinf(row.alpha):
        skew = "IID"
    else:
        skew = f"α={row.alpha:g}"
    return f"4 clinics, {skew}"


def target_note(result: RowResult, pooled: RowResult | None) -> str:
    t = result.test
    if result.row.setting == "pooled":
        ok = (
            t["balanced_accuracy"] >= POOLED_MIN_BALANCED_ACCURACY
            and t["mel_sensitivity"] >= POOLED_MIN_MEL_SENSITIVITY
        )
        return (
            f"{'meets' if ok else 'MISSES'} BA ≥ {POOLED_MIN_BALANCED_ACCURACY}, "
            f"mel ≥ {POOLED_MIN_MEL_SENSITIVITY}"
        )
    alpha = result.row.alpha
    if pooled is None or alpha not in FEDERATED_FRACTION or result.row.quantity_beta is not None:
        return ""
    need = FEDERATED_FRACTION[alpha]
    ok = t["balanced_accuracy"] >= need * pooled.test["balanced_accuracy"]
    return f"{'meets' if ok else 'MISSES'} ≥ {need:.0%} of pooled BA"


def render_table(results: Sequence[RowResult], recipe: Recipe) -> str:
    pooled = next((r for r in results if r.row.setting == "pooled"), None)
    head = (
        "| row | data | algorithm | aggregation | rounds | acc | bal. acc | macro AUROC"
        " | mel sens. | BA / pooled | wall (s) | target |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in results:
        t = r.test
        rel = (
            f"{t['balanced_accuracy'] / pooled.test['balanced_accuracy']:.0%}"
            if pooled is not None and r is not pooled
            else "—"
        )
        algo = r.row.algorithm
        if r.row.fedprox_mu > 0:
            algo += f" μ={r.row.fedprox_mu:g}"
        if r.row.server_momentum > 0:
            algo += f" β={r.row.server_momentum:g}"
        lines.append(
            f"| {r.row.name} | {describe(r.row)} | {algo} | {r.row.aggregation} | {r.rounds} "
            f"| {t['accuracy']:.3f} | {t['balanced_accuracy']:.3f} | {t['macro_auroc']:.3f} "
            f"| {t['mel_sensitivity']:.3f} | {rel} | {r.wall_seconds:.0f} "
            f"| {target_note(r, pooled)} |"
        )
    lines.append("")
    cap = (
        f", at most {recipe.max_local_steps} local steps per clinic and round (federated "
        "rows run more rounds to match)"
        if recipe.max_local_steps
        else ""
    )
    lines.append(
        f"Every row: {recipe.epochs} epochs' worth of computation over the training pool "
        f"({recipe.local_epochs} local epoch(s) per round{cap}); model {recipe.arch} "
        f"(width {recipe.width}, {recipe.input_size} px), {recipe.optimizer} "
        f"lr {recipe.learning_rate:g} ({recipe.lr_schedule} over rounds), batch "
        f"{recipe.batch_size}, class weighting {recipe.class_weighting} "
        f"({recipe.class_prior} counts), sampling "
        f"{recipe.sampling}, delta clip norm {recipe.clip_norm:g}."
    )
    return "\n".join(lines)


def test_summary(m: EvalMetrics) -> dict[str, Any]:
    d = m.to_dict()
    d["mel_sensitivity"] = m.sensitivity.get("mel", float("nan"))
    return d


def metrics_match(a: EvalMetrics, b: EvalMetrics) -> bool:
    keys = ("accuracy", "balanced_accuracy", "macro_auroc")
    return (
        all(abs(getattr(a, k) - getattr(b, k)) < 1e-9 for k in keys) and a.confusion == b.confusion
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=default_data_dir(), help="HAM10000 folder")
    p.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench-out" / "quality",
        help="results, checkpoints and split CSVs (default bench-out/quality)",
    )
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="decoded-image cache (default <out>/cache)"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: subset, 3 rows, few epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--clinics", type=int, default=4)
    p.add_argument(
        "--alphas", type=str, default="0.1,0.5,1,inf", help="Dirichlet label-skew alphas; inf = IID"
    )
    p.add_argument("--mu", type=float, default=0.01, help="FedProx mu for the FedProx rows")
    p.add_argument("--epochs", type=int, default=None, help="epochs' worth of computation per row")
    p.add_argument("--local-epochs", type=int, default=None)
    p.add_argument(
        "--max-local-steps",
        type=int,
        default=None,
        help="cap on each clinic's steps per round (federated rows; 0: none)",
    )
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--clip-norm", type=float, default=None)
    p.add_argument("--arch", default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--class-weighting", default=None)
    p.add_argument("--sampling", default=None)
    p.add_argument(
        "--class-prior",
        choices=("local", "public"),
        default=None,
        help="class weights from local counts or the published HAM10000 counts",
    )
    p.add_argument("--crop-scale", type=float, default=None)
    p.add_argument(
        "--server-momentum",
        type=float,
        default=0.0,
        help="add a FedAvgM row with this server momentum (0: none)",
    )
    p.add_argument(
        "--quantity-skew",
        type=float,
        default=None,
        help="add a quantity-skew row with this Dirichlet beta over clinic sizes",
    )
    p.add_argument(
        "--aggregation",
        choices=("secure", "plain"),
        default="secure",
        help="aggregation for the federated rows (default secure)",
    )
    p.add_argument(
        "--rows", type=str, default=None, help="comma-separated row names to run (default: all)"
    )
    p.add_argument(
        "--no-throughput", action="store_true", help="skip the data-path throughput measurement"
    )
    return p.parse_args(argv)


def build_recipe(args: argparse.Namespace) -> Recipe:
    recipe = Recipe()
    if args.quick:
        recipe = replace(recipe, epochs=2, local_epochs=1)
    overrides = {
        "epochs": args.epochs,
        "local_epochs": args.local_epochs,
        "max_local_steps": args.max_local_steps,
        "learning_rate": args.lr,
        "clip_norm": args.clip_norm,
        "arch": args.arch,
        "width": args.width,
        "input_size": args.input_size,
        "class_weighting": args.class_weighting,
        "sampling": args.sampling,
        "class_prior": args.class_prior,
        "crop_scale": args.crop_scale,
    }
    return replace(recipe, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    recipe = build_recipe(args)
    recipe.model_config()  # validate before spending any time
    recipe.train_config(learning_rate=recipe.learning_rate, fedprox_mu=args.mu, seed=0)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    log_file = (out / "log.txt").open("w", encoding="utf-8")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    started = time.perf_counter()
    if not (args.data / "HAM10000_metadata.csv").is_file():
        print(
            f"quality: no HAM10000 data at {args.data} (set --data or DERMAFED_HAM10000)",
            file=sys.stderr,
        )
        return 2
    records = load_records(args.data)
    if args.quick:
        split = make_split(
            records,
            test_fraction=0.2,
            validation_fraction=0.1,
            seed=args.seed,
            train_fraction=0.3,
            test_subset=0.5,
        )
    else:
        split = make_split(records, test_fraction=0.2, validation_fraction=0.1, seed=args.seed)
    write_index(split.test, out / "test.csv")
    write_index(split.validation, out / "validation.csv")
    log(
        f"data: {len(records)} images; train pool {len(split.train)}, validation "
        f"{len(split.validation)}, test {len(split.test)} (lesion-disjoint)"
    )
    log(f"test class counts {dict(zip(CLASSES, class_counts(split.test).tolist(), strict=True))}")

    cache = ImageCache(args.cache_dir or out / "cache")
    size = recipe.input_size
    t0 = time.perf_counter()
    tag = "quick" if args.quick else "full"
    pooled = load_set(cache, f"{tag}-s{args.seed}-pool", split.train, size)
    validation = load_set(cache, f"{tag}-s{args.seed}-validation", split.validation, size)
    test = load_set(cache, f"{tag}-s{args.seed}-test", split.test, size)
    log(f"decode/cache: {time.perf_counter() - t0:.1f}s ({cache.decodes} images decoded)")

    alphas = [float(a) for a in args.alphas.split(",")]
    if args.quick:
        alphas = [0.5]
    rows = default_rows(
        alphas,
        args.mu,
        secure=args.aggregation == "secure",
        plain_check=not args.quick,
        server_momentum=args.server_momentum,
        quantity_beta=args.quantity_skew,
    )
    if args.rows:
        wanted = set(args.rows.split(","))
        unknown = wanted - {r.name for r in rows}
        if unknown:
            print(
                f"quality: unknown row(s) {sorted(unknown)}; have {[r.name for r in rows]}",
                file=sys.stderr,
            )
            return 2
        rows = [r for r in rows if r.name in wanted]

    model_cfg = recipe.model_config()
    log(
        f"model {recipe.arch} width {recipe.width} at {size}px: "
        f"{parameter_count(build_model(model_cfg)):,} parameters; {recipe.epochs} epochs per "
        f"row, {recipe.local_epochs} local epoch(s) per round; rows: "
        + ", ".join(r.name for r in rows)
    )

    throughput: dict[str, float] = {}
    if not args.no_throughput:
        throughput = measure_throughput(
            recipe,
            pooled,
            threads=args.threads,
            examples=768 if args.quick else 2048,
            repeats=2 if args.quick else 3,
            seed=args.seed,
        )
        log("throughput (examples/s): " + ", ".join(f"{k} {v:.3g}" for k, v in throughput.items()))

    workdir = Path(tempfile.mkdtemp(prefix="quality-pki-"))
    results: list[RowResult] = []
    best: tuple[float, Path] | None = None
    try:
        clinic_names = [f"clinic-{i + 1}" for i in range(args.clinics)]
        secure = None
        if any(r.aggregation == "secure" for r in rows):
            secure = SecureAggregation(workdir, clinic_names)
        for row in rows:
            if row.setting == "pooled":
                sites = [pooled]
            else:
                prefix, shards = partition(row, split.train, args.clinics, args.seed)
                sites = [
                    ClinicData(
                        name,
                        cache.load(shard, size, name=f"{tag}-s{args.seed}-{prefix}-{name}"),
                        labels_of(shard),
                    )
                    for name, shard in zip(clinic_names, shards, strict=True)
                ]
            log(f"row {row.name}: sites {[len(s) for s in sites]}")
            result, state = run_row(
                row,
                recipe,
                sites,
                validation,
                seed=args.seed,
                threads=args.threads,
                secure=secure,
                log=log,
            )
            metrics = evaluate_state(model_cfg, state, test)
            result.test = test_summary(metrics)
            ckpt = out / "checkpoints" / f"{row.name}.safetensors"
            ckpt.write_bytes(checkpoint_bytes(state, model_cfg.to_metadata()))
            result.checkpoint = str(ckpt)
            result.reproduced = metrics_match(metrics, evaluate_checkpoint(ckpt, out / "test.csv"))
            results.append(result)
            final_val = result.validation_curve[-1]["val_balanced_accuracy"]
            if row.setting == "federated" and (best is None or final_val > best[0]):
                best = (final_val, ckpt)
            log(
                f"row {row.name}: test acc {metrics.accuracy:.3f} BA "
                f"{metrics.balanced_accuracy:.3f} AUROC {metrics.macro_auroc:.3f} mel "
                f"{result.test['mel_sensitivity']:.3f} in {result.wall_seconds:.0f}s "
                f"(train {result.train_seconds:.0f}s, aggregation "
                f"{result.aggregation_seconds:.1f}s); evaluate reproduces: {result.reproduced}"
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if best is not None:
        shutil.copyfile(best[1], out / "best-federated.safetensors")

    table = render_table(results, recipe)
    total = time.perf_counter() - started
    (out / "table.md").write_text(table + "\n", encoding="utf-8")
    summary = {
        "mode": "quick" if args.quick else "full",
        "recipe": asdict(recipe),
        "rounds": recipe.rounds,
        "clinics": args.clinics,
        "fedprox_mu": args.mu,
        "data": str(args.data),
        "split": {
            "train": len(split.train),
            "validation": len(split.validation),
            "test": len(split.test),
            "test_counts": class_counts(split.test).tolist(),
        },
        "throughput": throughput,
        "rows": [
            {
                **asdict(r),
                "row": asdict(r.row),
                "delta_norm_median": (float(np.median(r.delta_norms)) if r.delta_norms else None),
                "delta_norm_max": float(max(r.delta_norms)) if r.delta_norms else None,
            }
            for r in results
        ],
        "best_federated_checkpoint": str(best[1]) if best else None,
        "total_seconds": total,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
    }
    (out / "results.json").write_text(
        json.dumps(summary, indent=1, default=float) + "\n", encoding="utf-8"
    )
    log("\n" + table)
    log(f"total {total / 60:.1f} min; results in {out}")
    log_file.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
