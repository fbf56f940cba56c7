"""The patch-level kNN method ``patch-knn`` (PatchCore-style), ``PatchKNN``: a memory bank of the normal training
patch tokens, subsampled by a greedy coreset, and an image score = the largest distance of any of the image's patch
tokens to its nearest bank token; the evidence map is every token's distance on the token grid.

Pieces (pure functions, each tested against a brute-force reference in tests/test_patchknn.py):

- :func:`neighbourhood_average`: optional KxK local averaging of the tokens on their square grid (stride 1,
  zero padding not counted), as PatchCore aggregates each patch with its 3x3 neighbourhood before matching;
  applied identically to training and test tokens.
- :func:`greedy_coreset`: greedy k-centre selection (each new bank token is the one farthest from those
  chosen so far), on a fixed Gaussian random projection to ``proj_dim`` dimensions when the tokens are wider
  (PatchCore's sparse projection plays the same role: it only makes the selection cheaper; ``PROJ_DIM``).
  The first centre is drawn with the seed, so the bank is reproducible.
- :func:`nearest_distances`: the Euclidean distance of every query token to its nearest bank token, in blocks
  of queries x blocks of bank tokens with a running minimum, so memory stays bounded by
  ``block_elems`` (never all test tokens x the whole bank at once). Float32 on the model's device. Traced for
  export it blocks the bank only (the bank is fixed, the batch is not), so an exported graph holds
  ``batch x tokens x EXPORT_BANK_BLOCK`` distances at a time.

Scores are distances in the cached feature space (no normalisation), as PatchCore scores; PatchCore's
re-weighting of the maximum by the density around its nearest bank token is not applied.
Which layer, fraction and neighbourhood the defaults use, and why: benchmarks/patchknn_settings.md.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SanfError
from ..flow.normalizer import pool_grid
from .base import AnomalyModel, as_tensor

DEFAULT_CORESET = 0.1
DEFAULT_NEIGHBOURHOOD = 3
# the greedy selection streams all n projected tokens once per chosen token: 64 dims keep a few hundred thousand
# tokens within a CPU's last-level cache (benchmarks/patchknn_settings.md); PatchCore projects to 128
PROJ_DIM = 64
_BLOCK_ELEMS = 1 << 24  # query x bank distances held at once (64 MiB of float32)


EXPORT_BANK_BLOCK = 4096
IMAGE_BLOCK = 64  # images per forward when scoring arrays (the query block of nearest_distances)


def square_grid(num_tokens: int) -> int:
    h = int(round(float(num_tokens) ** 0.5))  # float(): a traced shape (detector export) is a 0-d tensor
    if h * h != num_tokens:
        raise SanfError(f"patch-knn's neighbourhood needs a square patch grid; the cache has {num_tokens} tokens "
                        f"per image (use neighbourhood 1)")
    return h


def neighbourhood_average(patch: torch.Tensor, k: int) -> torch.Tensor:
    """``(n, H*H, d)`` tokens -> the mean of each token's KxK grid neighbourhood (same shape; K odd)."""
    if k == 1:
        return patch
    if k < 1 or k % 2 == 0:
        raise SanfError(f"the neighbourhood must be an odd positive size (1, 3, 5, ...), got {k}")
    n, t, d = patch.shape
    h = square_grid(t)
    fmap = patch.transpose(1, 2).reshape(n, d, h, h)
    out = F.avg_pool2d(fmap, k, stride=1, padding=k // 2, count_include_pad=False)
    return out.flatten(2).transpose(1, 2)


def _project(x: torch.Tensor, proj_dim: int | None, seed: int) -> torch.Tensor:
    if proj_dim is None or x.shape[1] <= proj_dim:
        return x
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(x.shape[1], proj_dim, generator=g, dtype=torch.float32) / math.sqrt(proj_dim)
    return x @ w.to(x.device)


def coreset_size(n: int, fraction: float) -> int:
    if not 0.0 < fraction <= 1.0:
        raise SanfError(f"the coreset fraction must be in (0, 1], got {fraction}")
    return max(1, min(n, math.ceil(fraction * n)))


def greedy_coreset(x: torch.Tensor, fraction: float, *, proj_dim: int | None = PROJ_DIM, seed: int = 0,
                   progress=None, pool: int = 2048) -> torch.Tensor:
    """Indices (int64, in selection order) of a greedy k-centre coreset of the rows of ``x`` (m = ceil(f n)).

    Exactly the plain greedy selection (each pick is the row farthest from those chosen so far), computed lazily:
    the ``pool`` rows farthest from the chosen set are kept as candidates and updated after every pick, which is
    cheap; a candidate is picked only while its distance is at least the largest distance of any non-candidate
    (distances only shrink, so that bound stays valid), otherwise every row is updated at once with one matrix
    product against the centres picked since the last full update. The plain loop streams all n rows once per
    pick; this streams them once per batch of picks.
    """
    n = len(x)
    m = coreset_size(n, fraction)
    if m == n:
        return torch.arange(n, device=x.device)
    z = _project(x.float(), proj_dim, seed)
    sq = (z * z).sum(1)
    first = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    chosen = [first]
    # squared distance of every row to its nearest chosen centre, via |a|^2 + |c|^2 - 2 a.c (no n x d temporary)
    mind = (sq + sq[first] - 2.0 * (z @ z[first])).clamp_min_(0.0)
    mind[first] = -1.0  # stays below every distance, so a chosen row is never picked twice
    while len(chosen) < m:
        k = min(pool, n)
        top = torch.topk(mind, min(k + 1, n), sorted=True)
        cand = top.indices[:k]
        bound = float(top.values[k]) if k < n else -math.inf  # no non-candidate is farther than this
        cm = mind[cand].clone()
        zc, sqc = z[cand], sq[cand]
        new = []
        while len(chosen) < m:
            j = int(torch.argmax(cm))
            if float(cm[j]) < bound or float(cm[j]) < 0.0:
                break
            i = int(cand[j])
            chosen.append(i)
            new.append(i)
            torch.minimum(cm, (sqc + sq[i] - 2.0 * (zc @ z[i])).clamp_min_(0.0), out=cm)
            cm[j] = -1.0
        if not new:  # the bound is tight (ties): take the overall argmax as the plain loop does
            i = int(torch.argmax(mind))
            chosen.append(i)
            new.append(i)
        for start in range(0, len(new), 256):  # every row against the new centres, in blocks of centres
            c = z[new[start:start + 256]]
            d = torch.addmm(sq[:, None] + (c * c).sum(1)[None, :], z, c.T, alpha=-2.0).amin(1).clamp_min_(0.0)
            torch.minimum(mind, d, out=mind)
        mind[new] = -1.0
        if progress is not None:
            progress(len(new))
    return torch.tensor(chosen, dtype=torch.long, device=x.device)


def nearest_distances(query: torch.Tensor, bank: torch.Tensor, *, block_elems: int = _BLOCK_ELEMS) -> torch.Tensor:
    """Euclidean distance of every row of ``query`` to its nearest row of ``bank`` (blocked, bounded memory)."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return _nearest_traced(query, bank)
    nq, nb = len(query), len(bank)
    bq = max(1, min(nq, block_elems // max(nb, 1)))  # whole bank per query block when it fits
    bb = max(1, min(nb, block_elems // bq))
    bank_sq = (bank * bank).sum(1)
    out = torch.empty(nq, dtype=torch.float32, device=query.device)
    for qs in range(0, nq, bq):
        q = query[qs:qs + bq]
        q_sq = (q * q).sum(1, keepdim=True)
        best = torch.full((len(q),), float("inf"), device=query.device)
        for bs in range(0, nb, bb):
            d2 = torch.addmm(q_sq + bank_sq[None, bs:bs + bb], q, bank[bs:bs + bb].T, alpha=-2.0)
            torch.minimum(best, d2.amin(1), out=best)
        out[qs:qs + len(q)] = best.clamp_min_(0.0).sqrt_()
    return out


def _nearest_traced(query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """``nearest_distances`` as a graph of fixed bank blocks (no shape-dependent Python loop over the queries)."""
    bank_sq = (bank * bank).sum(1)
    q_sq = (query * query).sum(1, keepdim=True)
    best = None
    for bs in range(0, len(bank), EXPORT_BANK_BLOCK):
        d2 = torch.addmm(q_sq + bank_sq[None, bs:bs + EXPORT_BANK_BLOCK], query, bank[bs:bs + EXPORT_BANK_BLOCK].T,
                         alpha=-2.0).amin(1)
        best = d2 if best is None else torch.minimum(best, d2)
    return best.clamp_min(0.0).sqrt()


def token_grid(num_tokens: int) -> tuple[int, int]:
    """The (H, W) of a token row: square when it can be, else one row."""
    h = int(round(float(num_tokens) ** 0.5))
    return (h, h) if h * h == num_tokens else (1, int(num_tokens))


class PatchKNN(AnomalyModel):
    """``patch-knn``: ``token_pool`` (a flow run's patch part pools as its flow does), the KxK neighbourhood average,
    the greedy-coreset memory bank; score = the largest nearest-bank distance of any token (float32 distances)."""

    name = "patch-knn"
    needs_patch = True
    has_map = True
    batch_size = IMAGE_BLOCK

    def __init__(self, coreset: float = DEFAULT_CORESET, neighbourhood: int = DEFAULT_NEIGHBOURHOOD, *,
                 proj_dim: int = PROJ_DIM, seed: int = 0, token_pool: int = 1, block_elems: int = _BLOCK_ELEMS):
        super().__init__()
        self.coreset, self.neighbourhood = float(coreset), int(neighbourhood)
        coreset_size(1, self.coreset)
        if self.neighbourhood < 1 or self.neighbourhood % 2 == 0:
            raise SanfError(f"the neighbourhood must be an odd positive size (1, 3, 5, ...), got {neighbourhood}")
        self.proj_dim, self.seed, self.token_pool = int(proj_dim), int(seed), int(token_pool)
        self.block_elems = int(block_elems)
        self.n_train_patches: int | None = None
        self.register_buffer("bank", torch.zeros(0, 0))

    @property
    def description(self) -> str:
        return (f"largest distance of any patch token to its nearest normal training patch token (greedy coreset "
                f"{self.coreset:g}, {self.neighbourhood}x{self.neighbourhood} neighbourhood average)")

    def settings(self) -> dict:
        return {"coreset": self.coreset, "neighbourhood": self.neighbourhood, "proj_dim": self.proj_dim,
                "coreset_seed": self.seed, "bank_size": int(len(self.bank)) or None,
                "n_train_patches": self.n_train_patches}

    def config(self) -> dict:
        return {"method": self.name, "coreset": self.coreset, "neighbourhood": self.neighbourhood,
                "proj_dim": self.proj_dim, "seed": self.seed, "token_pool": self.token_pool,
                "n_train_patches": self.n_train_patches}

    @classmethod
    def from_config(cls, config: dict) -> PatchKNN:
        model = cls(config["coreset"], config["neighbourhood"], proj_dim=config["proj_dim"], seed=config["seed"],
                    token_pool=config.get("token_pool", 1))
        model.n_train_patches = config.get("n_train_patches")
        return model

    def tokens(self, patch: torch.Tensor) -> torch.Tensor:
        """The tokens the bank holds and queries: pooled, then neighbourhood-averaged ``(B, T, d)`` float32."""
        return neighbourhood_average(pool_grid(patch.to(torch.float32), self.token_pool), self.neighbourhood)

    def fit(self, cls, patch: np.ndarray | None = None, *, device="cpu", quiet: bool = True) -> PatchKNN:
        if patch is None or np.ndim(patch) != 3 or len(patch) == 0:
            raise SanfError("patch-knn needs the patch tokens of the normal training images; the cache has none")
        n = len(patch)
        t = patch.shape[1] // (self.token_pool ** 2)
        if self.neighbourhood > 1:
            square_grid(t)
        d = patch.shape[2]
        tokens = torch.cat([self.tokens(as_tensor(patch[s:s + IMAGE_BLOCK], device)).reshape(-1, d)
                            for s in range(0, n, IMAGE_BLOCK)])
        self.n_train_patches = int(len(tokens))
        from ..progress import progress_bar

        with progress_bar(quiet, unit="tokens") as bar:
            task = bar.add_task("patch-knn coreset", total=coreset_size(len(tokens), self.coreset) - 1, rate="")
            idx = greedy_coreset(tokens, self.coreset, proj_dim=self.proj_dim, seed=self.seed,
                                 progress=lambda k: bar.advance(task, k))
        self.bank = tokens[idx].contiguous()
        return self

    def parts(self, cls, patch: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if patch is None or patch.dim() != 3:
            raise SanfError("patch-knn needs the test patch tokens; the cache has none")
        q = self.tokens(patch)
        b, t, d = q.shape
        if d != self.bank.shape[1]:
            raise SanfError(f"the test patch tokens have {d} channels, the memory bank {self.bank.shape[1]}")
        dist = nearest_distances(q.reshape(-1, d), self.bank, block_elems=self.block_elems).reshape(b, t)
        return {"score": dist.amax(1).double(), "map": dist.reshape(b, *token_grid(t))}
