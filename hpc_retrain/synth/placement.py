"""Where the cells of a synthetic field lie: a monolayer of capsules that never overlap.

Microcolonies are grown as they grow on agar: each starts from one cell, cells lengthen, divide in two
end to end when they reach their division length, and after every growth step overlapping capsules are
pushed apart (position-based relaxation of rigid rods: each contact is resolved along its normal,
moving and turning both rods in proportion to their mobility). That packs daughters end to end and
sisters side by side, in the aligned domains real colonies have, with no crossing and no occlusion. Single
cells are then dropped at random where they touch nothing. Any pair still overlapping at the end (a jammed
spot) loses its later cell, so the result never overlaps.

Why our own few hundred lines of numpy and not pymunk or SyMBac: a field needs a few hundred rods and only
their contacts resolved, quasi-statically (no inertia, bouncing or joints), deterministic per seed and in
well under a second; numpy and a k-d tree do that. pymunk (Chipmunk2D) integrates inertial dynamics, where
overlap removal needs damping and many small steps, and would be one more compiled dependency to pin in
the container; SyMBac builds on pymunk and brings a rendering pipeline of its own, which ``synth`` already
is.

A cell is a row ``(cy, cx, angle, length, width)`` in pixels: centre, axis direction ``(cos, sin)`` in
``(x, y)`` image coordinates, length caps included, width = 2 x the cap radius.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

# Relaxation pushes contacts apart to this clearance (px), so rounding never leaves two capsules sharing
# a pixel; cells this close still touch in the masks (adjacent pixels).
GAP = 0.15
GROWTH_STEP = 0.2  # relative lengthening per growth step (finer steps relax more gently, cost more)
RELAX_ITERS = 6  # relaxation sweeps after every growth step
MAX_STEPS = 200
PARALLEL_DEG = 15.0  # rods whose axes are closer than this touch along a line (two contacts)
SIDEWAYS = 0.2  # a rod's mobility across its axis relative to along it
PULL = 0.1  # each growth step, cells move this fraction of the way towards their colony's centre ...
PULL_MAX = 0.3  # ... but at most this far (px): more presses cells into each other faster than they part
OMEGA = 1.8  # over-relaxation of the averaged (Jacobi) corrections: averaging alone converges slowly
SETTLE_ITERS = 200  # relaxation sweeps at most once grown (it stops as soon as no two cells overlap)


def _axes(ang: np.ndarray) -> np.ndarray:
    return np.column_stack([np.cos(ang), np.sin(ang)])


def closest_points(ca, ua, ha, cb, ub, hb):
    """Closest points of segments ``ca + s ua, |s| <= ha`` and ``cb + t ub, |t| <= hb`` (arrays of pairs,
    points in (x, y)); returns s, t and the distance. Ericson's clamp-and-reproject, with the parallel case
    taken at the middle of the overlap of the two segments (so side-by-side rods are pushed, not turned)."""
    w0 = ca - cb
    b = np.einsum("ij,ij->i", ua, ub)
    d = np.einsum("ij,ij->i", ua, w0)
    e = np.einsum("ij,ij->i", ub, w0)
    denom = 1.0 - b * b
    parallel = denom < 1e-6
    s = np.where(parallel, 0.0, (b * e - d) / np.where(parallel, 1.0, denom))
    # Parallel: b's end points projected on a's axis, the middle of their overlap with a.
    lo = np.maximum(np.minimum(-d - hb * b, -d + hb * b), -ha)
    hi = np.minimum(np.maximum(-d - hb * b, -d + hb * b), ha)
    s = np.where(parallel, np.where(lo <= hi, (lo + hi) / 2, np.where(-d > 0, ha, -ha)), s)
    s = np.clip(s, -ha, ha)
    t = np.clip(e + s * b, -hb, hb)
    s = np.clip(t * b - d, -ha, ha)
    gap = w0 + s[:, None] * ua - t[:, None] * ub
    return s, t, np.hypot(gap[:, 0], gap[:, 1]), gap


class Rods:
    """Capsules in (x, y) with their growth state; ``relax`` resolves overlaps among them."""

    def __init__(self, xy, ang, length, width):
        self.xy = np.asarray(xy, float).reshape(-1, 2)
        self.ang = np.asarray(ang, float)
        self.length = np.asarray(length, float)
        self.width = np.asarray(width, float)

    def __len__(self) -> int:
        return len(self.ang)

    def half(self) -> np.ndarray:
        return np.maximum(self.length / 2 - self.width / 2, 0.0)

    def pairs(self, movable_from: int = 0) -> np.ndarray:
        """Pairs (i < j) whose capsules could touch: centres within half their lengths plus the gap.
        Pairs of two cells below ``movable_from`` (fixed) are left out."""
        if len(self) < 2:
            return np.zeros((0, 2), int)
        reach = float(self.length.max()) + GAP
        pr = cKDTree(self.xy).query_pairs(reach, output_type="ndarray")
        if pr.size == 0:
            return np.zeros((0, 2), int)
        pr = pr[np.lexsort((pr[:, 1], pr[:, 0]))]  # a fixed order: the sums below are then reproducible
        i, j = pr[:, 0], pr[:, 1]
        near = np.hypot(*(self.xy[i] - self.xy[j]).T) < (self.length[i] + self.length[j]) / 2 + GAP
        keep = near & (np.maximum(i, j) >= movable_from)
        return pr[keep]

    def overlaps(self, pr: np.ndarray, clearance: float = 0.0) -> tuple[np.ndarray, ...]:
        """For each pair: depth of overlap (positive: closer than the sum of radii plus ``clearance``),
        the contact normal (from j to i), and each rod's contact offset along its axis."""
        i, j = pr[:, 0], pr[:, 1]
        u = _axes(self.ang)
        h = self.half()
        s, t, dist, gap = closest_points(self.xy[i], u[i], h[i], self.xy[j], u[j], h[j])
        # Coincident axes (d = 0) have no normal: push them apart across rod i.
        safe = dist > 1e-9
        n = np.where(safe[:, None], gap / np.where(safe, dist, 1.0)[:, None],
                     np.column_stack([-u[i, 1], u[i, 0]]))
        depth = (self.width[i] + self.width[j]) / 2 + clearance - dist
        return depth, n, s, t

    def contacts(self, pr: np.ndarray, clearance: float) -> tuple[np.ndarray, ...]:
        """Contact points of pairs: (i, j, depth, normal, s, t) per contact. A pair touches at its closest
        points; two rods lying side by side (axes within PARALLEL_DEG) touch along a line instead, taken as
        two contacts at the ends of the stretch they share, so that a push moves them apart rather than
        turning them about one end (which opens the gap at the other: side-by-side rows then never settle)."""
        i, j = pr[:, 0], pr[:, 1]
        u = _axes(self.ang)
        h = self.half()
        s, t, dist, gap = closest_points(self.xy[i], u[i], h[i], self.xy[j], u[j], h[j])
        cos = np.einsum("ij,ij->i", u[i], u[j])
        mid = np.einsum("ij,ij->i", u[i], self.xy[j] - self.xy[i])  # j's centre along i's axis
        ext = h[j] * np.abs(cos)
        lo, hi = np.maximum(mid - ext, -h[i]), np.minimum(mid + ext, h[i])
        line = (np.abs(cos) > np.cos(np.deg2rad(PARALLEL_DEG))) & (lo < hi - 1e-6)
        k = np.flatnonzero(line)
        one = np.flatnonzero(~line)
        ci, cj = [i[one]], [j[one]]
        cs, ct, cg = [s[one]], [t[one]], [gap[one]]
        for end in (lo[k], hi[k]):
            a, b = i[k], j[k]
            p = self.xy[a] + end[:, None] * u[a]
            tt = np.clip(np.einsum("ij,ij->i", p - self.xy[b], u[b]), -h[b], h[b])
            ci.append(a)
            cj.append(b)
            cs.append(end)
            ct.append(tt)
            cg.append(p - (self.xy[b] + tt[:, None] * u[b]))
        ci, cj, cs, ct, cg = (np.concatenate(x) for x in (ci, cj, cs, ct, cg))
        dist = np.hypot(cg[:, 0], cg[:, 1])
        safe = dist > 1e-9
        n = np.where(safe[:, None], cg / np.where(safe, dist, 1.0)[:, None], np.column_stack([-u[ci, 1], u[ci, 0]]))
        depth = (self.width[ci] + self.width[cj]) / 2 + clearance - dist
        return ci, cj, depth, n, cs, ct

    def relax(self, iters: int, movable_from: int = 0, pr: np.ndarray | None = None) -> float:
        """Jacobi sweeps of contact resolution; cells below ``movable_from`` do not move. Returns the worst
        overlap (px, without the clearance) left."""
        fixed_pairs = pr is not None
        n_cells = len(self)
        if n_cells < 2:
            return 0.0
        # Rigid rods: mass ~ length, moment of inertia of a rod about its centre; fixed cells infinite.
        inv_m = np.where(np.arange(n_cells) >= movable_from, 1.0 / self.length, 0.0)
        inv_i = inv_m * 12.0 / np.maximum(self.length, 1e-6) ** 2
        worst = 0.0
        for it in range(iters):
            if not fixed_pairs and it % 8 == 0:  # rods move: look for new neighbours now and then
                pr = self.pairs(movable_from)
                # Of those, the pairs near enough to meet before the next look (fewer pairs make a sweep
                # cheaper); a pair that closes more than 2 px meanwhile is found at the next look, and
                # without_overlaps checks every pair in the end.
                pr = pr[self.overlaps(pr, GAP + 2.0)[0] > 0] if pr.size else pr
            if pr.size == 0:
                return 0.0
            i, j, depth, n, s, t = self.contacts(pr, GAP)
            act = depth > 0
            worst = float(depth.max() - GAP)
            # Done once every pair keeps at least half the clearance (and so truly apart).
            if worst <= -GAP / 2:
                break
            a, b, dep, nn, sa, tb = i[act], j[act], depth[act], n[act], s[act], t[act]
            u = _axes(self.ang)
            # Lever arms cross the normal: how a push at the contact turns each rod.
            ra = sa * (u[a, 0] * nn[:, 1] - u[a, 1] * nn[:, 0])
            rb = tb * (u[b, 0] * nn[:, 1] - u[b, 1] * nn[:, 0])
            # A rod on agar slides along its axis more easily than sideways (anisotropic drag): a push moves
            # it along its axis fully and across it by SIDEWAYS, which keeps colonies in aligned rows.
            ma, mb = self._mobility(u[a], nn, inv_m[a]), self._mobility(u[b], nn, inv_m[b])
            w = np.einsum("ij,ij->i", ma, nn) + ra * ra * inv_i[a] + np.einsum("ij,ij->i", mb, nn) + rb * rb * inv_i[b]
            lam = dep / np.maximum(w, 1e-12)
            cnt = np.bincount(np.concatenate([a, b]), minlength=n_cells).astype(float)
            cnt = np.maximum(cnt, 1.0)
            dx = np.bincount(a, lam * ma[:, 0], n_cells) - np.bincount(b, lam * mb[:, 0], n_cells)
            dy = np.bincount(a, lam * ma[:, 1], n_cells) - np.bincount(b, lam * mb[:, 1], n_cells)
            dth = np.bincount(a, lam * ra * inv_i[a], n_cells) - np.bincount(b, lam * rb * inv_i[b], n_cells)
            # Averaging over a cell's contacts keeps simultaneous pushes from overshooting.
            cnt = cnt / OMEGA
            self.xy[:, 0] += dx / cnt
            self.xy[:, 1] += dy / cnt
            self.ang += dth / cnt
        else:
            pr = self.pairs(movable_from) if pr is None else pr
            depth = self.overlaps(pr, 0.0)[0] if pr.size else np.zeros(0)
            worst = float(depth.max()) if depth.size else 0.0
        return max(worst, 0.0)

    @staticmethod
    def _mobility(u: np.ndarray, n: np.ndarray, inv_m: np.ndarray) -> np.ndarray:
        """How far a unit push along ``n`` moves rods of axis ``u``: along the axis fully, across it by
        SIDEWAYS."""
        along = np.einsum("ij,ij->i", u, n)[:, None] * u
        return inv_m[:, None] * (along + SIDEWAYS * (n - along))

    def take(self, keep: np.ndarray) -> Rods:
        return Rods(self.xy[keep], self.ang[keep], self.length[keep], self.width[keep])


