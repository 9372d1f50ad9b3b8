"""The upstairs' limits and timers, with their defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from crucible.upstairs.encryption import BlockCipher


@dataclass
class Options:
    read_only: bool = False
    # The volume's key (encryption.py); None: blocks are stored as they are.
    cipher: BlockCipher | None = field(default=None, repr=False)
    tls: bool = False  # the connections are TLS ones (what a lost one may mean)
    # Every read to all three replicas and compared (Rust Crucible's way);
    # otherwise to one, retried on another when it fails.
    read_all_replicas: bool = False
    # The background verify of the replicas, in bytes of the volume per
    # second (each read from all three); 0: off.
    verify_rate: float = 0.0
    flush_timeout: float = 0.5
    ping_interval: float = 5.0
    timeout: float = 45.0
    hello_timeout: float = 10.0  # for YesItsMe: a downstairs answers HereIAm at once
    # A downstairs that completes no job for this long while another does is
    # faulted: it answers pings but has stopped working, or is far behind.
    progress_timeout: float = 10.0
    reconnect_delay: float = 1.0
    max_jobs: int = 1500  # in flight per downstairs before the guest waits
    offline_max_jobs: int = 1000  # held for an offline downstairs before it is faulted
    offline_max_bytes: int = 50 << 20
    # Each downstairs connection may buffer its own copy of what is in flight,
    # and each downstairs holds what it has received and not yet written: the
    # heaps grow to this. Under 1 MiB writes at 32 MiB, crucible-nbd's resident
    # memory peaked at 150 MB and each downstairs' at 92; at 16 MiB, 118 and 76,
    # with as many IOPS, and the pages first touched on the way there cost CPU.
    max_bytes: int = 16 << 20
    barrier_jobs: int = 500  # finished but unretired, before a barrier
    # Retiring sooner keeps the heap smaller: at 64 MiB, crucible-nbd's
    # resident memory peaked at 205 MB under 1 MiB writes, at 16 MiB at 156.
    barrier_bytes: int = 16 << 20
    # With fewer than two downstairs active, how long one that went offline may
    # hold jobs before it is faulted (and flushes fail instead of waiting).
    degraded_timeout: float = 30.0
    log_jobs: bool = True  # a debug line per job (the seed's console output)
