"""``dermafed demo``: a whole federation on one machine, as separate OS processes.

It builds a PKI, splits the data into a lesion-grouped held-out set and non-IID clinic
shards, writes one config per daemon, starts the aggregator and each clinic agent as
its own process on free localhost ports, follows the rounds through the admin API, and
stops everything cleanly (also on Ctrl-C). The ledger, checkpoints, configs and logs stay
in the work dir for inspection.
"""

from __future__ import annotations

import math
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import grpc
from prometheus_client.parser import text_string_to_metric_families

from clinic_agent.config import EvaluationSection
from common import pki
from common.datasets import CLASSES, group_split, load_records
from common.errors import InUseError
from common.fsutil import LOCK_NAME, StateDirLock
from common.model import DP_ARCH, PLAIN_ARCH, RECIPE_PLANS
from common.partition import partition_to_dir, write_index
from common.synthetic import generate_synthetic
from dermafed.admin_client import AdminClient, load_admin_config
from dermafed.v1 import admin_pb2

MARKER = ".dermafed-demo"
FEDERATION = "demo"


# The smallest batch the demo trains with, and how many batches the smallest clinic must
# fill per epoch: the recipe's batch where the clinics are large enough (real data), else
# smaller. On the synthetic clinics (a few hundred images) a DP batch of 64 spent an
# ε_max of 8 in one round (measured: ε 6.4 after round 1, every clinic out by round 3),
# and one of 512 would exceed their data.
DEMO_MIN_BATCH = 32
DEMO_BATCHES_PER_EPOCH = 8


@dataclass
class DemoOptions:
    clinics: int = 3
    rounds: int = 3
    data: Path | None = None
    workdir: Path = Path("dermafed-demo")
    alpha: float = 1.0
    holdout_fraction: float = 0.2
    local_epochs: int = 2
    # None: the measured recipe's, chosen by whether DP is on (see model_arch).
    learning_rate: float | None = None
    arch: str | None = None
    input_size: int | None = None  # None: the recipe's (RECIPE_PLANS)
    aggregation: str = "secure"
    dp: bool = True
    epsilon_max: float = 8.0
    # Clinics score each candidate on their evaluation slices (summed securely).
    federated_evaluation: bool = True
    max_images: int = 0
    seed: int = 0
    round_timeout_s: float = 1800.0
    keep_running: bool = False
    threads_per_clinic: int = 1

    @property
    def model_arch(self) -> str:
        return self.arch or (DP_ARCH if self.dp else PLAIN_ARCH)

    @property
    def model_input_size(self) -> int:
        return self.input_size or RECIPE_PLANS[self.model_arch].input_size

    @property
    def base_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return RECIPE_PLANS[self.model_arch].learning_rate


