"""Cancel upload streams that stop making progress.

A stream that has sent its header and then nothing holds an upload slot (one of
``server.max_concurrent_uploads``) and a server worker for as long as its connection
lives; one that never sends its header holds a worker. Each upload stream registers here
and reports every chunk; one that reports nothing for ``stall_s`` seconds is cancelled,
which makes the servicer's read fail, so the upload is abandoned and its slot freed. A
slow but moving upload is never cancelled: any chunk, however small, counts as progress.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

log = logging.getLogger("dermafed.aggregator")


@dataclass
class _Watched:
    context: grpc.RpcContext
    clinic: str
    last_progress: float


class StallWatch:
    def __init__(
        self,
        stall_s: float,
        on_evict: Callable[[str, float], None] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stall_s = stall_s
        self._on_evict = on_evict
        self._clock = clock
        self._lock = threading.Lock()
        self._watched: dict[int, _Watched] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, context: grpc.RpcContext, clinic: str) -> int:
        """Start watching a stream; returns the token for :meth:`progress` and :meth:`done`."""
        token = next(self._ids)
        if self.stall_s <= 0:
            return token
        with self._lock:
            self._watched[token] = _Watched(context, clinic, self._clock())
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="upload-stall-watch", daemon=True
                )
                self._thread.start()
        return token

    def progress(self, token: int) -> None:
        with self._lock:
            entry = self._watched.get(token)
            if entry is not None:
                entry.last_progress = self._clock()

    def done(self, token: int) -> None:
        with self._lock:
            self._watched.pop(token, None)

    def evict_stalled(self) -> list[str]:
        """Cancel every stream idle for ``stall_s``; returns the clinics evicted."""
        now = self._clock()
        with self._lock:
            stalled = [
                (token, w)
                for token, w in self._watched.items()
                if now - w.last_progress >= self.stall_s
            ]
            for token, _ in stalled:
                del self._watched[token]
        for _, w in stalled:
            log.warning(
                "clinic %s's upload made no progress for %.0fs; cancelled to free its slot",
                w.clinic,
                now - w.last_progress,
            )
            w.context.cancel()
            if self._on_evict is not None:
                self._on_evict(w.clinic, now - w.last_progress)
        return [w.clinic for _, w in stalled]

    def _run(self) -> None:
        """Check while anything is watched; the thread ends when nothing is (and a later
        :meth:`watch` starts a new one), so an idle aggregator keeps no thread for this."""
        period = max(0.05, min(1.0, self.stall_s / 4))
        while True:
            time.sleep(period)
            self.evict_stalled()
            with self._lock:
                if not self._watched:
                    self._thread = None
                    return
