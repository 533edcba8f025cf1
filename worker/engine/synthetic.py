"""Activations from a known sparse dictionary, and how well a learned SAE recovers it.

A ground truth for judging SAE architectures without a language model (the idea of SAELens's
SynthSAEBench; this is our own, CPU-sized code). Torch only; no web, database or queue code.

The generative model (``SyntheticConfig`` holds its knobs, ``GroundTruth.build`` draws it):

* ``n_features`` unit-norm feature directions in ``d_in`` dimensions (i.i.d. Gaussian directions,
  normalised): more features than dimensions, so they are in superposition.
* Firing probabilities follow a Zipf law: the feature of frequency rank r fires with
  probability ``c / r**zipf_exponent`` (capped at ``max_prob``), ``c`` chosen so that the
  expected number of firing features per row is ``mean_l0``. Ranks are assigned to features in
  a random order.
* Correlated groups: a share ``grouped_frac`` of the features is split into disjoint groups of
  ``group_size``. Each group has a joint event that fires all its members at once, with
  probability ``group_share`` x the smallest firing probability among its members; each member
  also fires on its own with the probability that keeps its marginal probability exactly at
  its Zipf value. So members co-fire far more often than independent features would.
* Magnitudes are positive: a firing feature i has magnitude ``m_i * exp(s * z - s**2 / 2)``
  (log-normal with mean ``m_i``), ``m_i`` drawn uniformly from ``magnitude_range``,
  ``s = magnitude_sigma``, ``z`` standard normal.
* ``x = sum_i a_i f_i + offset + noise``: a fixed mean offset (a random direction of norm
  ``offset_norm``) and i.i.d. Gaussian noise of standard deviation ``noise_std`` per dimension.

Sampling is sparse (geometric gaps between firings per feature), so its cost grows with the
number of firings, not with rows x features.

Metrics against the ground truth (``learned`` is a decoder [n_latents, d_in], one row per
latent, as SAELens's ``W_dec``):

* ``mcc``: SAELens's mean correlation coefficient: |cosine| between learned and true
  directions, an optimal one-to-one matching (Hungarian: scipy's ``linear_sum_assignment``), the
  mean |cosine| over the min(n_latents, n_features) matched pairs. Without scipy the matching is
  greedy (``greedy_matching``: the largest remaining |cosine| first), a lower bound of the
  Hungarian value.
* ``recovered_share``: the share of true features that some latent's decoder direction has a
  cosine of at least ``threshold`` (0.9) with.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SyntheticConfig:
    """The knobs of the generative model (see the module docstring)."""

    n_features: int = 4096
    d_in: int = 512
    mean_l0: float = 32.0
    """Expected number of firing features per row."""
    zipf_exponent: float = 1.0
    max_prob: float = 0.25
    """No feature fires in more than this share of rows."""
    group_size: int = 4
    grouped_frac: float = 0.5
    """Share of the features that belong to a correlated group."""
    group_share: float = 0.5
    """A group's joint event fires with this share of its rarest member's probability."""
    magnitude_range: tuple[float, float] = (0.5, 2.0)
    magnitude_sigma: float = 0.3
    noise_std: float = 0.02
    offset_norm: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.mean_l0 <= self.max_prob * self.n_features:
            raise ValueError(f"mean_l0 must be in (0, max_prob x n_features = "
                             f"{self.max_prob * self.n_features:g}]")
        if not 0 < self.max_prob <= 1 or self.zipf_exponent <= 0:
            raise ValueError("need 0 < max_prob <= 1 and zipf_exponent > 0")
        if self.group_size < 2 and self.grouped_frac > 0:
            raise ValueError("group_size must be at least 2")
        if not (0 <= self.grouped_frac <= 1 and 0 <= self.group_share <= 1):
            raise ValueError("grouped_frac and group_share must be in [0, 1]")
        lo, hi = self.magnitude_range
        if not 0 < lo <= hi:
            raise ValueError("magnitude_range must be positive, low <= high")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def zipf_probabilities(n: int, mean_l0: float, exponent: float, max_prob: float) -> Tensor:
    """Probabilities ``min(max_prob, c / rank**exponent)`` for ranks 1..n (descending), with
    ``c`` such that they sum to ``mean_l0`` (found by bisection on log c)."""
    base = torch.arange(1, n + 1, dtype=torch.float64).pow(-exponent)
    lo, hi = math.log(1e-12), math.log(max_prob * n ** exponent + 1.0)
    for _ in range(200):
        mid = (lo + hi) / 2
        if (math.exp(mid) * base).clamp(max=max_prob).sum().item() < mean_l0:
            lo = mid
        else:
            hi = mid
    return (math.exp(hi) * base).clamp(max=max_prob)


def _firing_positions(n_rows: int, probs: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Bernoulli(p) processes over ``n_rows`` rows, one per probability: (index of the process,
    row) of every firing, drawn as geometric gaps between firings for all processes at once."""
    p = probs.double().clamp(0, 1 - 1e-12)
    expect = n_rows * p
    n_draw = torch.where(p > 0, (expect + 6 * expect.sqrt() + 16).ceil(), 0).long()
    owner = torch.repeat_interleave(torch.arange(len(p)), n_draw)
    u = torch.rand(len(owner), generator=gen, dtype=torch.float64).clamp_min(1e-300)
    gaps = torch.floor(torch.log(u) / torch.log1p(-p[owner])).long() + 1
    pos = torch.cumsum(gaps, 0)
    starts = torch.cumsum(n_draw, 0) - n_draw  # segment starts in the flat arrays
    before = torch.where(starts > 0, pos[(starts - 1).clamp_min(0)], 0)
    pos = pos - torch.repeat_interleave(before, n_draw) - 1
    ends = starts + n_draw - 1
    short = (n_draw > 0) & (pos[ends.clamp_min(0)] < n_rows - 1)
    keep = pos < n_rows
    owners, rows = [owner[keep]], [pos[keep]]
    for i in short.nonzero().flatten().tolist():  # ran out of draws (about 1e-9 per process)
        hit = torch.rand(n_rows, generator=gen, dtype=torch.float64) < p[i]
        last = int(pos[ends[i]])
        rest = hit.nonzero().flatten()
        rest = rest[rest > last]
        owners.append(torch.full_like(rest, i))
        rows.append(rest)
    return torch.cat(owners), torch.cat(rows)


