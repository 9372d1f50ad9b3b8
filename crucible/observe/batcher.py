"""The queue between the IO path and the thread that sends spans.

Compiled with the IO path (scripts/compile): every traced job adds to it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Final

from crucible.observe.spans import SpanRecord

log = logging.getLogger("crucible.tracing")

MAX_QUEUE: Final = 20_000  # spans waiting to be sent, at most (more are dropped, counted)
BATCH: Final = 512  # spans sent at once, at most
SEND_EVERY: Final = 0.5  # seconds between sends, at most, while spans wait

Send = Callable[[list[SpanRecord]], bool]


class Batcher:
    """Spans queued by the IO path and sent by a thread of their own, in
    batches, every half second or sooner when a batch is full. Never raises
    and never blocks the IO path: a full queue drops spans (counted); a
    collector that is down is said once, then nothing until it answers."""

    def __init__(self, send: Send, endpoint: str) -> None:
        self.send = send
        self.endpoint = endpoint
        self.queue: deque[SpanRecord] = deque()
        self.dropped = 0  # spans the full queue turned away
        self.sent = 0  # spans the endpoint took
        self.failing = False
        self._wake = threading.Event()
        self._stop = False
        self._sender = threading.Thread(target=self._run, name="span-sender", daemon=True)
        self._sender.start()

    def add(self, record: SpanRecord) -> None:
        q = self.queue
        if len(q) >= MAX_QUEUE:
            if not self.dropped:
                log.warning(
                    "traces: %d spans wait to be sent to %s; dropping new ones while they do",
                    len(q),
                    self.endpoint,
                )
            self.dropped += 1
            return
        q.append(record)
        if len(q) == BATCH:
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(SEND_EVERY)
            self._wake.clear()
            self._drain()
            if self._stop:
                return

    def _drain(self) -> None:
        q = self.queue
        while q:
            batch = [q.popleft() for _ in range(min(BATCH, len(q)))]
            try:
                ok, why = self.send(batch), "the collector did not take them"
            except Exception as e:  # an exporter's bug or a network error it let through
                ok, why = False, str(e) or type(e).__name__
            if ok:
                self.sent += len(batch)
                if self.failing:
                    self.failing = False
                    log.info("traces reach %s again", self.endpoint)
            elif not self.failing:
                self.failing = True
                log.warning(
                    "traces are not reaching %s (%s); dropping them until it answers",
                    self.endpoint,
                    why,
                )

    def close(self, timeout: float) -> None:
        """Send what is queued, waiting at most `timeout` seconds."""
        self._stop = True
        self._wake.set()
        self._sender.join(timeout)
