"""What the pantry does, apart from HTTP: volumes attached by id, and the
long work on them run as jobs (activation in the background, import from a
URL, scrub, validate) that are polled by id.

An attached volume that was once active and no longer is (another upstairs
with a higher generation took its regions) is never activated again here:
requests on it answer 410 Gone until it is detached.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from crucible.common.errors import CrucibleError, ErrorKind
from crucible.tools.common import activate
from crucible.upstairs.blockio import BlockIO
from crucible.upstairs.guest import Upstairs
from crucible.volume import vcr as v
from crucible.volume.build import VolumeParts, build
from crucible.volume.sources import SourceError

log = logging.getLogger("crucible.pantry")

CHUNK = 512 << 10  # import, validate and bulk IO move at most this much at once
IMPORT_RETRIES = 60
RETRY_DELAY = 1.0
ACTIVATE_TIMEOUT = 60.0
MAX_JOBS = 1000  # kept for polling, finished or not
URL_TIMEOUT = 60.0


class PantryError(Exception):
    """An error with the HTTP status it answers with."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Job:
    id: str
    what: str
    task: asyncio.Task[None]
    progress: int = 0  # bytes done, for the long ones
    total: int = 0

    @property
    def finished(self) -> bool:
        return self.task.done()

    @property
    def error(self) -> str | None:
        if not self.task.done():
            return None
        if self.task.cancelled():
            return "cancelled"
        e = self.task.exception()
        return None if e is None else str(e) or type(e).__name__


@dataclass
class Attached:
    id: str
    request: dict[str, Any]  # the VCR as given, to tell a repeated attach
    parts: VolumeParts
    seen_active: bool = False
    jobs: set[str] = field(default_factory=set)

    @property
    def active(self) -> bool:
        """Every region active (a volume of a parent alone: once attached)."""
        if not self.parts.regions:
            return self.seen_active
        return all(up.info().state == "active" for up, _ in self.parts.regions)


async def activate_exactly(up: Upstairs, gen: int) -> int:
    """A pantry activates at the VCR's generation, as Crucible's: the control
    plane chose it, and a lower one than a running upstairs' is refused."""
    return await activate(up, gen, ACTIVATE_TIMEOUT)