def grow_colonies(rng: np.random.Generator, centers_xy: np.ndarray, sizes: np.ndarray, widths_fn,
                  length_range: tuple[float, float], angle_jitter_deg: float) -> Rods:
    """Grow one colony from each centre until it has its size in cells (all colonies at once, so colonies
    that meet push each other rather than overlap). ``widths_fn(n)`` draws n cell widths (px)."""
    lo, hi = length_range
    n0 = len(centers_xy)
    w = widths_fn(n0)
    # Division at 80-100 % of the longest length, so the newborn (half of it) are about the shortest and a
    # colony's cells, caught at random phases of their cycles, spread over the whole range.
    div_rel = lambda k: rng.uniform(max(0.8 * hi, min(2 * lo, hi)), hi, k)  # noqa: E731
    div = div_rel(n0) * w
    length = div * rng.uniform(0.5, 1.0, n0)
    rods = Rods(centers_xy, rng.uniform(0, np.pi, n0), length, w)
    colony = np.arange(n0)
    rate = rng.uniform(0.8, 1.2, n0)  # per-cell growth rate, so sisters drift out of phase
    sizes = np.asarray(sizes, int)
    jitter = np.deg2rad(angle_jitter_deg)
    for _ in range(MAX_STEPS):
        counts = np.bincount(colony, minlength=n0)
        growing = counts[colony] < sizes[colony]
        if not growing.any():
            break
        # (never past the division length: a step is coarse, the lengths must stay in their range)
        rods.length = np.where(growing, np.minimum(rods.length * (1 + GROWTH_STEP * rate), div), rods.length)
        # Divide: each daughter takes half the parent, end to end along its axis, the gap between them.
        ready = np.flatnonzero(growing & (rods.length >= div))
        if ready.size:
            u = _axes(rods.ang[ready])
            off = (rods.length[ready] / 4 + GAP / 2)[:, None] * u
            d_len = rods.length[ready] / 2 - GAP / 2
            k = ready.size
            new_xy = rods.xy[ready] + off
            rods.xy[ready] -= off
            rods.length[ready] = d_len
            ang_new = rods.ang[ready] + rng.normal(0, jitter, k)
            rods.ang[ready] += rng.normal(0, jitter, k)
            # A daughter keeps its mother's width (within 3 %): sisters look alike.
            w_new = rods.width[ready] * np.clip(rng.normal(1, 0.03, k), 0.9, 1.1)
            rods = Rods(np.vstack([rods.xy, new_xy]), np.concatenate([rods.ang, ang_new]),
                        np.concatenate([rods.length, d_len]), np.concatenate([rods.width, w_new]))
            div[ready] = div_rel(k) * rods.width[ready]
            div = np.concatenate([div, div_rel(k) * w_new])
            rate[ready] = rng.uniform(0.8, 1.2, k)
            rate = np.concatenate([rate, rng.uniform(0.8, 1.2, k)])
            colony = np.concatenate([colony, colony[ready]])
        _pull(rods, colony, n0)
        rods.relax(RELAX_ITERS)
    # Settle without the pull: what the pull pressed together must come apart before the layout is used.
    rods.relax(SETTLE_ITERS)
    return rods


