"""systemd service notifications (sd_notify) and the watchdog, in pure Python.

The units in ``deploy/systemd`` use ``Type=notify`` and ``WatchdogSec=``: the daemon says
``READY=1`` once it serves, ``STOPPING=1`` when it begins a graceful stop, and
``WATCHDOG=1`` regularly while it is healthy. systemd passes the socket to talk to in
``$NOTIFY_SOCKET`` (a path, or an abstract socket name written with a leading ``@``) and
the watchdog period in ``$WATCHDOG_USEC``. Outside systemd nothing is set and every call
here is a cheap no-op, so the daemons call them unconditionally.

This is the documented datagram protocol (sd_notify(3)) rather than a binding to
libsystemd, so it needs no compiled dependency.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger("dermafed.systemd")

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"


def _socket_address(value: str) -> str | bytes | None:
    """The ``connect``/``sendto`` address for a ``$NOTIFY_SOCKET`` value, or None."""
    if value.startswith("@"):
        # Abstract namespace: the name starts with a NUL byte instead of the '@'.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # Other forms (e.g. "vsock:...") are for VMs, which these daemons do not run in.
    return None


def notify(state: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``, newline-separated assignments) to systemd.

    Returns True when the datagram was sent, False when no notification socket is
    configured or sending failed. Failure never raises: a daemon must keep serving even
    if its supervisor went away.
    """
    environ = os.environ if env is None else env
    value = environ.get(NOTIFY_SOCKET, "")
    if not value:
        return False
    address = _socket_address(value)
    if address is None:
        log.debug("unsupported NOTIFY_SOCKET %r; not notifying", value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("could not notify systemd (%s): %s", value, exc)
        return False
    return True


def ready(status: str = "", *, env: Mapping[str, str] | None = None) -> bool:
    """Tell systemd start-up is complete (``Type=notify`` units leave 'activating')."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""), env=env)


def stopping(status: str = "", *, env: Mapping[str, str] | None = None) -> bool:
    """Tell systemd a graceful stop has begun (so a slow stop is not a hang)."""
    return notify("STOPPING=1" + (f"\nSTATUS={status}" if status else ""), env=env)


def status(text: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Set the one-line status shown by ``systemctl status``."""
    return notify(f"STATUS={text}", env=env)


def watchdog_ping(*, env: Mapping[str, str] | None = None) -> bool:
    """Reset the service watchdog timer."""
    return notify("WATCHDOG=1", env=env)


def watchdog_interval(*, env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog period in seconds when systemd expects pings from this process.

    None when no watchdog is configured, the value is malformed, or ``$WATCHDOG_PID``
    names another process (the variables were inherited, not meant for us).
    """
    environ = os.environ if env is None else env
    usec = environ.get(WATCHDOG_USEC, "")
    if not usec:
        return None
    pid = environ.get(WATCHDOG_PID, "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        micros = int(usec)
    except ValueError:
        log.warning("ignoring malformed %s=%r", WATCHDOG_USEC, usec)
        return None
    if micros <= 0:
        return None
    return micros / 1_000_000


class Watchdog:
    """A daemon thread sending ``WATCHDOG=1`` every ``interval / 2`` while ``healthy()``.

    When ``healthy()`` returns False (or raises) the pings stop, so systemd kills and
    restarts the service once the watchdog period elapses: the fix for a wedged daemon
    is a restart, which only the supervisor can do.
    """

    def __init__(
        self, interval: float, healthy: Callable[[], bool], *, env: Mapping[str, str] | None = None
    ) -> None:
        if not interval > 0:
            raise ValueError(f"watchdog interval must be positive, got {interval!r}")
        self.interval = interval
        self._healthy = healthy
        self._env = env
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self.pings = 0

    @classmethod
    def from_environment(
        cls, healthy: Callable[[], bool], *, env: Mapping[str, str] | None = None
    ) -> Watchdog | None:
        """A started watchdog when systemd configured one for this process, else None."""
        interval = watchdog_interval(env=env)
        if interval is None:
            return None
        watchdog = cls(interval, healthy, env=env)
        watchdog.start()
        return watchdog

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval)

    def _is_healthy(self) -> bool:
        try:
            return bool(self._healthy())
        except Exception:  # a failing check is an unhealthy service, not a dead watchdog
            log.exception("watchdog health check raised")
            return False

    def _run(self) -> None:
        # Ping at once (start-up may have taken a good part of the period), then at half
        # the period, as sd_watchdog_enabled(3) recommends.
        while True:
            if self._is_healthy():
                if watchdog_ping(env=self._env):
                    self.pings += 1
            else:
                log.error("service unhealthy: withholding the watchdog ping so systemd restarts it")
            if self._stop.wait(self.interval / 2):
                return
