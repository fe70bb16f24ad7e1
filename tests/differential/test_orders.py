"""The file rules on hand-made arrivals (no servers): what a rule reports when the entrance's records break it.

The live checks of the rules are in test_differential.py; here a rule is fed the records a defect would leave.
"""

from __future__ import annotations

from collections import Counter

from tests.differential.arrivals import Arrival
from tests.differential.orders import head_starts, sha256_before_placed

SHA_A = "a" * 64
SHA_B = "b" * 64
RUN = "server-run-0"
MiB = 1024 * 1024


def _upload(*, begun_with: str | None, patches: list[tuple[float, str | None]], placed_at: float, placed: str):
    """A create of 3 MiB (sha256 `begun_with`), PATCHes of 1 MiB in order (started at, Bridge-Upload-Sha256 or
    None) and the placing."""
    out = [
        Arrival("create", 0.0, 0.1, 201, run=RUN, path="weights/last.pt", sha256=begun_with, upload="u1", size=3 * MiB)
    ]
    out += [
        Arrival("patch", at, at + 0.1, 204, upload="u1", announced=sha, offset=i * MiB, size=MiB, received=MiB)
        for i, (at, sha) in enumerate(patches)
    ]
    out.append(
        Arrival("placed", placed_at, placed_at + 0.1, 200, run=RUN, path="weights/last.pt", sha256=placed, upload="u1")
    )
    return out


def test_a_head_start_whose_later_part_announced_the_placed_sha256_keeps_the_rule():
    tally: Counter = Counter()
    arrivals = _upload(begun_with=None, patches=[(1.0, None), (2.0, SHA_A)], placed_at=2.05, placed=SHA_A)
    assert sha256_before_placed(arrivals, {RUN: 0}, tally) == []
    assert tally["sha256-before-placed"] == 1
    assert head_starts(arrivals) == (1, 1, MiB)  # the part without the sha256 went while the copy went on


def test_a_head_start_placed_with_no_part_announcing_a_sha256_breaks_the_rule():
    # The header came only after the placing began (on a part sent again): too late.
    arrivals = _upload(begun_with=None, patches=[(1.0, None), (2.0, None), (3.0, SHA_A)], placed_at=2.05, placed=SHA_A)
    (found,) = sha256_before_placed(arrivals, {RUN: 0})
    assert found.startswith("rule sha256-before-placed: run 0 weights/last.pt (upload u1, begun without a sha256)")
    assert "placed with no PATCH announcing its sha256 before" in found


def test_a_head_start_whose_completing_part_named_no_sha256_breaks_the_rule():
    # The entrance refuses that part (400) and nothing is placed: only this record shows the head start sent it.
    arrivals = _upload(begun_with=None, patches=[(1.0, None), (2.0, None), (3.0, None)], placed_at=9.0, placed=SHA_A)
    arrivals[3].status = 400
    arrivals.pop()  # not placed
    (found,) = sha256_before_placed(arrivals, {RUN: 0})
    assert "a PATCH of bytes 2097152-3145728 of 3145728, which could complete the file, announced no sha256" in found
    assert "(answered 400)" in found


def test_a_head_start_placed_with_other_bytes_than_announced_breaks_the_rule():
    arrivals = _upload(begun_with=None, patches=[(1.0, SHA_B), (2.0, SHA_A)], placed_at=2.05, placed=SHA_A)
    (found,) = sha256_before_placed(arrivals, {RUN: 0})
    assert f"placed with sha256 {SHA_A[:12]}, but its PATCHes announced {SHA_B[:12]} first" in found


def test_an_upload_begun_with_its_sha256_is_not_a_head_start():
    tally: Counter = Counter()
    arrivals = _upload(begun_with=SHA_A, patches=[(1.0, None), (2.0, None)], placed_at=2.05, placed=SHA_A)
    assert sha256_before_placed(arrivals, {RUN: 0}, tally) == []
    assert tally["sha256-before-placed"] == 0
    assert head_starts(arrivals) == (0, 1, 0)
    assert head_starts(_upload(begun_with=None, patches=[], placed_at=1.0, placed=SHA_A)) == (1, 1, 0)
