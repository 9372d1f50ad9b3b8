"""The receive side of a connection, sans-IO: bytes in, whole messages out.

Goals and costs, for whoever changes it:

* Bytes land in one buffer, either copied in (`feed`) or received straight
  into it (`get_buffer`, then `advance`, as an asyncio.BufferedProtocol does):
  no intermediate bytes objects per receive.
* Frames are taken from a moving offset, so taking one costs one slice copy
  of that frame (the message owns the copy; bulk data in it is a view into
  it, never copied again). The unparsed tail moves to the front only when
  free space runs short: amortised, each byte moves at most once per buffer
  length received.
* The buffer starts at 256 KiB and grows (doubling) with what arrives of a
  large frame, never ahead of it: a peer that claims a huge frame and sends
  little costs little. After a frame over SHRINK_ABOVE, once drained, it
  shrinks back. So memory per connection is bounded by about twice the
  largest frame a peer has actually sent, and a length over the limit is
  refused before any growth.
* A large frame (OWN_FRAME_MIN to OWN_FRAME_MAX bytes, a job's bulk data)
  is received into a buffer of its own once its length is known: what
  arrived of it is copied there, the rest lands there straight from the
  socket, and the message takes that buffer with no slice copy. The frame
  ends on a page boundary, so bulk data at its end (a write's) is
  page-aligned and goes to an O_DIRECT file without another copy. Frames
  larger still take the shared buffer's path, whose growth follows the data.
  After a large frame the next receive asks for a length only (4 bytes), so
  that the next frame, when large too, lands in its own buffer whole.
* A frame that is short, too long or does not decode raises ProtocolError;
  the caller closes the connection. Nothing here ever blocks.
* With `hello_limit`, frames over HELLO_MAX_FRAME are refused until the
  owner calls `unlimit` (a downstairs, once negotiation is done): a stranger
  cannot make a buffer grow. `greeted` says a valid message has arrived;
  before that, `first_bytes` tells what a peer speaking another protocol sent.
"""

from __future__ import annotations

import mmap
from typing import Final

from crucible.common.buffer import Buffer
from crucible.libc import address, raw_bytearray
from crucible.protocol.codec import decode_body
from crucible.protocol.messages import MAX_FRAME_LEN, Message
from crucible.protocol.wire import U32, ProtocolError

HELLO_MAX_FRAME: Final = 64 << 10  # frames a peer may send before negotiation is done


SIZE: Final = 256 << 10
MIN_FREE: Final = 64 << 10  # offered to each receive
SHRINK_ABOVE: Final = 16 * SIZE
OWN_FRAME_MIN: Final = 128 << 10
OWN_FRAME_MAX: Final = 4 << 20
_PAGE: Final = mmap.PAGESIZE