@dataclass
class SparseCodes:
    """The true feature activations of ``n_rows`` rows, as coordinate lists."""

    n_rows: int
    rows: Tensor
    """[nnz] int64 row of each firing."""
    features: Tensor
    """[nnz] int64 feature of each firing."""
    magnitudes: Tensor
    """[nnz] float32 positive magnitude of each firing."""

    def dense(self, n_features: int) -> Tensor:
        """[n_rows, n_features] float32."""
        out = torch.zeros(self.n_rows, n_features)
        out[self.rows, self.features] = self.magnitudes
        return out

    def l0(self) -> float:
        """Mean number of firing features per row."""
        return self.rows.numel() / max(self.n_rows, 1)


@dataclass
class GroundTruth:
    """A drawn dictionary: directions, firing structure, magnitudes, offset."""

    config: SyntheticConfig
    features: Tensor
    """[n_features, d_in] unit-norm directions."""
    probs: Tensor
    """[n_features] float64 marginal firing probabilities (Zipf values, shuffled)."""
    groups: Tensor
    """[n_groups, group_size] int64 feature indices of each correlated group."""
    group_probs: Tensor
    """[n_groups] float64 probability of each group's joint event."""
    own_probs: Tensor
    """[n_features] float64 probability of firing on one's own (outside a joint event)."""
    magnitude_means: Tensor
    """[n_features] float32 mean magnitude when firing."""
    offset: Tensor
    """[d_in] the mean offset."""

    @classmethod
    def build(cls, config: SyntheticConfig) -> GroundTruth:
        c = config
        g = torch.Generator().manual_seed(c.seed)
        feats = torch.randn(c.n_features, c.d_in, generator=g)
        feats /= feats.norm(dim=1, keepdim=True)
        zipf = zipf_probabilities(c.n_features, c.mean_l0, c.zipf_exponent, c.max_prob)
        probs = zipf[torch.randperm(c.n_features, generator=g)]
        n_groups = int(c.n_features * c.grouped_frac) // c.group_size if c.group_size else 0
        groups = torch.randperm(c.n_features, generator=g)[:n_groups * c.group_size]
        groups = groups.view(n_groups, max(c.group_size, 1))
        group_probs = c.group_share * probs[groups].min(dim=1).values if n_groups else \
            torch.empty(0, dtype=torch.float64)
        own = probs.clone()
        if n_groups:
            t = group_probs[:, None].expand_as(groups)
            own[groups] = ((probs[groups] - t) / (1 - t)).clamp_min(0)
        lo, hi = c.magnitude_range
        means = lo + (hi - lo) * torch.rand(c.n_features, generator=g)
        offset = torch.randn(c.d_in, generator=g)
        offset *= c.offset_norm / offset.norm().clamp_min(1e-12)
        return cls(c, feats, probs, groups, group_probs, own, means, offset)

    def sample_codes(self, n_rows: int, seed: int) -> SparseCodes:
        """The true feature activations of ``n_rows`` new rows (seeded)."""
        g = torch.Generator().manual_seed(seed)
        f_own, r_own = _firing_positions(n_rows, self.own_probs, g)
        grp, r_grp = _firing_positions(n_rows, self.group_probs, g)
        size = self.groups.shape[1]
        r = torch.cat([r_own, r_grp.repeat_interleave(size)])
        f = torch.cat([f_own, self.groups[grp].flatten()])
        key = torch.unique(r * self.config.n_features + f)  # a joint event + own firing: once
        r, f = key // self.config.n_features, key % self.config.n_features
        s = self.config.magnitude_sigma
        z = torch.randn(len(r), generator=g)
        mags = self.magnitude_means[f] * torch.exp(s * z - s * s / 2)
        return SparseCodes(n_rows, r, f, mags)

    def activations(self, codes: SparseCodes, seed: int) -> Tensor:
        """[n_rows, d_in] float32: the codes through the dictionary, plus offset and noise."""
        g = torch.Generator().manual_seed(seed)
        crow = torch.zeros(codes.n_rows + 1, dtype=torch.int64)
        crow[1:] = torch.cumsum(torch.bincount(codes.rows, minlength=codes.n_rows), 0)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            sparse = torch.sparse_csr_tensor(crow, codes.features, codes.magnitudes,
                                             (codes.n_rows, self.config.n_features),
                                             check_invariants=False)
            x = sparse @ self.features
        x += self.offset
        if self.config.noise_std > 0:
            x += self.config.noise_std * torch.randn(x.shape, generator=g)
        return x

    def generate(self, n_rows: int, seed: int, chunk: int = 65_536) -> Iterator[Tensor]:
        """``n_rows`` activation rows in chunks (each chunk its own seeded draw)."""
        for i, start in enumerate(range(0, n_rows, chunk)):
            n = min(chunk, n_rows - start)
            codes = self.sample_codes(n, seed=seed * 1_000_003 + 2 * i)
            yield self.activations(codes, seed=seed * 1_000_003 + 2 * i + 1)