def demo_batch_size(opts: DemoOptions, shards: Path, clinics: int) -> int:
    """The recipe's batch, capped so the smallest clinic fills a few batches per epoch (of
    what it trains on: its evaluation slice stays out)."""
    recipe = RECIPE_PLANS[opts.model_arch].batch_size
    smallest = min(len(load_records(shards / f"clinic-{i}.csv")) for i in range(1, clinics + 1))
    training = int(smallest * (1.0 - EvaluationSection().fraction))
    return max(DEMO_MIN_BATCH, min(recipe, training // DEMO_BATCHES_PER_EPOCH))


@dataclass
class RoundRow:
    round: int
    outcome: str
    clinics: str
    train_loss: float | None
    accuracy: float | None
    balanced_accuracy: float | None
    mel_sensitivity: float | None
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    gate: str = ""
    # The gate's rule and its reason (the evidence in words), accepted or not.
    gate_rule: str = ""
    gate_reason: str = ""


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def write_toml(path: Path, data: dict[str, object]) -> None:
    """Write a two-level TOML document (top-level keys, then tables)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, table in data.items():
        if isinstance(table, dict):
            lines.append(f"\n[{key}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    path.write_text("\n".join(lines) + "\n")


def prepare_workdir(workdir: Path) -> None:
    try:
        if workdir.exists() and any(workdir.iterdir()) and not (workdir / MARKER).exists():
            raise SystemExit(
                f"dermafed demo: {workdir} exists and is not a demo work dir; "
                "choose another --workdir"
            )
        if (workdir / MARKER).exists():
            _refuse_if_running(workdir)
            for sub in ("pki", "config", "state", "logs", "shards", "data"):
                shutil.rmtree(workdir / sub, ignore_errors=True)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / MARKER).write_text("created by `dermafed demo`; safe to delete\n")
    except OSError as exc:
        raise SystemExit(
            f"dermafed demo: cannot use {workdir} as the work dir: {exc.strerror or exc}; "
            "choose another --workdir"
        ) from None


def _refuse_if_running(workdir: Path) -> None:
    """A `--keep-running` federation still holds its aggregator's state_dir: leave it be."""
    aggregator_state = workdir / "state" / "aggregator"
    if not aggregator_state.is_dir():
        return
    try:
        StateDirLock(aggregator_state, "demo").acquire().release()
    except InUseError:
        holder = (aggregator_state / LOCK_NAME).read_text().split(" ")[0] or "?"
        raise SystemExit(
            f"dermafed demo: a federation from an earlier run is still running in {workdir} "
            f"(aggregator pid {holder}); stop it (Ctrl-C in its terminal) or choose another "
            "--workdir"
        ) from None


def free_port() -> int:
    """A localhost port that is free now (the aggregator binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def build_pki(workdir: Path, clinics: Sequence[str]) -> Path:
    ca_dir = workdir / "pki" / "ca"
    pki.init_ca(FEDERATION, ca_dir)
    pki.issue(
        ca_dir,
        "aggregator",
        "aggregator",
        workdir / "pki" / "aggregator",
        dns=["localhost"],
        ips=["127.0.0.1"],
    )
    for clinic in clinics:
        pki.issue(ca_dir, "clinic", clinic, workdir / "pki" / clinic)
    pki.issue(ca_dir, "admin", "demo-admin", workdir / "pki" / "admin")
    return ca_dir


def write_configs(
    opts: DemoOptions,
    workdir: Path,
    clinics: Sequence[str],
    shards: Path,
    holdout: Path,
    batch_size: int = DEMO_MIN_BATCH,
) -> tuple[Path, list[Path], Path]:
    cfg_dir = workdir / "config"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    pki_dir = workdir / "pki"
    agg_cfg = cfg_dir / "aggregator.toml"
    write_toml(
        agg_cfg,
        {
            "federation": FEDERATION,
            "server": {"listen": "127.0.0.1:0", "port_file": str(workdir / "state" / "port")},
            "tls": {
                "ca_cert": pki_dir / "ca" / "ca.crt",
                "cert": pki_dir / "aggregator" / "aggregator.crt",
                "key": pki_dir / "aggregator" / "aggregator.key",
                "crl": pki_dir / "ca" / "crl.pem",
            },
            "storage": {"state_dir": workdir / "state" / "aggregator"},
            # Prometheus metrics on localhost, so a newcomer can look at what operators see.
            "metrics": {"listen": f"127.0.0.1:{free_port()}"},
            "model": {
                "arch": opts.model_arch,
                "input_size": opts.model_input_size,
                "seed": opts.seed,
            },
            "rounds": {
                "aggregation": opts.aggregation,
                # Secure aggregation needs at least 2 survivors (and 2t > cohort).
                "min_clinics": max(2 if opts.aggregation == "secure" else 1, len(clinics) - 1),
                "start_when_connected": len(clinics),
                "max_rounds": opts.rounds,
                "train_deadline_s": opts.round_timeout_s,
                "seed": opts.seed,
            },
            "plan": {
                "batch_size": batch_size,
                "local_epochs": opts.local_epochs,
                "learning_rate": opts.base_learning_rate,
                # The cosine schedule decays over the demo's own rounds.
                "lr_horizon_rounds": max(1, opts.rounds),
            },
            "validation": {
                "holdout": holdout,
                "federated_evaluation": opts.federated_evaluation,
            },
        },
    )
    agent_cfgs = []
    for i, clinic in enumerate(clinics, start=1):
        path = cfg_dir / f"{clinic}.toml"
        write_toml(
            path,
            {
                "federation": FEDERATION,
                "aggregator": {"address": "localhost:PORT"},
                "tls": {
                    "ca_cert": pki_dir / clinic / "ca.crt",
                    "cert": pki_dir / clinic / f"{clinic}.crt",
                    "key": pki_dir / clinic / f"{clinic}.key",
                },
                "data": {"path": shards / f"clinic-{i}.csv"},
                "storage": {"state_dir": workdir / "state" / clinic},
                "training": {"threads": opts.threads_per_clinic, "seed": opts.seed},
                # Each clinic's privacy officer sets its own budget; DP-SGD by default.
                "privacy": {"mode": "dp-sgd", "epsilon_max": opts.epsilon_max}
                if opts.dp
                else {"mode": "off"},
                "network": {"poll_wait_s": 5.0, "backoff_max_s": 5.0},
                # Its training progress, which the demo prints while the clinics train.
                "metrics": {"listen": f"127.0.0.1:{free_port()}"},
            },
        )
        agent_cfgs.append(path)
    admin_cfg = cfg_dir / "admin.toml"
    write_toml(
        admin_cfg,
        {
            "federation": FEDERATION,
            "aggregator": {"address": "localhost:PORT"},
            "tls": {
                "ca_cert": pki_dir / "admin" / "ca.crt",
                "cert": pki_dir / "admin" / "demo-admin.crt",
                "key": pki_dir / "admin" / "demo-admin.key",
            },
        },
    )
    return agg_cfg, agent_cfgs, admin_cfg


def _set_port(paths: Sequence[Path], port: int) -> None:
    for path in paths:
        path.write_text(path.read_text().replace("localhost:PORT", f"localhost:{port}"))


class Federation:
    """The demo's child processes; stopping it always reaps every child."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._logs: list[TextIO] = []

    def spawn(self, name: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
        log_dir = self.workdir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log = open(log_dir / f"{name}.log", "w")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        proc = subprocess.Popen(
            [sys.executable, "-m", "dermafed.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            # Own process group: a Ctrl-C in the terminal reaches only the demo, which
            # then stops the children in order.
            start_new_session=True,
        )
        self.procs.append((name, proc))
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs:
            code = proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"{name} exited with code {code}; see {self.workdir / 'logs' / (name + '.log')}"
                )

    def stop(self, timeout: float = 20.0) -> None:
        # Agents first, so the aggregator does not log them as vanished mid-round.
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _name, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()


def _row(rs: admin_pb2.RoundSummary) -> RoundRow:
    m = rs.metrics
    has_metrics = m.examples > 0
    return RoundRow(
        round=rs.round,
        outcome=rs.outcome,
        clinics=f"{len(rs.contributors)}/{len(rs.cohort)}",
        train_loss=rs.train_loss if rs.outcome == "published" else None,
        accuracy=m.accuracy if has_metrics else None,
        balanced_accuracy=m.balanced_accuracy if has_metrics else None,
        mel_sensitivity=m.sensitivity.get("mel") if has_metrics else None,
        seconds=max(0.0, rs.finished_at - rs.started_at),
        stage_seconds=dict(rs.stage_seconds),
        reason=rs.reason,
        gate=rs.gate,
        gate_rule=rs.gate_rule,
        gate_reason=rs.gate_reason,
    )


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


TABLE_HEADER = (
    f"{'round':>5}  {'outcome':<9}  {'gate':<6}  {'clinics':>7}  {'train loss':>10}  "
    f"{'accuracy':>8}  {'bal. acc':>8}  {'mel sens':>8}  {'seconds':>8}"
)


def format_row(row: RoundRow) -> str:
    return (
        f"{row.round:>5}  {row.outcome:<9}  {row.gate or '-':<6}  {row.clinics:>7}  "
        f"{_fmt(row.train_loss):>10}  "
        f"{_fmt(row.accuracy):>8}  {_fmt(row.balanced_accuracy):>8}  "
        f"{_fmt(row.mel_sensitivity):>8}  {row.seconds:>8.1f}"
    )


def prepare_data(opts: DemoOptions, workdir: Path, out: Callable[[str], None]) -> tuple[Path, Path]:
    source = opts.data
    if source is None:
        # Enough images that each clinic's DP budget lasts the demo's rounds.
        source = generate_synthetic(
            workdir / "data" / "synthetic", images_per_class=150, seed=opts.seed
        )
        out(f"data      synthetic lesion-like images (generated, not patient data): {source}")
    else:
        if not source.exists():
            raise SystemExit(f"dermafed demo: --data {source} does not exist")
        out(f"data      {source}")
    if opts.max_images:
        records = load_records(source)
        if len(records) > opts.max_images:
            # A lesion-grouped, class-stratified subset, so the shards stay realistic.
            _, subset = group_split(records, opts.max_images / len(records), opts.seed)
            source = workdir / "data" / "subset.csv"
            source.parent.mkdir(parents=True, exist_ok=True)
            write_index(subset, source)
            out(f"subset    {len(subset)} of {len(records)} images (grouped by lesion)")
    shards = workdir / "shards"
    result = partition_to_dir(
        source,
        shards,
        clinics=opts.clinics,
        alpha=opts.alpha,
        seed=opts.seed,
        holdout_fraction=opts.holdout_fraction,
    )
    holdout = shards / "holdout.csv"
    n_holdout = len(load_records(holdout))
    out(
        f"split     {n_holdout} held-out images (grouped by lesion); clinic shards "
        f"(Dirichlet alpha={opts.alpha}):"
    )
    for i, counts in enumerate(result.counts, start=1):
        mix = " ".join(f"{c}={n}" for c, n in zip(CLASSES, counts, strict=True) if n)
        out(f"          clinic-{i}: {sum(counts):5d} images  {mix}")
    return shards, holdout


def run_demo(opts: DemoOptions, out: Callable[[str], None] = print) -> list[RoundRow]:
    workdir = opts.workdir.resolve()
    prepare_workdir(workdir)
    clinics = [f"clinic-{i}" for i in range(1, opts.clinics + 1)]
    out(
        f"dermafed demo: {opts.clinics} clinics, {opts.rounds} rounds, "
        f"{opts.aggregation} aggregation, work dir {workdir}"
    )
    shards, holdout = prepare_data(opts, workdir, out)
    build_pki(workdir, clinics)
    out(f"pki       federation CA and {len(clinics) + 2} certificates in {workdir / 'pki'}")
    agg_cfg, agent_cfgs, admin_cfg = write_configs(
        opts, workdir, clinics, shards, holdout, demo_batch_size(opts, shards, len(clinics))
    )
    (workdir / "state").mkdir(parents=True, exist_ok=True)
    port_file = workdir / "state" / "port"
    port_file.unlink(missing_ok=True)

    fed = Federation(workdir)
    rows: list[RoundRow] = []
    previous_sigint = signal.getsignal(signal.SIGINT)
    previous_sigterm = signal.getsignal(signal.SIGTERM)

    def _interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # Ctrl-C and a plain `kill` both stop the whole federation cleanly (SIGINT may be
    # ignored when the demo was started in the background by a non-interactive shell).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        fed.spawn("aggregator", ["aggregator", "serve", "--config", str(agg_cfg)])
        port = _wait_for_port(port_file, fed)
        _set_port([*agent_cfgs, admin_cfg], port)
        out(f"aggregator listening on localhost:{port} (mutual TLS); logs in {workdir / 'logs'}")
        metrics_listen = tomllib.loads(agg_cfg.read_text())["metrics"]["listen"]
        out(f"metrics   http://{metrics_listen}/metrics (Prometheus format)")
        for clinic, cfg in zip(clinics, agent_cfgs, strict=True):
            fed.spawn(clinic, ["agent", "run", "--config", str(cfg)])
        out(f"agents    {', '.join(clinics)} started")
        agent_metrics = [
            (clinic, f"http://{tomllib.loads(cfg.read_text())['metrics']['listen']}/metrics")
            for clinic, cfg in zip(clinics, agent_cfgs, strict=True)
        ]
        rows = _follow_rounds(opts, fed, load_admin_config(admin_cfg), out, agent_metrics)
        if opts.keep_running:
            out("")
            out("the federation keeps running (Ctrl-C stops it); drive it from another terminal:")
            out(f"  dermafed admin --config {admin_cfg} status")
            out(f"  dermafed admin --config {admin_cfg} trigger")
            out(f"  dermafed admin --config {admin_cfg} rounds")
            while True:
                fed.check_alive()
                time.sleep(1.0)
    except KeyboardInterrupt:
        out("\ninterrupted: stopping the federation")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        fed.stop()
        signal.signal(signal.SIGINT, previous_sigint)
        signal.signal(signal.SIGTERM, previous_sigterm)
    out(f"ledger    {workdir / 'state' / 'aggregator' / 'ledger.sqlite'}")
    out(f"models    {workdir / 'state' / 'aggregator' / 'checkpoints'}")
    return rows


def _wait_for_port(port_file: Path, fed: Federation, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fed.check_alive()
        if port_file.exists():
            text = port_file.read_text().strip()
            if text.isdigit():
                return int(text)
        time.sleep(0.1)
    raise RuntimeError("the aggregator did not start listening in time")


def _follow_rounds(
    opts: DemoOptions,
    fed: Federation,
    admin_config: object,
    out: Callable[[str], None],
    agent_metrics: Sequence[tuple[str, str]] = (),
) -> list[RoundRow]:
    """Print progress and one table row per finished round, through the admin API (and
    each agent's training progress from its ``/metrics``)."""
    client = AdminClient(admin_config)  # type: ignore[arg-type]
    rows: dict[int, RoundRow] = {}
    last_state = ""
    started = time.monotonic()
    try:
        while True:
            fed.check_alive()
            try:
                st = client.status()
                finished = [r for r in client.rounds(limit=opts.rounds + 10).rounds if r.outcome]
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    time.sleep(0.5)
                    continue
                raise
            # Finished rounds first, then what runs now: the lines come out in order.
            for summary in sorted(finished, key=lambda r: r.round):
                if summary.round in rows:
                    continue
                row = rows[summary.round] = _row(summary)
                out(
                    f"  ... round {row.round}: {row.outcome}"
                    + (
                        f", balanced accuracy {row.balanced_accuracy:.3f}"
                        if row.balanced_accuracy is not None
                        else ""
                    )
                    + (f" ({row.reason})" if row.reason else "")
                )
                if row.gate == "accept" and row.gate_reason:
                    out(f"      gate ({row.gate_rule}): {row.gate_reason}")
            state = ""
            # (A round in ``rows`` finished between the two calls: the next status says more.)
            if st.HasField("current_round") and st.current_round.round not in rows:
                cur = st.current_round
                state = f"round {cur.round}: {cur.state} (cohort {', '.join(cur.cohort)})"
                if cur.state in TRAINING_STAGES:
                    progress = training_progress(agent_metrics, cur.round)
                    if progress:
                        state = f"round {cur.round}: training {progress}"
            elif len(st.connected_clinics) < opts.clinics:
                state = f"waiting for clinics ({len(st.connected_clinics)}/{opts.clinics})"
            if state and state != last_state:
                out(f"  ... {state}")
                last_state = state
            if st.rounds_completed >= opts.rounds and not st.HasField("current_round"):
                clinics = client.clinics().clinics
                break
            if time.monotonic() - started > opts.round_timeout_s * max(1, opts.rounds) + 120:
                raise RuntimeError("the demo did not finish in time")
            time.sleep(0.3)
    finally:
        client.close()
    ordered = [rows[k] for k in sorted(rows)]
    out("")
    out(format_table(ordered))
    total = sum(r.seconds for r in ordered)
    train = sum(r.stage_seconds.get("local_training", 0.0) for r in ordered)
    evaluation = sum(
        v for r in ordered for k, v in r.stage_seconds.items() if k.startswith("evaluate_")
    )
    if total > 0:
        out(
            f"wall time {total:.1f}s in rounds: {train:.1f}s local training (slowest clinic per "
            f"round), {evaluation:.1f}s federated evaluation, {total - train - evaluation:.1f}s "
            "protocol, aggregation, validation and publishing"
        )
    for c in clinics:
        if c.HasField("epsilon_spent"):
            left = f", {c.epsilon_remaining:.2f} left" if c.HasField("epsilon_remaining") else ""
            out(
                f"privacy   {c.clinic}: spent epsilon {c.epsilon_spent:.2f}{left} "
                f"({c.rounds_contributed} round(s), {c.declines} declined)"
            )
    return ordered


# The stages during which clinics train (plain rounds: "train"; secure: the masked input).
TRAINING_STAGES = frozenset({"train", "masked_input"})
PROGRESS_GAUGES = ("dermafed_agent_training_progress_ratio", "dermafed_agent_training_round")


def training_progress(agents: Sequence[tuple[str, str]], round_number: int) -> str:
    """``"40% (clinic-1 60%, clinic-2 20%)"`` from the agents' progress gauges for
    ``round_number``, in steps of 10 %; "" when no agent reports it (yet)."""
    shares = []
    for name, url in agents:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                text = response.read().decode()
        except OSError:
            continue
        values = {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name in PROGRESS_GAUGES
        }
        if values.get("dermafed_agent_training_round") == round_number:
            ratio = values.get("dermafed_agent_training_progress_ratio", 0.0)
            shares.append((name, math.floor(10 * ratio) * 10))
    if not shares:
        return ""
    mean = math.floor(sum(p for _, p in shares) / len(shares) / 10) * 10
    return f"{mean}% (" + ", ".join(f"{n} {p}%" for n, p in shares) + ")"


def format_table(rows: Sequence[RoundRow]) -> str:
    lines = [TABLE_HEADER]
    lines += [format_row(r) + (f"  ({r.reason})" if r.reason else "") for r in rows]
    return "\n".join(lines)
