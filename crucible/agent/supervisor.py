"""One downstairs process per region the agent serves, kept running.

Each runs in a session of its own, so it outlives the agent: restarting the
agent (an upgrade, a crash) does not interrupt the volumes. The agent records
each process's pid and start time; when it starts again it adopts every
process it finds alive under the same pid, start time and command line, and
starts the ones it does not. A process that exits is started again after a
delay that doubles each time it fails soon after starting, and the log says
why it went (its exit status and the last line it wrote).

Exits are seen through pidfds, so an adopted process (not the agent's child)
is watched as closely as one it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from crucible.agent.store import ProcessRecord, Store

log = logging.getLogger("crucible.agent")

FIRST_DELAY = 0.5
MAX_DELAY = 30.0
STABLE = 60.0  # a process that ran this long starts over from FIRST_DELAY
STOP_GRACE = 10.0  # after SIGTERM, before SIGKILL
MAX_LOG = 16 << 20  # a downstairs log is rotated (one old copy) past this


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks after boot; None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and ')': the fields follow the last ')'.
    return int(stat.rpartition(")")[2].split()[19])


def command_line(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def _same_command(found: list[str], argv: list[str]) -> bool:
    """A process's command line `found` runs `argv` (an interpreter may stand
    before a script)."""
    return len(found) >= len(argv) and found[len(found) - len(argv) + 1 :] == argv[1:]


def _pids() -> list[int]:
    return [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()]


def _last_line(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [x for x in f.read().decode(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


async def _exited(pidfd: int) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def ready() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(pidfd, ready)
    try:
        await done
    finally:
        loop.remove_reader(pidfd)


@dataclass
class Managed:
    key: str
    argv: list[str]
    log_path: Path
    pid: int | None = None
    child: subprocess.Popen[bytes] | None = None  # None when adopted
    restarts: int = 0
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class Supervisor:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.managed: dict[str, Managed] = {}
        # While the agent starts: every process then running, with its command line.
        self._running: list[tuple[int, list[str]]] | None = None

    @property
    def running(self) -> int:
        return sum(1 for m in self.managed.values() if m.pid is not None)

    @property
    def restarts(self) -> int:
        return sum(m.restarts for m in self.managed.values())

    async def ensure(self, key: str, argv: list[str], log_path: Path) -> None:
        """Keep `argv` running under `key` (a different command replaces the old)."""
        m = self.managed.get(key)
        if m is not None and m.argv == argv:
            return
        if m is not None:
            log.info("%s: its command changed; restarting it", key)
            await self.stop(key)
        m = Managed(key, argv, log_path)
        self.managed[key] = m
        m.task = asyncio.create_task(self._keep(m, self._adopt(m)))

    @contextlib.contextmanager
    def adopting_unrecorded(self) -> Iterator[None]:
        """While the agent starts: a downstairs it started and died before
        recording is found by its command line, in one look at the processes
        (later, every downstairs it starts is recorded first)."""
        self._running = [(pid, command_line(pid)) for pid in _pids()]
        try:
            yield
        finally:
            self._running = None

    async def stop(self, key: str) -> None:
        """Stop the process under `key` (recorded ones too) and forget it."""
        m = self.managed.pop(key, None)
        child = None
        if m is not None:
            child = m.child
            if m.task is not None:
                m.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await m.task
        rec = self.store.processes.get(key)
        if rec is not None:
            await _terminate(rec.pid, rec.start_time, child)
            self.store.drop_process(key)

    async def stop_strays(self, expected: set[str]) -> None:
        """Stop recorded processes the state no longer wants (after a restart)."""
        for key in [k for k in self.store.processes if k not in expected]:
            log.info("%s: no longer wanted; stopping its downstairs", key)
            await self.stop(key)

    async def close(self) -> None:
        """Stop watching; the processes keep running (the next agent adopts them)."""
        for m in self.managed.values():
            if m.task is not None:
                m.task.cancel()
        for m in self.managed.values():
            if m.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await m.task

    # ---- one process ------------------------------------------------------------------

    async def _keep(self, m: Managed, adopted: bool) -> None:
        delay = FIRST_DELAY
        while True:
            began = time.monotonic()
            try:
                if not adopted:
                    self._start(m)
                await self._watch(m)
            except OSError as e:  # it could not be started at all
                log.error("%s: cannot start its downstairs: %s", m.key, e.strerror or e)
            adopted = False
            if time.monotonic() - began >= STABLE:
                delay = FIRST_DELAY
            m.restarts += 1
            log.info("%s: starting it again in %g s", m.key, delay)
            await asyncio.sleep(delay)
            delay = min(MAX_DELAY, delay * 2)

    def _adopt(self, m: Managed) -> bool:
        """Take over the downstairs already running for `m`: the recorded one,
        or (if the agent died before recording it) one found by its command."""
        rec = self.store.processes.get(m.key)
        if rec is not None and start_time(rec.pid) == rec.start_time:
            if not _same_command(command_line(rec.pid), m.argv):  # ours, an old command: replace it
                log.info("%s: its downstairs (pid %d) runs an old command; replacing it",
                         m.key, rec.pid)  # fmt: skip
                _kill_now(rec.pid)
                return False
            pid = rec.pid
        else:
            found = [p for p, cmd in self._running or () if _same_command(cmd, m.argv)]
            if not found:
                return False
            pid = found[0]
            started = start_time(pid)
            if started is None:
                return False
            self.store.put_process(m.key, ProcessRecord(pid, started))
        m.pid = pid
        log.info("%s: adopted its running downstairs (pid %d)", m.key, pid)
        return True

    def _start(self, m: Managed) -> None:
        m.log_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            if m.log_path.stat().st_size > MAX_LOG:
                m.log_path.replace(m.log_path.with_name(m.log_path.name + ".1"))
        with m.log_path.open("ab") as out:
            m.child = subprocess.Popen(
                m.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        m.pid = m.child.pid
        started = start_time(m.pid)
        if started is not None:
            self.store.put_process(m.key, ProcessRecord(m.pid, started))
        log.info("%s: started downstairs (pid %d): %s", m.key, m.pid, " ".join(m.argv[1:]))

    async def _watch(self, m: Managed) -> None:
        assert m.pid is not None
        try:
            pidfd = os.pidfd_open(m.pid)
        except ProcessLookupError:
            pidfd = None
        if pidfd is not None:
            try:
                await _exited(pidfd)
            finally:
                os.close(pidfd)
        why = "exited"
        if m.child is not None:
            code = m.child.wait()
            why = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited {code}"
        last = _last_line(m.log_path)
        log.warning("%s: downstairs (pid %d) %s%s", m.key, m.pid, why,
                    f"; its last words: {last}" if last else "")  # fmt: skip
        m.pid, m.child = None, None


def _kill_now(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


async def _terminate(pid: int, started: int | None, child: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL after a grace period; only if `pid` is still the
    process that started at `started`."""
    if started is None or start_time(pid) != started:
        return
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(_exited(pidfd), STOP_GRACE)
        except TimeoutError:
            log.warning("pid %d outlived SIGTERM by %g s; killing it", pid, STOP_GRACE)
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            await _exited(pidfd)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)
        if child is not None:
            child.wait()