# ------------------------------------------------------------------------------------ metrics
def cosine_matrix(learned: Tensor, true: Tensor) -> Tensor:
    """[n_learned, n_true] cosine similarities between rows (float32)."""
    a = learned.float() / learned.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = true.float() / true.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


def greedy_matching(score: Tensor) -> tuple[Tensor, Tensor]:
    """A one-to-one matching that takes the largest remaining score first (as sorting all
    pairs would), done in rounds: every pair that is the maximum of both its row and its column
    among the unmatched is matched at once. Returns (row indices, column indices)."""
    s = score.float().clone()
    n = min(s.shape)
    rows_out, cols_out = [], []
    neg = torch.tensor(-math.inf)
    while sum(len(r) for r in rows_out) < n:
        col_of_row = s.argmax(dim=1)
        row_of_col = s.argmax(dim=0)
        r = torch.arange(s.shape[0])
        mutual = (row_of_col[col_of_row] == r) & torch.isfinite(s[r, col_of_row])
        rr, cc = r[mutual], col_of_row[mutual]
        rows_out.append(rr)
        cols_out.append(cc)
        s[rr, :] = neg
        s[:, cc] = neg
    return torch.cat(rows_out), torch.cat(cols_out)


def hungarian_matching(score: Tensor) -> tuple[Tensor, Tensor]:
    """The one-to-one matching of maximal total score (scipy's ``linear_sum_assignment``;
    ImportError without scipy)."""
    from scipy.optimize import linear_sum_assignment  # type: ignore[import-untyped]

    r, c = linear_sum_assignment(score.double().numpy(), maximize=True)
    return torch.as_tensor(r), torch.as_tensor(c)


def have_scipy() -> bool:
    try:
        import scipy.optimize  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return False
    return True


def mcc(learned: Tensor, true: Tensor, matching: str = "auto") -> tuple[float, str]:
    """SAELens's mean correlation coefficient (see the module docstring) and the matching used
    ("hungarian" or "greedy"; "auto": Hungarian when scipy is installed)."""
    score = cosine_matrix(learned, true).abs()
    if matching == "auto":
        matching = "hungarian" if have_scipy() else "greedy"
    r, c = (hungarian_matching if matching == "hungarian" else greedy_matching)(score)
    return score[r, c].mean().item(), matching


def recovered_share(learned: Tensor, true: Tensor, threshold: float = 0.9) -> float:
    """Share of true features whose best cosine with any learned direction is >= threshold."""
    best = cosine_matrix(learned, true).max(dim=0).values
    return (best >= threshold).float().mean().item()
