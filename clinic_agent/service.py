"""Run the clinic agent as a daemon: metrics endpoint, signals, graceful stop."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from prometheus_client import CollectorRegistry

from clinic_agent.config import ClinicConfig
from clinic_agent.daemon import ClinicAgent
from clinic_agent.metrics import AgentMetrics
from common import systemd
from common.listen import start_metrics_server

log = logging.getLogger("dermafed.agent")


def run_agent_forever(config: ClinicConfig) -> int:
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry)
    stop = threading.Event()
    agent = ClinicAgent(config, metrics=metrics, stop=stop)
    if config.metrics.listen:
        try:
            start_metrics_server(config.metrics.listen, registry)
        except BaseException:
            agent.close()
            raise

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received signal %d, stopping after the current step", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    systemd.ready(f"clinic {agent.clinic_id}: polling {config.aggregator.address}")
    # Pings come from a helper thread; local training holds the main loop for minutes,
    # so this detects a hung process, not a slow round.
    watchdog = systemd.Watchdog.from_environment(lambda: not stop.is_set())
    try:
        agent.run()
    finally:
        systemd.stopping()
        if watchdog is not None:
            watchdog.stop()
        agent.close()
    log.info("agent %s stopped", agent.clinic_id)
    return 0
