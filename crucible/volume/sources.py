"""Read-only sources of blocks a volume can have as its parent: a raw file,
a raw image over HTTP(S) (ranged GETs), or any BlockIO (a read-only region's
upstairs, a whole read-only volume)."""

from __future__ import annotations

import asyncio
import os
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from crucible.upstairs.blockio import BlockIO

URL_TIMEOUT = 60.0


class SourceError(ValueError):
    """A parent that cannot be opened or read; says which and why (a
    ValueError: the commands say it in one line)."""


class Source(ABC):
    """Blocks [0, total_blocks) to read; what lies past the end of the data
    reads as zeros."""

    block_size: int
    total_blocks: int

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def read(self, block: int, count: int) -> bytes: ...

    async def close(self) -> None:
        return None


class FileSource(Source):
    def __init__(self, path: Path, block_size: int) -> None:
        self.path, self.block_size = path, block_size
        self.total_blocks = 0
        self._fd = -1

    async def open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise SourceError(f"parent file {self.path}: {e.strerror}") from None
        size = os.fstat(self._fd).st_size
        self.total_blocks = -(-size // self.block_size)

    async def read(self, block: int, count: int) -> bytes:
        bs = self.block_size
        data = await asyncio.to_thread(os.pread, self._fd, count * bs, block * bs)
        return data.ljust(count * bs, b"\0")

    async def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class UrlSource(Source):
    def __init__(self, url: str, block_size: int) -> None:
        self.url, self.block_size = url, block_size
        self.total_blocks = 0
        self.size = 0
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=URL_TIMEOUT))
        try:
            async with self._session.head(self.url, allow_redirects=True) as r:
                if r.status != 200 or r.content_length is None:
                    raise SourceError(f"parent {self.url}: HEAD answered {r.status}, no length")
                self.size = r.content_length
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            await self.close()
            raise SourceError(f"parent {self.url}: {e or type(e).__name__}") from None
        self.total_blocks = -(-self.size // self.block_size)

    async def read(self, block: int, count: int) -> bytes:
        assert self._session is not None, "read before open"
        bs = self.block_size
        first, last = block * bs, min((block + count) * bs, self.size) - 1
        if last < first:
            return bytes(count * bs)
        headers = {"Range": f"bytes={first}-{last}"}
        try:
            async with self._session.get(self.url, headers=headers) as r:
                if r.status not in (200, 206):
                    raise SourceError(f"parent {self.url}: GET answered {r.status}")
                body = await r.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise SourceError(f"parent {self.url}: {e or type(e).__name__}") from None
        if r.status == 200:  # a server that ignores Range sends the whole
            body = body[first : last + 1]
        if len(body) != last - first + 1:
            raise SourceError(f"parent {self.url}: {len(body)} bytes for {last - first + 1}")
        return body.ljust(count * bs, b"\0")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class DeviceSource(Source):
    """A read-only BlockIO as a parent (a snapshot's region, a volume):
    `opener` activates it, `closer` lets it go."""

    def __init__(
        self,
        device: BlockIO,
        opener: Callable[[], Awaitable[None]],
        closer: Callable[[], Awaitable[None]],
    ) -> None:
        self.device = device
        self.block_size = self.total_blocks = 0
        self._opener, self._closer = opener, closer

    async def open(self) -> None:
        await self._opener()
        self.block_size = self.device.block_size
        self.total_blocks = self.device.total_blocks

    async def read(self, block: int, count: int) -> bytes:
        return await self.device.read(block, count)

    async def close(self) -> None:
        await self._closer()
