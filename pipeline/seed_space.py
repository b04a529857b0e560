"""Seed space: lerp, slerp and norm-aware (NAO) paths and centroids between diffusion noise seeds.

Pure functions of float32 tensors: no I/O, no global RNG. Shapes use P for pairs (or sets), n for
points on a path, K for seeds in a set, and (C, h, w) for one seed; dim = C * h * w.

The norm prior (NAO, Samuel et al., arXiv 2306.08687): a seed z ~ N(0, I_dim) has a norm |z| that
follows the chi distribution with dim degrees of freedom, concentrated near sqrt(dim). NAO looks for
the path gamma from a to b that maximises the line integral of log chi_dim(|gamma|) along it. On a
path discretised into n points x_0 = a, ..., x_{n-1} = b, with L(x) = -log chi_dim(|x|):

    J = sum_k |x_{k+1} - x_k| * (L(x_k) + 4 L((x_k + x_{k+1}) / 2) + L(x_{k+1})) / 6   (minimise)
      + lambda * sum_k relu(|x_{k+1} - x_k| - eps)                                    (spacing)

over the interior points. A chi density is below 1 everywhere, so L > 0 and the first term is a
path length weighted by how unlikely each norm is: it is the norm prior and the length/smoothness
term at once. The published code evaluates L at segment midpoints only; with endpoints inside the
shell (inverted seeds) the optimiser exploits that rule: the first and last interior points jump
far outside the shell (~1.45 sqrt(dim)) so that the midpoints of the long first and last segments
land on it and score as typical, and the path's norms are never looked at where they are atypical.
Simpson's rule of the same integral also scores both ends of every segment, which removes the
exploit (`quadrature="midpoint"` keeps the published rule for the benchmark). Centroids add the
paths from every seed to a free centroid c and the term L(c).

Why the batched solver is cheap: J depends on the points only through norms and distances. Folding
a path into the half-plane of span(a, b) (keep each point's component along a and its norm) keeps
the norms and makes no distance longer, and the gradient of J at points of the plane
lies in the plane. So the plane holds an optimal path (for a set of K seeds, their span does), and
the batched solver optimises k = 2 (or K) coordinates per point instead of dim,
in polar form (log-radius and direction) so that the stiff radial and the soft tangential directions
are separate coordinates for Adam. `nao_path_reference` keeps the published form: every coordinate
of every interior point in R^dim, lerp plus a little noise as the start, Adam at lr 0.01, one path at
a time. Both use the same objective (`path_loss`) and the same stopping rule (`StopRule`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# --------------------------------------------------------------------------------------------
# Norm prior
# --------------------------------------------------------------------------------------------


def chi_log_prob(r: torch.Tensor, dim: int) -> torch.Tensor:
    """log of the chi density with `dim` degrees of freedom at norms `r` (any shape, float32).

    Written around the mode m = sqrt(dim - 1) as (dim - 1) * (log1p(d) - d - d^2 / 2) + log chi(m)
    with d = r / m - 1: the textbook form subtracts numbers of size ~dim * log(dim) (about 8e4 for
    4x64x64), which leaves float32 with an error of ~1e-2; this form is exact to ~1e-6 near the mode.
    """
    if dim < 2:
        raise ValueError(f"chi prior needs dim >= 2, got {dim}")
    mode = math.sqrt(dim - 1)
    log_at_mode = (
        (dim - 1) * math.log(mode)
        - 0.5 * mode * mode
        - ((0.5 * dim - 1) * math.log(2.0) + math.lgamma(0.5 * dim))
    )
    d = r / mode - 1.0
    return (dim - 1) * (torch.log1p(d) - d - 0.5 * d * d) + log_at_mode


def chi_band(dim: int, mass: float = 0.99) -> tuple[float, float]:
    """The central interval of the chi_dim distribution holding `mass` of it: (low, high) norms."""
    from scipy.stats import chi  # scipy comes with scikit-learn

    return float(chi.ppf(0.5 - 0.5 * mass, dim)), float(chi.ppf(0.5 + 0.5 * mass, dim))


# --------------------------------------------------------------------------------------------
# Closed-form interpolation
# --------------------------------------------------------------------------------------------


def _check_pairs(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(
            f"a and b must both be (P, C, h, w); got {tuple(a.shape)}, {tuple(b.shape)}"
        )


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Straight lines: a, b (P, C, h, w), t (n,) in [0, 1] -> (P, n, C, h, w) = (1 - t) a + t b."""
    _check_pairs(a, b)
    tt = t.to(a.dtype).view(1, -1, *([1] * (a.ndim - 1)))  # (1, n, 1, 1, 1)
    return (1.0 - tt) * a.unsqueeze(1) + tt * b.unsqueeze(1)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, dot_threshold: float = 0.9995):
    """Spherical interpolation: a, b (P, C, h, w), t (n,) -> (P, n, C, h, w).

    sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b, with theta the angle
    between a and b; keeps the norm when |a| = |b|. Nearly parallel pairs (cos theta above
    `dot_threshold`) fall back to lerp, where the sine weights lose their precision.
    """
    _check_pairs(a, b)
    P = a.shape[0]
    fa, fb = a.reshape(P, -1), b.reshape(P, -1)  # (P, D)
    cos = (fa * fb).sum(-1) / (fa.norm(dim=-1) * fb.norm(dim=-1)).clamp_min(1e-30)  # (P,)
    theta = torch.arccos(cos.clamp(-1.0, 1.0)).unsqueeze(1)  # (P, 1)
    tt = t.to(a.dtype).unsqueeze(0)  # (1, n)
    sin_theta = torch.sin(theta).clamp_min(1e-12)
    wa = torch.sin((1.0 - tt) * theta) / sin_theta  # (P, n)
    wb = torch.sin(tt * theta) / sin_theta
    parallel = (cos.abs() > dot_threshold).unsqueeze(1)
    wa = torch.where(parallel, 1.0 - tt, wa)
    wb = torch.where(parallel, tt.expand_as(wb), wb)
    out = wa.unsqueeze(-1) * fa.unsqueeze(1) + wb.unsqueeze(-1) * fb.unsqueeze(1)  # (P, n, D)
    return out.reshape(P, tt.shape[1], *a.shape[1:])


