"""BlockMap against a brute-force model of the dependency rules."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from crucible.upstairs.deps import BlockMap, deps_for_client

ops = st.lists(
    st.tuples(st.sampled_from(["w", "r", "f"]), st.integers(0, 30), st.integers(1, 8)),
    max_size=40,
)


def _model(history: list[tuple[int, str, int, int]], kind: str, start: int, n: int) -> set[int]:
    """The rule written out plainly over the full history since the last flush."""
    blocks = range(start, start + n) if kind != "f" else None
    deps: set[int] = set()
    candidates = []
    for jid, k, s, c in history:
        if k == "f":
            candidates = [(jid, k, s, c)]
            continue
        candidates.append((jid, k, s, c))
    per_block: dict[int, tuple[int | None, list[int]]] = {}
    for jid, k, s, c in candidates:
        span = range(0, 64) if k == "f" else range(s, s + c)
        for b in span:
            last_w, reads = per_block.get(b, (None, []))
            per_block[b] = (jid, []) if k in "wf" else (last_w, [*reads, jid])
    targets = range(0, 64) if blocks is None else blocks
    for b in targets:
        last_w, reads = per_block.get(b, (None, []))
        if kind == "r":
            if last_w is not None:
                deps.add(last_w)
        elif reads:
            deps.update(reads)
        elif last_w is not None:
            deps.add(last_w)
    return deps


@given(ops)
def test_matches_model(seq: list[tuple[str, int, int]]) -> None:
    bm = BlockMap()
    history: list[tuple[int, str, int, int]] = []
    for i, (kind, start, n) in enumerate(seq):
        jid = 1000 + i
        expected = _model(history, kind, start, n)
        if kind == "w":
            got = bm.add_write(jid, start, n)
        elif kind == "r":
            got = bm.add_read(jid, start, n)
        else:
            got = bm.add_barrier(jid)
        assert set(got) == expected, (kind, start, n)
        history.append((jid, kind, start, n))


def test_reads_never_depend_on_reads() -> None:
    bm = BlockMap()
    assert bm.add_read(1, 0, 10) == []
    assert bm.add_read(2, 5, 10) == []
    assert bm.add_write(3, 8, 1) == [1, 2]
    assert bm.add_read(4, 0, 20) == [3]
    assert bm.add_barrier(5) == [1, 2, 4]  # 4 already waits for 3
    assert bm.add_write(6, 100, 1) == [5]
    assert len(bm) <= 3


def test_deps_for_a_client_that_skipped_jobs() -> None:
    table = {10: [5, 6], 6: [2], 11: [10]}
    lookup = table.get
    assert deps_for_client([10, 7], set(), 0, lookup) == [10, 7]  # nothing to rewrite
    assert deps_for_client([10, 7], {3, 6}, 5, lookup) == [10, 7]  # others skipped, none gone
    assert deps_for_client([10, 7], set(), 8, lookup) == [10]  # nothing skipped, 7 gone
    # 10 was skipped: it stands for its own deps; 6 too, down to 2.
    assert deps_for_client([10, 7], {10, 6}, 0, lookup) == [2, 5, 7]
    # A session that began at job 6 never saw 2 or 5.
    assert deps_for_client([10, 7], {10, 6}, 6, lookup) == [7]
    assert deps_for_client([11], {11, 10}, 0, lookup) == [5, 6]
    assert deps_for_client([99], {99}, 0, lookup) == []  # retired: nothing to wait for