def _pull(rods: Rods, colony: np.ndarray, n_colonies: int) -> None:
    """Move each cell a little towards its colony's centre: the agar's pressure that keeps a growing
    colony compact (pushing apart alone leaves gaps wherever a pushed cell turned). Colonies that touch
    are pulled together, towards their common centre: pulled apart, each towards its own, they would
    press into each other for ever."""
    pr = rods.pairs()
    group = np.arange(n_colonies)
    if pr.size:
        a, b = colony[pr[:, 0]], colony[pr[:, 1]]
        meet = (a != b) & (rods.overlaps(pr, 1.0)[0] > 0)
        if meet.any():
            graph = coo_matrix((np.ones(int(meet.sum())), (a[meet], b[meet])), shape=(n_colonies, n_colonies))
            group = connected_components(graph, directed=False)[1]
    g = group[colony]
    counts = np.maximum(np.bincount(g, minlength=n_colonies), 1)
    centre = np.column_stack([np.bincount(g, rods.xy[:, k], n_colonies) / counts for k in (0, 1)])
    step = PULL * (centre[g] - rods.xy)
    norm = np.hypot(step[:, 0], step[:, 1])
    rods.xy += step / np.maximum(norm / PULL_MAX, 1.0)[:, None]


def add_singles(rods: Rods, cand: Rods, areas: np.ndarray, need: float) -> Rods:
    """Add candidate cells in order where they touch no placed cell, until their ``areas`` sum to ``need``."""
    if len(cand) == 0 or need <= 0:
        return rods
    both = Rods(np.vstack([rods.xy, cand.xy]), np.concatenate([rods.ang, cand.ang]),
                np.concatenate([rods.length, cand.length]), np.concatenate([rods.width, cand.width]))
    n0 = len(rods)
    pr = both.pairs(movable_from=n0)  # every pair with a candidate in it
    clash = pr[both.overlaps(pr, GAP)[0] > 0] if pr.size else pr
    # A candidate on a placed cell is out; among the others the earlier candidate wins a clash.
    out = np.zeros(len(cand), bool)
    out[clash[clash[:, 0] < n0, 1] - n0] = True
    between = clash[clash[:, 0] >= n0] - n0
    later = [[] for _ in range(len(cand))]
    for a, b in between.tolist():
        later[a].append(b)
    keep, got = [], 0.0
    for k in range(len(cand)):
        if got >= need:
            break
        if out[k]:
            continue
        keep.append(k)
        got += float(areas[k])
        out[later[k]] = True
    return both.take(np.concatenate([np.arange(n0), n0 + np.array(keep, int)]))


def without_overlaps(rods: Rods) -> Rods:
    """``rods`` less the later cell of every pair that still overlaps (after a last relaxation): the
    guarantee that no two capsules share any point."""
    if len(rods) < 2:
        return rods
    # A layout grown here has settled already (this returns at once); a pile needs many more sweeps.
    rods.relax(5 * SETTLE_ITERS)
    drop = np.zeros(len(rods), bool)
    pr = rods.pairs()
    if pr.size:
        # Of each pair still overlapping, the later cell goes, unless the earlier one went already.
        for i, j in pr[rods.overlaps(pr, 1e-3)[0] > 0].tolist():
            if not drop[i]:
                drop[j] = True
    return rods.take(~drop)


def as_cells(rods: Rods) -> np.ndarray:
    """(n, 5) rows ``cy, cx, angle, length, width``: the layout ``synth`` rasterises."""
    return np.column_stack([rods.xy[:, 1], rods.xy[:, 0], rods.ang, rods.length, rods.width])
