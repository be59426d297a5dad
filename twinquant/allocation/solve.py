"""Choose one quantization type per tensor group to minimise predicted quality loss under a file-size budget.

This is a multiple-choice knapsack: every group (a tensor, or tensors that must share a type) picks exactly one
`Candidate` (type, exact bytes, predicted KL increase); the chosen bytes plus `fixed_bytes` (tensors that are never
quantized: norms, etc.) must not exceed `target_bytes`; the sum of costs is minimised.

Two solvers:

* `method="dp"`: dynamic programming over a byte grid. Only the room above the smallest allocation matters, so each
  group's candidates are measured as *extra* bytes over its smallest allowed candidate, and the grid covers the
  slack `S = target - fixed - sum(smallest)`. Extra bytes are divided by a granularity `g` and ROUNDED UP, so
  anything the DP deems feasible truly is (sum ceil(d/g)·g <= floor(S/g)·g <= S). Default
  `g = ceil(S / 200_000)`: at most ~200k cells per group (fewer when many groups would need over 1 GiB of
  back-pointers). With g == 1 the DP is exact and `gap` is 0. With g > 1 the result is optimal for the rounded-up
  sizes only; `gap` then bounds its distance to the true optimum, using the better of two lower bounds: the
  Lagrangian (= LP) bound, and the same DP with sizes rounded DOWN (a relaxation: sum floor(d/g) <= floor(S/g)
  holds for every truly feasible choice).
* `method="lagrange"`: Lagrangian relaxation. For a multiplier λ every group independently minimises
  cost + λ·bytes; the dual's breakpoints are the slopes of the groups' lower convex hulls in (bytes, cost), so instead
  of a numeric binary search on λ we walk the hull segments in order of cost saved per byte, which reaches the dual
  optimum exactly (Sinha & Zoltners 1979). The segment that no longer fits gives the dual bound; the integer point
  before it, topped up greedily with the bytes left, is the returned solution, and `gap` = its cost - the bound.

Both top up their final answer greedily with whatever real bytes are left (the DP's rounding wastes some). With
g > 1 the DP also computes the Lagrangian solution (needed for the bound anyway) and returns the better of the two:
on hundreds of groups the rounding loss (up to g bytes per group) can exceed the Lagrangian's integrality loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from twinquant.errors import TwinquantError

DEFAULT_CELLS = 200_000              # grid cells per group when the caller gives no resolution
_BACKPOINTER_BUDGET = 1 << 30        # bytes of back-pointers we are willing to hold for the default grid
_METHODS = ("dp", "lagrange")


@dataclass(frozen=True)
class Candidate:
    type: str
    bytes: int                       # exact bytes of the group's tensors in this type
    cost: float                      # predicted KL increase if the group takes this type; lower is better


@dataclass
class Group:
    name: str
    candidates: list[Candidate]
    fixed: str | None = None         # the user forced this type: only this candidate is allowed
    min_type: str | None = None      # floor: only candidates at least as large as this type's are allowed


@dataclass
class Allocation:
    choice: dict[str, Candidate]     # group name -> chosen candidate, in the order of the groups
    total_bytes: int                 # fixed_bytes + chosen bytes
    total_cost: float
    target_bytes: int
    method: str
    gap: float                       # upper bound on total_cost - (true optimum); 0 when proven optimal
    resolution: int = 1              # the DP's bytes per grid cell (1 for lagrange and exact DP)

    def to_dict(self) -> dict:
        return {
            "choice": {n: {"type": c.type, "bytes": c.bytes, "cost": c.cost} for n, c in self.choice.items()},
            "total_bytes": self.total_bytes,
            "total_cost": self.total_cost,
            "target_bytes": self.target_bytes,
            "method": self.method,
            "gap": self.gap,
            "resolution": self.resolution,
        }


def _mb(n: int) -> str:
    return f"{n:,} bytes ({n / 1e6:.1f} MB)"


def _allowed(group: Group) -> list[Candidate]:
    """The group's allowed candidates, with dominated ones (no smaller and no cheaper than another) dropped.

    Returned sorted by bytes, costs strictly decreasing: every solver relies on that shape. Dropping dominated
    candidates never loses optimality and shrinks the DP's work.
    """
    if not group.candidates:
        raise TwinquantError(f"allocation: group {group.name!r} has no candidate types")
    by_type: dict[str, Candidate] = {}
    for c in group.candidates:
        if c.type in by_type:
            raise TwinquantError(f"allocation: group {group.name!r} lists type {c.type!r} twice")
        if not isinstance(c.bytes, (int, np.integer)) or c.bytes < 0:
            raise TwinquantError(f"allocation: group {group.name!r} type {c.type!r} has invalid size {c.bytes!r}")
        if not math.isfinite(c.cost):
            raise TwinquantError(f"allocation: group {group.name!r} type {c.type!r} has non-finite cost {c.cost!r}")
        by_type[c.type] = c
    cands = list(group.candidates)
    # A forced type wins over the floor: the user named it explicitly.
    if group.fixed is not None:
        if group.fixed not in by_type:
            raise TwinquantError(f"allocation: forced type {group.fixed!r} for {group.name!r} is not among its "
                                 f"candidates ({', '.join(by_type)})")
        cands = [by_type[group.fixed]]
    elif group.min_type is not None:
        if group.min_type not in by_type:
            raise TwinquantError(f"allocation: minimum type {group.min_type!r} for {group.name!r} is not among its "
                                 f"candidates ({', '.join(by_type)})")
        floor = by_type[group.min_type].bytes
        cands = [c for c in cands if c.bytes >= floor]
    kept: list[Candidate] = []
    for c in sorted(cands, key=lambda c: (c.bytes, c.cost)):        # stable: ties keep the caller's order
        if not kept or c.cost < kept[-1].cost:
            kept.append(c)
    return kept


def _hull(cands: list[Candidate]) -> list[int]:
    """Indices of the lower convex hull of (bytes, cost), left to right: the only points any λ can select."""
    hull: list[int] = []
    for k, c in enumerate(cands):
        while len(hull) >= 2:
            a, b = cands[hull[-2]], cands[hull[-1]]
            # drop b if it lies on or above the segment a -> c (cross product, exact on ints for bytes)
            if (b.cost - a.cost) * (c.bytes - a.bytes) >= (c.cost - a.cost) * (b.bytes - a.bytes):
                hull.pop()
            else:
                break
        hull.append(k)
    return hull


def _lagrange(allowed: list[list[Candidate]], slack: int) -> tuple[list[int], float]:
    """Walk the hull segments by cost saved per byte. Returns (an integer choice, the Lagrangian dual bound)."""
    segs = []                                                    # (slope, group, from index, to index)
    for g, cands in enumerate(allowed):
        h = _hull(cands)
        for a, b in zip(h, h[1:]):
            segs.append(((cands[b].cost - cands[a].cost) / (cands[b].bytes - cands[a].bytes), g, a, b))
    segs.sort(key=lambda s: s[0])                                # most negative (best) first; per group in order
    pick = [0] * len(allowed)
    left = slack
    cost = math.fsum(c[0].cost for c in allowed)
    bound = None
    for slope, g, a, b in segs:
        if pick[g] != a:                                         # this group already stopped at an earlier point
            continue
        db = allowed[g][b].bytes - allowed[g][a].bytes
        if db <= left:
            pick[g] = b
            left -= db
            cost += allowed[g][b].cost - allowed[g][a].cost
        elif bound is None:
            # The LP optimum takes this segment fractionally; nothing better can exist.
            bound = cost + slope * left
            # Later segments may still fit (a smaller one elsewhere): keep walking for the integer solution,
            # but never advance this group past the point it is at.
    if bound is None:                                            # every group reached its cheapest candidate
        bound = cost
    return pick, bound


def _top_up(allowed: list[list[Candidate]], pick: list[int], left: int) -> list[int]:
    """Spend leftover real bytes: move a group to its cheapest candidate that still fits, biggest saving first."""
    pick = list(pick)
    while True:
        best = None
        for g, cands in enumerate(allowed):
            cur = cands[pick[g]]
            for k in range(pick[g] + 1, len(cands)):             # larger and (by construction) cheaper
                if cands[k].bytes - cur.bytes > left:
                    break
                saving = cur.cost - cands[k].cost
                if best is None or saving > best[0]:
                    best = (saving, g, k)
        if best is None:
            return pick
        _, g, k = best
        left -= allowed[g][k].bytes - allowed[g][pick[g]].bytes
        pick[g] = k


def _cost(allowed: list[list[Candidate]], pick: list[int]) -> float:
    return math.fsum(c[k].cost for c, k in zip(allowed, pick))


def _finish(allowed: list[list[Candidate]], pick: list[int], slack: int) -> list[int]:
    return _top_up(allowed, pick, slack - sum(c[k].bytes - c[0].bytes for c, k in zip(allowed, pick)))


def _dp(weights: list[np.ndarray], costs: list[np.ndarray], cap: int, track: bool):
    """Min total cost with sum of weights <= c, for every c in 0..cap. Weights are ≥ 0 and each group has a 0.

    With `track`, also returns one back-pointer array per group (the candidate index chosen at each capacity).
    The table is 'at most c' so it is non-increasing in c and every cell is finite (weight-0 candidates).
    """
    best = np.zeros(cap + 1)
    back = []
    for w, cs in zip(weights, costs):
        new = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, dtype=np.int8 if len(w) <= 127 else np.int16) if track else None
        for k in range(len(w)):
            wk = int(w[k])
            if wk > cap:
                break                                            # weights ascend: nothing further fits either
            cand = best[: cap + 1 - wk] + cs[k]
            tail = new[wk:]
            if track:
                better = cand < tail                             # strict: ties keep the smaller candidate
                np.copyto(tail, cand, where=better)
                np.copyto(arg[wk:], k, where=better)
            else:
                np.minimum(tail, cand, out=tail)
        best = new
        if track:
            back.append(arg)
    return best, back


def solve(groups: list[Group], target_bytes: int, fixed_bytes: int = 0, method: str = "dp",
          resolution: int | None = None) -> Allocation:
    """Pick one candidate per group minimising total cost with fixed_bytes + chosen bytes <= target_bytes.

    `resolution` (dp only): bytes per grid cell; None picks ceil(slack / 200_000) (see the module docstring).
    """
    if method not in _METHODS:
        raise TwinquantError(f"allocation: unknown method {method!r} (expected one of {', '.join(_METHODS)})")
    if resolution is not None and (not isinstance(resolution, (int, np.integer)) or resolution < 1):
        raise TwinquantError(f"allocation: resolution must be a positive integer number of bytes, not {resolution!r}")
    if fixed_bytes < 0:
        raise TwinquantError(f"allocation: fixed bytes must be non-negative, not {fixed_bytes}")
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise TwinquantError(f"allocation: group name {dup!r} appears more than once")

    allowed = [_allowed(g) for g in groups]
    smallest = fixed_bytes + sum(c[0].bytes for c in allowed)
    if smallest > target_bytes:
        raise TwinquantError(f"allocation: target {_mb(target_bytes)} is below the smallest achievable size "
                             f"{_mb(smallest)} (every tensor at its smallest allowed type)")
    slack = target_bytes - smallest
    widest = sum(c[-1].bytes - c[0].bytes for c in allowed)

    g = 1
    gap = 0.0
    if widest <= slack:
        pick = [len(c) - 1 for c in allowed]                    # the budget does not bind: cheapest everywhere
    elif method == "lagrange":
        pick, bound = _lagrange(allowed, slack)
    else:
        if resolution is None:
            cells = max(1, min(DEFAULT_CELLS, _BACKPOINTER_BUDGET // max(1, len(allowed))))
            g = max(1, -(-slack // cells))
        else:
            g = int(resolution)
        cap = slack // g
        if len(allowed) * (cap + 1) > 2 * _BACKPOINTER_BUDGET:      # int8 back-pointers: ~2 GiB
            raise TwinquantError(f"allocation: resolution {g} bytes needs {len(allowed)} x {cap + 1:,} grid cells; "
                                 f"use a coarser resolution (default: {-(-slack // DEFAULT_CELLS)})")
        deltas = [np.array([c.bytes - cands[0].bytes for c in cands], dtype=np.int64) for cands in allowed]
        costs = [np.array([c.cost for c in cands]) for cands in allowed]
        _, back = _dp([-(-d // g) for d in deltas], costs, cap, track=True)
        pick = [0] * len(allowed)
        c = cap
        for i in range(len(allowed) - 1, -1, -1):
            pick[i] = int(back[i][c])
            c -= -(-int(deltas[i][pick[i]]) // g)
        if g > 1:
            # Rounding up wastes up to g bytes per group, which on hundreds of groups can cost more than the
            # Lagrangian solution's integrality loss: keep whichever is better (both are truly feasible).
            lg_pick, lp_bound = _lagrange(allowed, slack)
            floor_best, _ = _dp([d // g for d in deltas], costs, cap, track=False)
            bound = max(lp_bound, float(floor_best[cap]))
            pick = min((_finish(allowed, p, slack) for p in (pick, lg_pick)), key=lambda p: _cost(allowed, p))
    pick = _finish(allowed, pick, slack)

    choice = {grp.name: cands[k] for grp, cands, k in zip(groups, allowed, pick)}
    total_bytes = fixed_bytes + sum(c.bytes for c in choice.values())
    total_cost = math.fsum(c.cost for c in choice.values())
    assert total_bytes <= target_bytes, "allocation exceeded its budget"
    if widest > slack and (method == "lagrange" or g > 1):
        gap = max(0.0, total_cost - bound)
    return Allocation(choice, total_bytes, total_cost, target_bytes, method, gap, g)