# --------------------------------------------------------------------------------------------
# NAO objective and stopping rule
# --------------------------------------------------------------------------------------------


QUADRATURES = ("simpson", "midpoint")


def path_loss(
    path: torch.Tensor,
    dim: int,
    eps: torch.Tensor,
    penalty_weight: float = 1.0,
    quadrature: str = "simpson",
) -> torch.Tensor:
    """NAO's objective J for paths (P, n, k) with endpoints included; lower is better -> (P,).

    `path` may hold the points in R^dim (k = dim) or in coordinates of an isometric subspace
    (k = 2 for pairs); `dim` is the dimension of the seed space that the prior lives in. `eps` (P,)
    is the longest segment that goes unpenalised. `quadrature` "midpoint" is the published rule,
    kept to show why tailseed does not use it (see the module docstring).
    """
    if quadrature not in QUADRATURES:
        raise ValueError(f"quadrature: unknown {quadrature!r}; use one of {QUADRATURES}")
    seg = (path[:, 1:] - path[:, :-1]).norm(dim=-1)  # (P, n-1) segment lengths
    log_mid = chi_log_prob((0.5 * (path[:, 1:] + path[:, :-1])).norm(dim=-1), dim)  # (P, n-1)
    if quadrature == "simpson":  # (ends + 4 * middle) / 6 on each segment
        log_pts = chi_log_prob(path.norm(dim=-1), dim)  # (P, n) at the points
        log_seg = (log_pts[:, :-1] + 4.0 * log_mid + log_pts[:, 1:]) / 6.0
    else:
        log_seg = log_mid
    integral = (seg * log_seg).sum(-1)  # line integral of log chi: (P,)
    penalty = torch.relu(seg - eps.unsqueeze(-1)).sum(-1)
    return -integral + penalty_weight * penalty


@dataclass(frozen=True)
class StopRule:
    """When an optimisation stops, for one path (or one centroid problem).

    Stop after `patience` consecutive iterations whose loss changed by less than
    rtol * max(|loss|, 1), or after `max_iters`. The published code uses the same form with an
    absolute threshold (0.001, patience 10, 10,000 iterations); a relative one keeps its meaning
    across seed sizes (J is ~1e2 for 4x64x64 and ~1e1 for 4x8x8).
    """

    rtol: float = 1e-5
    patience: int = 10
    max_iters: int = 10_000


