"""Test helpers: a downstairs subprocess on free ports and a blocking protocol client."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import xxhash

from crucible.cli_util import stop_process
from crucible.protocol import codec
from crucible.protocol import messages as m
from crucible.protocol.framing import FrameDecoder
from crucible.region.region import Region

T = TypeVar("T")
WAIT = 120.0  # a guard against hanging in `until`, not a speed limit


async def until(ok: Callable[[], bool], what: str, poll: float = 0.01) -> None:
    """Wait for a condition (tests wait on what they need, never on time)."""
    for _ in range(int(WAIT / poll)):
        if ok():
            return
        await asyncio.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def rss(pid: int) -> int:
    """A process's resident memory, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def states(up: Any) -> list[str]:
    """The state of each downstairs of an Upstairs."""
    return [d.state for d in up.info().downstairs]


BIN = Path(sys.executable).parent
DOWNSTAIRS = str(BIN / "crucible-downstairs")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_start() -> int:
    """Where the kernel starts picking local ports for outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports handed out lately, with their repair ports: a port chosen but not yet
# bound (a --metrics port picked before the cluster starts) is free to the
# kernel, so without this a later pick could take it too.
_GIVEN: collections.deque[int] = collections.deque(maxlen=4096)


def free_port(run: int = 1, step: int = 1) -> int:
    """The first of `run` free ports `step` apart whose repair ports (+4000) are free
    too, all below the ephemeral range, so no outgoing connection takes one later,
    and none of them handed out before by this process."""
    rng = random.Random()
    top = min(_ephemeral_start(), 65536) - 4000 - run * step
    for _ in range(200):
        p = rng.randrange(10000, max(top, 10001))
        ports = [q + r for q in range(p, p + run * step, step) for r in (0, 4000)]
        if not any(q in _GIVEN for q in ports) and all(_bindable(q) for q in ports):
            _GIVEN.extend(ports)
            return p
    raise RuntimeError("no free ports found")


def wait_listening(
    port: int, proc: subprocess.Popen[Any] | None = None, timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"downstairs exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            if proc is not None and proc.poll() is not None:  # someone else answered
                raise RuntimeError(f"downstairs exited with {proc.returncode}")
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port}")


def _tcp_queues() -> dict[tuple[int, int], tuple[int, int]]:
    """(local port, remote port) -> (unacknowledged bytes sent, bytes
    received and not yet read) of each established IPv4 TCP connection
    (/proc/net/tcp)."""
    out = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[3] != "01":  # not ESTABLISHED: a TIME_WAIT one may share the ports
            continue
        tx, rx = (int(x, 16) for x in f[4].split(":"))
        out[(int(f[1].split(":")[1], 16), int(f[2].split(":")[1], 16))] = (tx, rx)
    return out


def wait_reading_begun(sock: socket.socket, sent: int, timeout: float = 30.0) -> None:
    """Until the process at the other end of a loopback TCP connection has
    read some of the `sent` bytes sent on `sock` (a server waiting for the
    rest of a frame need not read all that came of it)."""
    me, peer = sock.getsockname()[1], sock.getpeername()[1]
    deadline = time.monotonic() + timeout
    while True:
        q = _tcp_queues()
        unacked, unread = q.get((me, peer), (0, 0))[0], q.get((peer, me), (0, 0))[1]
        if unacked + unread < sent:
            return
        assert time.monotonic() < deadline, "the peer read none of what was sent"
        time.sleep(0.01)


def create_region(path: Path, *args: str) -> None:
    subprocess.run([DOWNSTAIRS, "create", "-d", str(path), *args], check=True, capture_output=True)


class Downstairs:
    """`crucible-downstairs run` as a subprocess."""

    def __init__(self, region: Path, *extra: str, port: int | None = None) -> None:
        self.region = region
        self.port = port or free_port()
        self.log_path = region.parent / f"{region.name}.{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [DOWNSTAIRS, "run", "-d", str(region), "-p", str(self.port), "-a", "127.0.0.1", *extra],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_listening(self.port, self.proc)

    @property
    def repair_port(self) -> int:
        return self.port + 4000

    def output(self) -> str:
        return self.log_path.read_text()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        code = stop_process(self.proc, sig)
        self._log.close()
        return code


@contextlib.contextmanager
def downstairs(region: Path, *extra: str) -> Iterator[Downstairs]:
    ds = Downstairs(region, *extra)
    try:
        yield ds
    finally:
        ds.stop()


class Client:
    """A blocking upstairs-side connection, for driving a downstairs in tests."""

    def __init__(
        self, port: int, gen: int = 1, read_only: bool = False, upstairs_id: uuid.UUID | None = None
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.decoder = FrameDecoder()
        self.upstairs_id = upstairs_id or uuid.uuid4()
        self.session_id = uuid.uuid4()
        self.gen = gen
        self.read_only = read_only
        self.next_job = 1000

    def close(self) -> None:
        self.sock.close()

    def send(self, msg: m.Message) -> None:
        self.sock.sendall(codec.encode(msg))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> m.Message | None:
        """The next message, or None once the downstairs has closed the connection."""
        while True:
            msg = self.decoder.next_message()
            if msg is not None:
                return msg
            try:
                data = self.sock.recv(1 << 20)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.decoder.feed(data)

    def expect(self, kind: type[T]) -> T:
        msg = self.recv()
        assert isinstance(msg, kind), f"expected {kind.__name__}, got {msg!r}"
        return msg

    def closed_by_peer(self) -> bool:
        """Drain until EOF; True when the peer closed (any messages are discarded)."""
        while self.recv() is not None:
            pass
        return True

    def hello(self) -> m.Message | None:
        self.send(
            m.HereIAm(13, self.upstairs_id, self.session_id, self.gen, self.read_only, False, [])
        )
        return self.recv()

    def promote(self) -> m.Message | None:
        self.send(m.PromoteToActive(self.upstairs_id, self.session_id, self.gen))
        return self.recv()

    def negotiate(self) -> m.ExtentVersions:
        assert isinstance(self.hello(), m.YesItsMe)
        assert isinstance(self.promote(), m.YouAreNowActive)
        self.send(m.RegionInfoPlease())
        self.expect(m.RegionInfo)
        self.send(m.ExtentVersionsPlease())
        return self.expect(m.ExtentVersions)

    def job_id(self) -> int:
        self.next_job += 1
        return self.next_job - 1

    def write_msg(
        self,
        start: int,
        data: bytes,
        deps: list[int] | None = None,
        job_id: int | None = None,
        block_size: int = 512,
    ) -> m.Write:
        return m.Write(
            self.upstairs_id,
            self.session_id,
            self.job_id() if job_id is None else job_id,
            deps or [],
            start,
            contexts_for(data, block_size),
            data,
        )

    def write(self, start: int, data: bytes, block_size: int = 512) -> m.Message | None:
        self.send(self.write_msg(start, data, block_size=block_size))
        return self.recv()

    def flush(self, flush_number: int, deps: list[int] | None = None) -> m.Message | None:
        self.send(
            m.Flush(
                self.upstairs_id,
                self.session_id,
                self.job_id(),
                deps or [],
                flush_number,
                self.gen,
                None,
                None,
            )
        )
        return self.recv()

    def read(self, start: int, count: int, deps: list[int] | None = None) -> m.Message | None:
        self.send(
            m.ReadRequest(
                self.upstairs_id, self.session_id, self.job_id(), deps or [], start, count
            )
        )
        return self.recv()


def contexts_for(data: bytes, block_size: int = 512) -> list[m.BlockContext]:
    return [
        m.BlockContext(xxhash.xxh64_intdigest(data[i : i + block_size]))
        for i in range(0, len(data), block_size)
    ]


def on_memory_fs(path: Path) -> bool:
    """Whether `path` is on tmpfs or ramfs, whose pages are the file itself."""
    at, best, kind = f"{path.resolve()}/", "", ""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mount, fstype = line.split()[:3]
        if at.startswith(mount.rstrip("/") + "/") and len(mount) >= len(best):
            best, kind = mount, fstype
    return kind in ("tmpfs", "ramfs")


def drop_page_cache(path: Path, sync: bool = True) -> None:
    """Evict a file's pages, or those of every file under a directory, from
    the page cache, so the next read waits for the disk. Without `sync` only
    the clean pages go: the dirty ones stay."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            if sync:
                os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def pattern(block: int, version: int, block_size: int = 512) -> bytes:
    """Deterministic, distinct content for (block, version)."""
    head = f"block {block} version {version} ".encode()
    return (head * (block_size // len(head) + 1))[:block_size]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    return subprocess.run(
        [DOWNSTAIRS, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


class Cluster:
    """Three regions and three downstairs processes serving them."""

    def __init__(
        self,
        base: Path,
        *create_args: str,
        regions: list[Path] | None = None,
        log_jobs: bool = False,
        run_args: tuple[str, ...] = (),
    ) -> None:
        """`log_jobs`: the downstairs log every job (else --quiet); `run_args`:
        flags every downstairs runs with."""
        self.regions = regions or [base / f"ds{i}" for i in range(3)]
        self.quiet = (*(() if log_jobs else ("--quiet",)), *run_args)
        for r in self.regions:
            if not (r / "region.json").exists():
                create_region(r, *create_args)
        self.ds: list[Downstairs | None] = [None, None, None]
        self.ports: list[int | None] = [None, None, None]
        self.start()

    def start(self, i: int | None = None, *extra: str) -> None:
        """Start downstairs i (or all); a restarted one keeps its port."""
        for j in range(3) if i is None else [i]:
            if self.ds[j] is None:
                self.ds[j] = Downstairs(self.regions[j], *self.quiet, *extra, port=self.ports[j])
                self.ports[j] = self.ds[j].port  # type: ignore[union-attr]

    def replica_blocks(self, start: int, count: int) -> list[bytes]:
        """The blocks as each of the three regions holds them (read from the
        files: the downstairs must be stopped)."""
        out = []
        for path in self.regions:
            region = Region.open(path, read_only=True)
            out.append(bytes(region.read(start, count)[1]))
            region.close()
        return out

    def stop(self, i: int | None = None, sig: int = signal.SIGTERM) -> None:
        for j in range(3) if i is None else [i]:
            d = self.ds[j]
            if d is not None:
                d.stop(sig)
                self.ds[j] = None

    @property
    def targets(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", p) for p in self.ports if p is not None]

    def target_args(self) -> list[str]:
        return [a for t in self.targets for a in ("-t", f"{t[0]}:{t[1]}")]

    def jobs_logged(self, name: str) -> int:
        """How many jobs of a kind ("Read", "Write", ...) the downstairs logged
        (with log_jobs)."""
        return sum(d.output().count(f" {name} rn:") for d in self.ds if d is not None)

    def dump(self) -> subprocess.CompletedProcess[str]:
        return run_cli("dump", *[a for r in self.regions for a in ("-d", str(r))])


@contextlib.contextmanager
def cluster(base: Path, *create_args: str) -> Iterator[Cluster]:
    c = Cluster(base, *create_args)
    try:
        yield c
    finally:
        c.stop()


def run_tool(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / name), *args], capture_output=True, text=True, timeout=timeout)


GEOMETRY = ("--block-size", "4096", "--extent-size", "256", "--extent-count", "16")


@contextlib.contextmanager
def dsc_fleet(out: Path, *start_args: str) -> Iterator[tuple[str, list[str]]]:
    """Three regions under dsc (`dsc start ... *start_args`): (control address,
    -t arguments)."""
    base = free_port(run=3, step=10)
    r = run_tool("dsc", "create", "--output-dir", str(out), "--port-base", str(base), *GEOMETRY)
    assert r.returncode == 0, r.stderr
    cport = free_port()
    control = f"127.0.0.1:{cport}"
    log = open(out / "dsc.log", "wb")  # noqa: SIM115 - closed below
    dsc = subprocess.Popen(
        [
            BIN / "dsc",
            "start",
            "--output-dir",
            out,
            "--port-base",
            str(base),
            "--control",
            control,
            *start_args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_listening(cport, dsc)
        for i in range(3):
            wait_listening(base + 10 * i)
        yield control, [a for i in range(3) for a in ("-t", f"127.0.0.1:{base + 10 * i}")]
    finally:
        run_tool("dsc", "cmd", "--control", control, "shutdown")
        try:
            dsc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            dsc.kill()
            dsc.wait()
        log.close()


@contextlib.contextmanager
def image_server(image: bytes, busy: int = 0) -> Iterator[tuple[str, list[int]]]:
    """The image over HTTP with ranged GETs; the first `busy` GETs answer 503.
    Yields its URL and the count of GETs answered."""
    gets = [0]

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()

        def do_GET(self) -> None:
            gets[0] += 1
            if gets[0] <= busy:
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            first, last = self.headers["Range"].removeprefix("bytes=").split("-")
            body = image[int(first) : int(last) + 1]
            self.send_response(206)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    with http_server(Handler) as port:
        yield f"http://127.0.0.1:{port}/image.raw", gets


@contextlib.contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    """`handler` served on a loopback port (yielded) by threads of its own."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def get(port: int, path: str, host: str = "127.0.0.1") -> Any:
    """GET a JSON document from an HTTP API on this machine."""
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as r:
        return json.loads(r.read())


def wait_get(
    port: int, path: str, want: Callable[[dict[str, Any]], bool], host: str = "127.0.0.1"
) -> dict[str, Any]:
    """GET until the document is what `want` waits for (bounded by WAIT)."""
    deadline = time.monotonic() + WAIT
    body: dict[str, Any] = get(port, path, host)
    while not want(body):
        assert time.monotonic() < deadline, json.dumps(body, indent=1)
        time.sleep(0.1)
        body = get(port, path, host)
    return body


def qemu_io(export: int | str, *cmds: str, prefix: tuple[str, ...] = ()) -> str:
    """qemu-io commands on an NBD export (its URI, or its port on loopback),
    run under `prefix` (e.g. ip netns exec); every one must succeed."""
    uri = export if isinstance(export, str) else f"nbd://127.0.0.1:{export}/"
    args = [a for c in cmds for a in ("-c", c)]
    r = subprocess.run(
        [*prefix, "qemu-io", "-f", "raw", *args, uri],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "failed" not in r.stdout, r.stdout
    return r.stdout