class Pantry:
    def __init__(self) -> None:
        self.volumes: dict[str, Attached] = {}
        self.jobs: dict[str, Job] = {}

    # ---- volumes ---------------------------------------------------------------------

    def volume(self, vid: str) -> Attached:
        a = self.volumes.get(vid)
        if a is None:
            raise PantryError(404, "NotFound", f"no volume {vid} is attached")
        if a.seen_active and not a.active:
            raise PantryError(410, "Gone", f"volume {vid} is no longer active here (taken over)")
        return a

    async def attach(self, vid: str, request: Any) -> None:
        """Attach and activate; the same VCR again is a no-op."""
        old = self.volumes.get(vid)
        if old is not None:
            if old.request != request:
                raise PantryError(409, "Conflict", f"volume {vid} is attached with another VCR")
            self.volume(vid)  # 410 if it was taken over
            return
        a = Attached(vid, request, build(self._parse(request), activate_exactly))
        self.volumes[vid] = a
        try:
            await a.parts.activate(activate_exactly)
        except (CrucibleError, v.VcrError, SourceError, OSError) as e:
            del self.volumes[vid]
            await a.parts.close()
            raise PantryError(400, "ActivationFailed", f"volume {vid}: {e}") from None
        a.seen_active = True
        log.info(
            "volume %s attached: %d bytes",
            vid,
            a.parts.device.total_blocks * a.parts.device.block_size,
        )

    def attach_in_background(self, vid: str, request: Any, job_id: str) -> None:
        self.start_job(job_id, f"attach {vid}", lambda job: self.attach(vid, request))

    async def detach(self, vid: str) -> None:
        a = self.volumes.pop(vid, None)
        if a is None:
            raise PantryError(404, "NotFound", f"no volume {vid} is attached")
        for jid in a.jobs:
            job = self.jobs.get(jid)
            if job is not None and not job.finished:
                job.task.cancel()
        try:
            if a.active:
                await a.parts.deactivate()
        finally:
            await a.parts.close()
        log.info("volume %s detached", vid)

    async def replace(self, vid: str, request: Any) -> None:
        """Crucible's target replace: the new VCR differs from the attached one
        in one target of one region (and perhaps the generations)."""
        a = self.volume(vid)
        parsed = self._parse(request)
        if _parent(parsed) != _parent(self._parse(a.request)):
            raise PantryError(400, "BadRequest", "the read-only parent must stay the same")
        new = v.regions(parsed, parents=False)  # as the attached parts hold them
        if len(new) != len(a.parts.regions):
            raise PantryError(400, "BadRequest", "the new VCR has other regions")
        changed = []
        for (up, r), n in zip(a.parts.regions, new, strict=True):
            assert r is not None
            diff = [(o, t) for o, t in zip(r.opts.target, n.opts.target, strict=True) if o != t]
            changed += [(up, o, t) for o, t in diff]
        if len(changed) != 1:
            raise PantryError(400, "BadRequest", f"{len(changed)} targets differ: replace one")
        up, old_t, new_t = changed[0]
        try:
            await up.replace(old_t, new_t)
        except CrucibleError as e:
            raise PantryError(400, "ReplaceFailed", str(e)) from None
        a.request = request

    @staticmethod
    def _parse(request: Any) -> v.Vcr:
        """A VCR from a request body, parsed and checked."""
        try:
            parsed = v.parse(request)
            v.check(parsed)
            return parsed
        except v.VcrError as e:
            raise PantryError(400, "BadRequest", f"volume_construction_request: {e}") from None

    # ---- IO --------------------------------------------------------------------------

    async def bulk_write(self, vid: str, offset: int, data: bytes) -> None:
        dev = self._io_check(vid, offset, len(data))
        await dev.write(offset // dev.block_size, data)

    async def bulk_read(self, vid: str, offset: int, size: int) -> bytes:
        dev = self._io_check(vid, offset, size)
        return await dev.read(offset // dev.block_size, size // dev.block_size)

    def _io_check(self, vid: str, offset: int, size: int) -> BlockIO:
        dev = self.volume(vid).parts.device
        bs = dev.block_size
        if size > CHUNK:
            raise PantryError(400, "BadRequest", f"at most {CHUNK} bytes at once, not {size}")
        if offset % bs or size % bs:
            raise PantryError(400, "BadRequest", f"offset and size must be multiples of {bs}")
        if offset < 0 or offset + size > dev.total_blocks * bs:
            raise PantryError(400, "BadRequest", "beyond the end of the volume")
        return dev

    async def snapshot(self, vid: str, name: str) -> None:
        try:
            await self.volume(vid).parts.device.flush(snapshot=name)
        except CrucibleError as e:
            raise PantryError(500, "SnapshotFailed", str(e)) from None

    # ---- jobs ------------------------------------------------------------------------

    def start_job(self, job_id: str, what: str, work: Callable[[Job], Awaitable[None]]) -> Job:
        if job_id in self.jobs:
            raise PantryError(409, "Conflict", f"job {job_id} exists already")
        self._make_room()

        async def run() -> None:
            try:
                await work(job)
            except PantryError as e:
                log.error("job %s (%s) failed: %s", job_id, what, e.message)
                raise RuntimeError(e.message) from None
            except (RuntimeError, CrucibleError, OSError, aiohttp.ClientError) as e:
                log.error("job %s (%s) failed: %s", job_id, what, e)
                raise
            log.info("job %s (%s) done", job_id, what)

        job = Job(job_id, what, asyncio.get_running_loop().create_task(run()))
        job.task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
        self.jobs[job_id] = job
        return job

    def _make_room(self) -> None:
        """Jobs whose result nobody asked for are forgotten, oldest first,
        past MAX_JOBS: a client cannot grow the pantry without bound."""
        if len(self.jobs) < MAX_JOBS:
            return
        done = [jid for jid, j in self.jobs.items() if j.finished]  # (in creation order)
        if not done:
            raise PantryError(503, "TooManyJobs", f"{len(self.jobs)} jobs are running")
        for jid in done[: len(self.jobs) - MAX_JOBS + 1]:
            del self.jobs[jid]

    def volume_job(
        self, vid: str, what: str, work: Callable[[Attached, Job], Awaitable[None]]
    ) -> str:
        a = self.volume(vid)
        jid = str(uuid.uuid4())
        self.start_job(jid, f"{what} {vid}", lambda job: work(a, job))
        a.jobs.add(jid)
        return jid

    def job(self, jid: str) -> Job:
        job = self.jobs.get(jid)
        if job is None:
            raise PantryError(404, "NotFound", f"no job {jid}")
        return job

    async def wait_job(self, jid: str) -> Job:
        job = self.job(jid)
        await asyncio.wait([job.task])
        self.jobs.pop(jid, None)  # its result has been told
        return job

    # ---- the long ones ---------------------------------------------------------------

    async def import_from_url(self, a: Attached, job: Job, url: str, sha256: str | None) -> None:
        dev = a.parts.device
        bs, capacity = dev.block_size, dev.total_blocks * dev.block_size
        digest = hashlib.sha256()
        timeout = aiohttp.ClientTimeout(total=URL_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            size = await _retrying(lambda: _head(session, url), url)
            if size > capacity:
                raise RuntimeError(f"{url} is {size} bytes, more than the volume's {capacity}")
            job.total = size
            for off in range(0, size, CHUNK):
                n = min(CHUNK, size - off)
                get = functools.partial(_get_range, session, url, off, n)
                data: bytes = await _retrying(get, url)
                digest.update(data)
                if len(data) % bs:  # the image's last partial block: the rest stays zeros
                    data += bytes(bs - len(data) % bs)
                await dev.write(off // bs, data)
                job.progress = off + n
        await dev.flush()
        if sha256 is not None and digest.hexdigest() != sha256.lower():
            raise RuntimeError(f"{url}: sha256 {digest.hexdigest()}, expected {sha256}")

    async def validate(self, a: Attached, job: Job, sha256: str, size: int | None) -> None:
        dev = a.parts.device
        bs = dev.block_size
        total = dev.total_blocks * bs if size is None else size
        if total > dev.total_blocks * bs or total % bs:
            raise RuntimeError(
                f"cannot validate {total} bytes of a {dev.total_blocks * bs}-byte volume"
            )
        job.total = total
        digest = hashlib.sha256()
        for off in range(0, total, CHUNK):
            n = min(CHUNK, total - off)
            digest.update(await dev.read(off // bs, n // bs))
            job.progress = off + n
        if digest.hexdigest() != sha256.lower():
            raise RuntimeError(f"sha256 {digest.hexdigest()}, expected {sha256}")

    async def scrub(self, a: Attached, job: Job) -> None:
        vol = a.parts.volume
        vol.start_scrub()
        while vol.parent is not None and not vol.scrub_error:
            job.progress, job.total = vol.scrub_point, vol.parent_blocks
            await asyncio.sleep(0.2)
        if vol.scrub_error:
            raise RuntimeError(f"scrub: {vol.scrub_error}")


class _Retry(Exception):
    """A URL that may answer if asked again (503, 429, a timeout)."""


async def _retrying(attempt: Callable[[], Awaitable[Any]], url: str) -> Any:
    for n in range(IMPORT_RETRIES):
        try:
            return await attempt()
        except (_Retry, TimeoutError, aiohttp.ServerTimeoutError) as e:
            if n == IMPORT_RETRIES - 1:
                raise RuntimeError(f"{url}: gave up after {IMPORT_RETRIES} tries: {e}") from None
            log.info("%s: %s; trying again", url, e or "timed out")
            await asyncio.sleep(RETRY_DELAY)
    raise AssertionError("unreachable")


def _check(resp: aiohttp.ClientResponse, url: str) -> None:
    if resp.status in (429, 503):
        raise _Retry(f"answered {resp.status}")
    if resp.status not in (200, 206):
        raise RuntimeError(f"{url} answered {resp.status}")


async def _head(session: aiohttp.ClientSession, url: str) -> int:
    async with session.head(url, allow_redirects=True) as r:
        _check(r, url)
        if r.content_length is None:
            raise RuntimeError(f"{url} gives no Content-Length")
        return r.content_length


async def _get_range(session: aiohttp.ClientSession, url: str, off: int, n: int) -> bytes:
    async with session.get(url, headers={"Range": f"bytes={off}-{off + n - 1}"}) as r:
        _check(r, url)
        if r.content_length not in (None, n):
            if r.status == 200:  # the whole image: never read into memory
                raise RuntimeError(f"{url} does not answer ranged GETs")
            raise _Retry(f"{r.content_length} bytes for {n}")
        body = await r.content.read(n + 1)
        while len(body) < n and (more := await r.content.read(n + 1 - len(body))):
            body += more
    if len(body) != n:
        raise _Retry(f"{len(body)} bytes for {n}")
    return body


def decode_data(text: Any) -> bytes:
    if not isinstance(text, str):
        raise PantryError(400, "BadRequest", "base64_encoded_data must be a string")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise PantryError(400, "BadRequest", "base64_encoded_data is not base64") from None


def crucible_error(e: CrucibleError) -> PantryError:
    kind = ErrorKind.GenerationNumberInvalid
    return PantryError(400 if e.kind is kind else 500, e.kind.name, str(e))


def _parent(vcr: v.Vcr) -> v.Vcr | None:
    return vcr.read_only_parent if isinstance(vcr, v.VolumeVcr) else None