class _Stopper:
    """Per-problem bookkeeping of StopRule for a batch: `active` (P,) bool says who still moves."""

    def __init__(self, rule: StopRule, batch: int, device: torch.device | None = None):
        self.rule = rule
        self.last = torch.full((batch,), float("inf"), device=device)
        self.quiet = torch.zeros(batch, dtype=torch.long, device=device)
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.iters = torch.zeros(batch, dtype=torch.long, device=device)

    def update(self, loss: torch.Tensor) -> None:
        loss = loss.detach()
        small = (loss - self.last).abs() < self.rule.rtol * loss.abs().clamp_min(1.0)
        self.quiet = torch.where(small, self.quiet + 1, torch.zeros_like(self.quiet))
        self.last = torch.where(self.active, loss, self.last)
        self.iters += self.active.long()
        done = (self.quiet >= self.rule.patience) | (self.iters >= self.rule.max_iters)
        self.active &= ~done


# --------------------------------------------------------------------------------------------
# Batched NAO in the span of the seeds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NaoConfig:
    """Settings of the batched NAO solver. Defaults follow the published code where it has one."""

    penalty_weight: float = 1.0  # lambda of the spacing penalty (published: 1)
    eps_factor: float = 2.0  # eps = eps_factor * |a - b| / n (published: 2)
    lr: float = 0.01  # Adam step in log-radius and direction units (dimensionless)
    lr_half_life: int = 150  # iterations over which the step halves: Adam alone never settles
    lr_final: float = 1e-4  # ... down to this floor (a relative radius error of ~1e-4)
    quadrature: str = "simpson"  # of the line integral; "midpoint" is the published rule
    stop: StopRule = StopRule()


@dataclass(frozen=True)
class NaoPaths:
    """Result of `nao_path`.

    path: (P, n, C, h, w) float32, path[:, 0] = a and path[:, -1] = b exactly.
    t: (P, n) float32 arc-length position of every point, 0 at a and 1 at b.
    loss: (P,) the objective J of each path (lower is better).
    iters: (P,) Adam iterations each path took.
    """

    path: torch.Tensor
    t: torch.Tensor
    loss: torch.Tensor
    iters: torch.Tensor


@dataclass(frozen=True)
class NaoCentroids:
    """Result of `nao_centroid`.

    centroid: (S, C, h, w) float32, one per set.
    paths: (S, K, n, C, h, w) from each seed (point 0) to the centroid (point n-1).
    t: (S, K, n) arc-length position along each path, 0 at the seed and 1 at the centroid.
    loss: (S,) the summed objective of the set's paths minus log chi(|centroid|).
    iters: (S,) Adam iterations.
    """

    centroid: torch.Tensor
    paths: torch.Tensor
    t: torch.Tensor
    loss: torch.Tensor
    iters: torch.Tensor