class FrameDecoder:
    def __init__(self, max_frame: int = MAX_FRAME_LEN, hello_limit: bool = False) -> None:
        self._buf = bytearray(SIZE)
        self._start = self._end = 0  # unparsed bytes are _buf[_start:_end]
        self._limit = max_frame
        self._max = min(max_frame, HELLO_MAX_FRAME) if hello_limit else max_frame
        self.greeted = False  # a valid message has arrived
        self._frame: memoryview | None = None  # a large frame in a buffer of its own
        self._got = 0  # bytes of it received
        # The last frame taken was large: the next receive brings the next
        # frame's length only, so that a large one lands in its own buffer
        # whole instead of partly in the shared one and copied.
        self._after_large = False

    def unlimit(self) -> None:
        """Negotiation is done: frames up to the full limit from now on."""
        self._max = self._limit

    @property
    def limited(self) -> bool:
        return self._max < self._limit

    def first_bytes(self, n: int = 16) -> bytes:
        """What the peer sent first, while no message has been taken (to say
        what a peer that does not speak the protocol is)."""
        return bytes(self._buf[self._start : min(self._end, self._start + n)])

    def get_buffer(self) -> memoryview:
        """Free space to receive into; say how much arrived with `advance`."""
        if self._frame is None:
            self._own_frame()
        frame = self._filling()
        if frame is not None:
            return frame[self._got :]  # the rest of it, no more
        # Also after a whole large frame not yet taken: what follows it is
        # the next frame's, and goes here.
        self._make_room(MIN_FREE)
        return memoryview(self._buf)[self._end : self._end + self._shared_offer()]

    def owed(self) -> int:
        """The bytes a receive should wait for: the rest of a large frame
        being received into its own buffer, else 1."""
        frame = self._filling()
        return len(frame) - self._got if frame is not None else 1

    def _shared_offer(self) -> int:
        """How much one receive into the shared buffer may bring: less than
        OWN_FRAME_MIN past the end of the frame at the start, so a large
        frame never arrives whole here, and is moved to its own buffer by
        the next get_buffer (only a caller that leaves whole frames untaken
        gives that up, never progress)."""
        avail = self._end - self._start
        if avail < 4 and self._after_large:
            return 4 - avail
        owed = U32.unpack_from(self._buf, self._start)[0] - avail if avail >= 4 else -avail
        return max(owed + OWN_FRAME_MIN - 1, MIN_FREE)

    def _filling(self) -> memoryview | None:
        """The large frame being received into its own buffer, if one is."""
        frame = self._frame
        return frame if frame is not None and self._got < len(frame) else None

    def advance(self, n: int) -> None:
        if self._filling() is not None:
            self._got += n
        else:
            self._end += n

    def feed(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        if self._frame is not None:  # the rest of a large frame first
            k = min(len(view), len(self._frame) - self._got)
            self._frame[self._got : self._got + k] = view[:k]
            self._got += k
            view = view[k:]
        n = len(view)
        self._make_room(n)
        self._buf[self._end : self._end + n] = view
        self._end += n

    def _own_frame(self) -> None:
        """When what is unparsed is the start of one large frame, move it to
        a buffer of its own, placed so that the frame ends on a page."""
        buf, start, end = self._buf, self._start, self._end
        avail = end - start
        if avail < 4:
            return
        (n,) = U32.unpack_from(buf, start)
        if not OWN_FRAME_MIN <= n <= min(self._max, OWN_FRAME_MAX) or avail >= n:
            return
        own = raw_bytearray(n + _PAGE)  # filled whole before it is read
        at = (-(address(own) + n)) % _PAGE
        frame = memoryview(own)[at : at + n]
        frame[:avail] = memoryview(buf)[start:end]
        self._frame, self._got = frame, avail
        self._start = self._end = 0

    def _make_room(self, want: int) -> None:
        """At least `want` free bytes after the end, and room for the rest of
        a frame whose length is already known."""
        buf, start, end = self._buf, self._start, self._end
        avail = end - start
        if avail >= 4:
            (n,) = U32.unpack_from(buf, start)
            if n <= self._max:  # a bad length is refused by next_message
                # The rest of the frame, but at most as much again as has
                # arrived: growth follows the data, not the claim.
                want = max(want, min(n - avail, max(avail, SIZE)))
        if len(buf) - end >= want:
            return
        if start:
            view = memoryview(buf)  # (a bytearray's own slice would be copied twice)
            view[:avail] = view[start:end]
            self._start, self._end = 0, avail
        if len(buf) - avail < want:
            grown = bytearray(max(2 * len(buf), avail + want))
            grown[:avail] = buf[:avail]
            self._buf = grown

    def next_message(self) -> Message | None:
        if self._frame is not None:
            if self._got < len(self._frame):
                return None
            own, self._frame = self._frame, None  # its length was checked when moved
            msg = decode_body(own[4:])
            self.greeted = True
            self._after_large = True
            return msg
        start = self._start
        avail = self._end - start
        if avail < 4:
            if not avail and len(self._buf) > SHRINK_ABOVE:
                self._buf, self._start, self._end = bytearray(SIZE), 0, 0  # after a huge frame
            return None
        (n,) = U32.unpack_from(self._buf, start)
        if n < 8:
            raise ProtocolError(f"frame length {n} is shorter than a header")
        if n > self._max:
            raise ProtocolError(f"frame length {n} exceeds the {self._max}-byte limit")
        if avail < n:
            return None
        frame = self._buf[start + 4 : start + n]  # one copy, owned by this message
        self._after_large = False
        msg = decode_body(memoryview(frame))
        self._start = start + n
        if self._start == self._end:
            self._start = self._end = 0
        self.greeted = True
        return msg