def orthonormal_span(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An orthonormal basis of span(x_1..x_K) per batch item, and the coordinates of x in it.

    x (B, K, D) -> basis (B, K, D), coords (B, K, K) with x ~= coords @ basis. Modified
    Gram-Schmidt in float32, written with elementwise ops and sums so that it is deterministic and a
    batch item's result does not depend on the others. A vector already in the span of the earlier
    ones (parallel seeds, identical seeds) gets a deterministic filler direction orthogonal to them,
    whose coordinate is 0.
    """
    B, K, D = x.shape
    basis = []
    for i in range(K):
        # 1. remove the components along the basis vectors found so far (twice, for stability)
        v = x[:, i]
        for _ in range(2):
            for q in basis:
                v = v - (v * q).sum(-1, keepdim=True) * q
        norm = v.norm(dim=-1, keepdim=True)  # (B, 1)
        # 2. a degenerate vector: take the coordinate axis least aligned with the basis, orthogonalised
        scale = x[:, : i + 1].norm(dim=-1).amax(-1, keepdim=True).clamp_min(1e-30)
        degenerate = norm < 1e-6 * scale
        if bool(degenerate.any()):
            filler = torch.zeros_like(v)
            filler[:, (i * 7919) % D] = 1.0  # any fixed axis; re-orthogonalised below
            for _ in range(2):
                for q in basis:
                    filler = filler - (filler * q).sum(-1, keepdim=True) * q
            filler = filler / filler.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            v = torch.where(degenerate, filler, v / norm.clamp_min(1e-30))
        else:
            v = v / norm
        basis.append(v)
    basis_t = torch.stack(basis, dim=1)  # (B, K, D)
    coords = torch.einsum("bkd,bjd->bkj", x, basis_t)  # (B, K, K)
    return basis_t, coords


def _polar(y: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Points y (..., k) -> log-radius (...,) relative to `scale`, and unit direction (..., k)."""
    r = y.norm(dim=-1).clamp_min(1e-12 * scale)
    return torch.log(r / scale), y / r.unsqueeze(-1)


def _unpolar(rho: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """log-radius (...,) and any non-zero direction (..., k) -> points (..., k)."""
    return (scale * torch.exp(rho)).unsqueeze(-1) * v / v.norm(dim=-1, keepdim=True)


def _start(
    a: torch.Tensor, b: torch.Tensor, n: int, dim: int, eps: torch.Tensor, config: NaoConfig
) -> torch.Tensor:
    """Start of the batched solver: a, b (B, k) -> interior points (B, n-2, k), no randomness.

    Two candidates along the slerp directions of a/|a| and b/|b| at evenly spaced t: radii
    interpolated log-linearly between |a| and |b|, or radii at the chi mode sqrt(dim - 1). Each
    problem starts from the one with the lower objective. The shell start matters for distant
    endpoints far inside the shell (inverted seeds): from it Adam only has to build the radial legs
    near the endpoints, while from the interpolated one it lifts the whole path and settles in a
    worse local optimum. The interpolated start matters for close endpoints (a centroid near its
    seeds), where a detour to the shell is a local optimum of its own.
    """
    t = torch.linspace(0.0, 1.0, n, device=a.device)[1:-1]
    ra, rb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)  # (B, 1)
    direction = slerp(a / ra.clamp_min(1e-30), b / rb.clamp_min(1e-30), t)  # (B, n-2, k)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    log_r = (1 - t) * torch.log(ra.clamp_min(1e-30)) + t * torch.log(rb.clamp_min(1e-30))
    interpolated = torch.exp(log_r).unsqueeze(-1) * direction
    shell = math.sqrt(dim - 1) * direction
    losses = []
    for inner in (interpolated, shell):
        full = torch.cat([a.unsqueeze(1), inner, b.unsqueeze(1)], dim=1)
        losses.append(path_loss(full, dim, eps, config.penalty_weight, config.quadrature))
    use_shell = (losses[1] < losses[0]).view(-1, 1, 1)
    return torch.where(use_shell, shell, interpolated)


def _arc_positions(path: torch.Tensor) -> torch.Tensor:
    """Cumulative arc length of paths (B, n, k), normalised to [0, 1] -> (B, n)."""
    seg = (path[:, 1:] - path[:, :-1]).norm(dim=-1)
    cum = torch.cat([torch.zeros_like(seg[:, :1]), seg.cumsum(-1)], dim=-1)
    even = torch.linspace(0.0, 1.0, path.shape[1], device=path.device).expand_as(
        cum
    )  # for paths of length 0
    return torch.where(cum[:, -1:] > 0, cum / cum[:, -1:].clamp_min(1e-30), even)


def point_at(path: torch.Tensor, positions: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Points of one discretised path at arc-length positions: path (n, C, h, w), positions (n,)
    increasing from 0 to 1 (as `NaoPaths.t`), t (m,) in [0, 1] -> (m, C, h, w).

    Between two neighbouring points, the direction is interpolated linearly and the norm is set to
    the linear interpolation of their norms, so a point between two points on the shell is on it.
    """
    n = path.shape[0]
    flat = path.reshape(n, -1)  # (n, D)
    k = torch.searchsorted(positions.contiguous(), t.contiguous(), right=True).clamp(1, n - 1) - 1
    span = (positions[k + 1] - positions[k]).clamp_min(1e-30)
    s = ((t - positions[k]) / span).clamp(0.0, 1.0).unsqueeze(-1)  # (m, 1)
    lo, hi = flat[k], flat[k + 1]  # (m, D)
    chord = (1 - s) * lo + s * hi
    radius = (1 - s) * lo.norm(dim=-1, keepdim=True) + s * hi.norm(dim=-1, keepdim=True)
    out = chord / chord.norm(dim=-1, keepdim=True).clamp_min(1e-30) * radius
    return out.reshape(t.shape[0], *path.shape[1:])


def _adam_step(params, grads, state, lr, active_mask) -> None:
    """One masked Adam step (beta 0.9, 0.999, eps 1e-8) on lists of tensors whose dim 0 is the batch."""
    state["t"] += 1
    t = state["t"]
    for i, (p, g) in enumerate(zip(params, grads)):
        m, v = state["m"][i], state["v"][i]
        mask = active_mask.view(-1, *([1] * (p.ndim - 1))).to(p.dtype)
        m.mul_(0.9).add_(0.1 * g)
        v.mul_(0.999).add_(0.001 * g * g)
        step = lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
        p.sub_(mask * step)


def _optimise(
    loss_fn,
    params: list[torch.Tensor],
    batch: int,
    config: NaoConfig,
    solved: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise a batch of independent problems; loss_fn(params) -> (batch,). Returns (loss, iters).

    Adam is elementwise and each problem's loss depends only on its own slice of the parameters, so
    each problem follows exactly the trajectory it would follow alone; a problem that meets the stop
    rule is frozen while the others go on. Problems marked in `solved` (batch,) never move.
    """
    stopper = _Stopper(config.stop, batch, params[0].device)
    if solved is not None:
        stopper.active &= ~solved
    state = {
        "t": 0,
        "m": [torch.zeros_like(p) for p in params],
        "v": [torch.zeros_like(p) for p in params],
    }
    decay = 0.5 ** (1.0 / config.lr_half_life)
    lr = config.lr
    for _ in range(config.stop.max_iters):
        # 1. loss and gradient of every problem at once
        for p in params:
            p.requires_grad_(True)
        loss = loss_fn(params)
        grads = torch.autograd.grad(loss.sum(), params)
        # 2. stop rule per problem, on the loss before this step
        stopper.update(loss)
        if not bool(stopper.active.any()):
            break
        # 3. Adam step for the problems still moving
        with torch.no_grad():
            _adam_step([p.detach() for p in params], grads, state, lr, stopper.active)
        lr = max(lr * decay, config.lr_final)
    with torch.no_grad():
        final = loss_fn(params)
    return final.detach(), stopper.iters


def nao_path(
    a: torch.Tensor, b: torch.Tensor, n: int = 32, config: NaoConfig = NaoConfig()
) -> NaoPaths:
    """NAO paths for a batch of pairs: a, b (P, C, h, w) float32 -> NaoPaths with n points each.

    Deterministic (no random start needed: the solver starts along slerp directions), and
    a pair's path does not depend on the other pairs in the batch. Endpoints are kept exactly, also
    when they lie off the typical shell; the interior is then pulled toward the shell.
    """
    _check_pairs(a, b)
    if n < 3:
        raise ValueError(f"a NAO path needs n >= 3 points (2 endpoints and an interior), got {n}")
    P, shape = a.shape[0], a.shape[1:]
    dim = math.prod(shape)
    scale = math.sqrt(dim)
    with torch.no_grad():
        # 1. the plane of each pair and the endpoints' coordinates in it
        basis, coords = orthonormal_span(torch.stack([a, b], 1).reshape(P, 2, dim).float())
        ya, yb = coords[:, 0], coords[:, 1]  # (P, 2)
        eps = config.eps_factor * (ya - yb).norm(dim=-1) / n  # (P,)
        # 2. start along the slerp directions (see _start), in polar form
        rho, v = _polar(_start(ya, yb, n, dim, eps, config), scale)

    def loss_fn(params):
        inner = _unpolar(params[0], params[1], scale)  # (P, n-2, 2)
        full = torch.cat([ya.unsqueeze(1), inner, yb.unsqueeze(1)], dim=1)
        return path_loss(full, dim, eps, config.penalty_weight, config.quadrature)

    # 3. optimise the interior points; a pair of equal seeds is solved by its start (all points at
    # the seed), where Adam would only circle the kink of zero-length segments
    params = [rho.clone(), v.clone()]
    same = (a == b).reshape(P, dim).all(-1)
    loss, iters = _optimise(loss_fn, params, P, config, solved=same)
    with torch.no_grad():
        # 4. back to seed space, endpoints copied bit for bit
        inner = _unpolar(params[0], params[1], scale)
        full = torch.cat([ya.unsqueeze(1), inner, yb.unsqueeze(1)], dim=1)  # (P, n, 2)
        t = _arc_positions(full)
        path = torch.empty(
            P, n, dim, device=a.device
        )  # filled in place: a copy of a large batch costs seconds
        path[:, 0], path[:, -1] = a.reshape(P, dim), b.reshape(P, dim)
        path[:, 1:-1] = torch.bmm(inner, basis)  # (P, n-2, dim)
        path = path.reshape(P, n, *shape)
    return NaoPaths(path=path, t=t, loss=loss, iters=iters)


def nao_centroid(seeds: torch.Tensor, n: int = 16, config: NaoConfig = NaoConfig()) -> NaoCentroids:
    """NAO centroid of one set of seeds (K, C, h, w), or of a batch of sets (S, K, C, h, w).

    For one set the result's fields lack the leading S dimension: centroid (C, h, w), paths
    (K, n, C, h, w), t (K, n), loss and iters 0-dim. See `nao_centroids` for the batched form.
    """
    if seeds.ndim == 4:
        r = nao_centroids(seeds.unsqueeze(0), n=n, config=config)
        return NaoCentroids(r.centroid[0], r.paths[0], r.t[0], r.loss[0], r.iters[0])
    return nao_centroids(seeds, n=n, config=config)


def nao_centroids(
    seeds: torch.Tensor, n: int = 16, config: NaoConfig = NaoConfig()
) -> NaoCentroids:
    """NAO centroids of a batch of seed sets: seeds (S, K, C, h, w) float32 -> NaoCentroids.

    Minimises, per set, the sum over its K seeds of J(path from the seed to c) - log chi(|c|), over
    the centroid c and the interior points of the K paths, all in the span of the set's seeds. The
    start is the mean of the seeds rescaled to their mean norm, with slerp directions (see _start) to
    it. A set of identical seeds has that seed as its centroid.
    """
    if seeds.ndim != 5:
        raise ValueError(f"seeds must be (S, K, C, h, w); got {tuple(seeds.shape)}")
    if n < 3:
        raise ValueError(f"centroid paths need n >= 3 points, got {n}")
    S, K, shape = seeds.shape[0], seeds.shape[1], seeds.shape[2:]
    dim = math.prod(shape)
    scale = math.sqrt(dim)
    with torch.no_grad():
        # 1. the span of each set and the seeds' coordinates in it
        basis, ys = orthonormal_span(seeds.reshape(S, K, dim).float())  # (S, K, dim), (S, K, K)
        # 2. start: mean direction at the mean norm (the plain mean is far inside the shell)
        mean = ys.mean(1)  # (S, K)
        mean_norm = mean.norm(dim=-1, keepdim=True)
        tiny = mean_norm < 1e-6 * ys.norm(dim=-1).amax(-1, keepdim=True).clamp_min(1e-30)
        ramp = torch.arange(1, K + 1, dtype=ys.dtype, device=ys.device).view(1, K, 1)
        fallback = (ys * ramp).mean(1)  # a deterministic direction when the seeds cancel out
        mean = torch.where(tiny, fallback, mean)
        c0 = (
            mean
            / mean.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            * ys.norm(dim=-1).mean(1, keepdim=True)
        )
        pair_dist = (ys.unsqueeze(1) - ys.unsqueeze(2)).norm(dim=-1).amax((1, 2))  # (S,)
        eps = config.eps_factor * pair_dist.clamp_min(1e-12) / n
        eps_legs = eps.repeat_interleave(K)  # (S * K,)
        start = _start(ys.reshape(S * K, K), c0.repeat_interleave(K, 0), n, dim, eps_legs, config)
        rho, v = _polar(start, scale)  # (S*K, n-2), (S*K, n-2, K)
        c_rho, c_v = _polar(c0, scale)

    def loss_fn(params):
        inner = _unpolar(params[0], params[1], scale)  # (S*K, n-2, K)
        c = _unpolar(params[2], params[3], scale)  # (S, K)
        full = torch.cat(
            [ys.reshape(S * K, 1, K), inner, c.repeat_interleave(K, 0).unsqueeze(1)], dim=1
        )
        legs = (
            path_loss(full, dim, eps_legs, config.penalty_weight, config.quadrature)
            .view(S, K)
            .sum(-1)
        )
        return legs - chi_log_prob(c.norm(dim=-1), dim)

    # 3. optimise the centroids and the interior points of all paths; the problem is the set, so
    # the paths' parameters are viewed with the set as the leading dimension for the stop mask
    params = [
        rho.view(S, K, n - 2).clone(),
        v.view(S, K, n - 2, K).clone(),
        c_rho.clone(),
        c_v.clone(),
    ]

    def loss_sets(p):
        return loss_fn([p[0].reshape(S * K, n - 2), p[1].reshape(S * K, n - 2, K), p[2], p[3]])

    # a set of equal seeds is solved by its seed, with legs of zero length; Adam would only circle
    # that kink of the objective until max_iters
    flat = seeds.reshape(S, K, dim)
    same = (flat == flat[:, :1]).all(-1).all(-1)  # (S,)
    loss, iters = _optimise(loss_sets, params, S, config, solved=same)
    with torch.no_grad():
        # 4. back to seed space; seeds copied bit for bit as the first point of each path
        inner = _unpolar(params[0], params[1], scale)  # (S, K, n-2, K)
        c = _unpolar(params[2], params[3], scale)  # (S, K)
        inner = torch.where(same.view(S, 1, 1, 1), ys.unsqueeze(2), inner)
        c = torch.where(same.view(S, 1), ys[:, 0], c)
        loss = torch.where(same, -chi_log_prob(ys[:, 0].norm(dim=-1), dim), loss)
        full = torch.cat(
            [ys.unsqueeze(2), inner, c.view(S, 1, 1, K).expand(S, K, 1, K)], dim=2
        )  # (S, K, n, K)
        t = _arc_positions(full.reshape(S * K, n, K)).view(S, K, n)
        centroid = torch.einsum("sk,skd->sd", c, basis).reshape(S, *shape)
        centroid = torch.where(same.view(S, *[1] * len(shape)), seeds[:, 0].float(), centroid)
        inner_x = torch.einsum("sjnk,skd->sjnd", inner, basis).reshape(S, K, n - 2, *shape)
        paths = torch.cat(
            [
                seeds.float().unsqueeze(2),
                inner_x,
                centroid.view(S, 1, 1, *shape).expand(S, K, 1, *shape),
            ],
            dim=2,
        )
    return NaoCentroids(centroid=centroid, paths=paths, t=t, loss=loss, iters=iters)


# --------------------------------------------------------------------------------------------
# The published method, one path at a time (reference for tests and the benchmark)
# --------------------------------------------------------------------------------------------


def nao_path_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    n: int = 32,
    stop: StopRule = StopRule(),
    penalty_weight: float = 1.0,
    eps_factor: float = 2.0,
    lr: float = 0.01,
    generator: torch.Generator | None = None,
    quadrature: str = "simpson",
) -> tuple[torch.Tensor, float, int]:
    """NAO for one pair as the public code does it: a, b (C, h, w) -> (path (n, C, h, w), J, iters).

    Every coordinate of the n - 2 interior points is a parameter in R^dim, started on the chord
    with uniform noise of 0.01 added (from `generator`), and moved by torch's Adam at a fixed lr
    until `stop`. The objective is `path_loss` with `quadrature`, the same as the batched solver's.
    """
    shape, dim = a.shape, a.numel()
    fa, fb = a.reshape(1, dim).float(), b.reshape(1, dim).float()
    eps = eps_factor * (fa - fb).norm(dim=-1) / n  # (1,)
    # 1. start: points evenly on the chord, plus a little noise
    t = torch.linspace(0.0, 1.0, n, device=a.device).view(n, 1)
    start = (1 - t) * fa + t * fb  # (n, dim)
    noise = torch.rand(start.shape, generator=generator, device=a.device) / 100
    x = torch.nn.Parameter((start + noise)[1:-1].clone())  # (n-2, dim)
    optimiser = torch.optim.Adam([x], lr=lr)
    stopper = _Stopper(stop, 1, a.device)
    iters = 0
    for _ in range(stop.max_iters):
        # 2. objective of the whole path, endpoints fixed
        optimiser.zero_grad()
        loss = path_loss(torch.cat([fa, x, fb]).unsqueeze(0), dim, eps, penalty_weight, quadrature)
        # 3. stop rule on the loss before the step, then one Adam step
        stopper.update(loss)
        iters = int(stopper.iters[0])
        if not bool(stopper.active[0]):
            break
        loss.sum().backward()
        optimiser.step()
    with torch.no_grad():
        full = torch.cat([fa, x.detach(), fb])
        final = float(path_loss(full.unsqueeze(0), dim, eps, penalty_weight, quadrature)[0])
    path = torch.cat(
        [a.unsqueeze(0).float(), x.detach().view(n - 2, *shape), b.unsqueeze(0).float()]
    )
    return path, final, iters
