"""Fixed-binary-tree (TBIK) reference ops in plain torch: bit-exact by construction.

Every reduction here is built from elementwise IEEE operations only (multiply, add, divide,
sqrt, max) applied in one fixed order, so an output element's bits depend on its own inputs
alone: not on the batch size, on which rows share the call, on prefill vs decode, on how the
work is chunked, or on how K is split over 2^p tensor-parallel ranks. Library reductions
(``sum``, ``matmul``, ``exp`` with SIMD/scalar tails) promise none of that, so none is used.

The tree over K.  ``K`` is cut into ``P = k_pieces(K)`` equal contiguous pieces (P the largest
power of two <= ``MAX_TP`` dividing K); each piece is zero-padded at its end to a power of two
and the padded sequence (a power-of-two length) is summed by adding adjacent pairs level by
level.  A rank that holds K/2^p contiguous columns (2^p <= P) therefore holds exactly P/2^p
whole pieces, i.e. one whole subtree, and ``combine_partials`` finishes the top p levels in
rank order: the same tree as TP=1.  (Padding the global K to a power of two and slicing it
would not do: the even shards of, e.g., K=5632 would not fall on subtree boundaries.)
For K a power of two this is plain "pad nothing, add adjacent pairs".
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_TP = 8               # largest tensor-parallel split of K the tree supports
_CHUNK_ELEMS = 1 << 24   # bound temporaries to ~64 MB of float32 per chunk


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def k_pieces(K: int) -> int:
    """Number of top-level pieces of the K tree: largest power of two <= MAX_TP dividing K."""
    p = MAX_TP
    while K % p:
        p //= 2
    return p


def tree_pad(x: torch.Tensor, pieces: int = 1) -> torch.Tensor:
    """Zero-pad the last dim so that each of ``pieces`` equal pieces has a power-of-two length."""
    K = x.shape[-1]
    if K % pieces:
        raise ValueError(f"length {K} is not divisible into {pieces} tree pieces")
    L = K // pieces
    Lp = _pow2(L)
    if Lp == L:
        return x
    x = F.pad(x.reshape(*x.shape[:-1], pieces, L), (0, Lp - L))
    return x.reshape(*x.shape[:-2], pieces * Lp)


def _pairwise(x: torch.Tensor) -> torch.Tensor:
    """Sum a power-of-two last dim by adding adjacent pairs level by level."""
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


def tree_sum(x: torch.Tensor, dim: int = -1, pieces: int = 1) -> torch.Tensor:
    """Sum over ``dim`` along the fixed binary tree (zero-padded to a power of two)."""
    return _pairwise(tree_pad(x.movedim(dim, -1), pieces))


def combine_partials(partials) -> torch.Tensor:
    """Finish the top levels of the tree: partials[r] is rank r's subtree root (a list or a
    tensor stacked on dim 0, length a power of two), combined pairwise in rank order."""
    n = len(partials)
    if n == 0 or n & (n - 1):
        raise ValueError(f"the number of partials must be a power of two, got {n}")
    if isinstance(partials, torch.Tensor):
        while partials.shape[0] > 1:     # one add per level; the same adds as the list form
            partials = partials[0::2] + partials[1::2]
        return partials[0]
    while len(partials) > 1:
        partials = [partials[i] + partials[i + 1] for i in range(0, len(partials), 2)]
    return partials[0]


def _as_float(w) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        return w.float()
    return w.dequantize(torch.float32)  # QuantWeight


def _tree_dot(x: torch.Tensor, w: torch.Tensor, pieces: int) -> torch.Tensor:
    """[M, K] x [N, K] -> [M, N] float32; tree over K in ``pieces`` pieces; chunked over M, N."""
    x = tree_pad(x.float(), pieces)
    w = tree_pad(w, pieces)
    M, Kp = x.shape
    N = w.shape[0]
    out = torch.empty(M, N, dtype=torch.float32, device=x.device)
    n_step = max(1, min(N, _CHUNK_ELEMS // Kp))
    m_step = max(1, _CHUNK_ELEMS // (n_step * Kp))
    for n0 in range(0, N, n_step):
        wc = w[n0:n0 + n_step]
        for m0 in range(0, M, m_step):
            out[m0:m0 + m_step, n0:n0 + n_step] = _pairwise(x[m0:m0 + m_step, None, :] * wc[None])
    return out


def tree_matmul_partial(x_local: torch.Tensor, w_local, parts: int) -> torch.Tensor:
    """One rank's subtree root of a row-parallel linear: x_local [M, K/parts] @ w_local[N, K/parts].T
    in float32, where the global K is split into ``parts`` (a power of two <= MAX_TP) equal
    contiguous slices.  ``parts`` is needed because the tree is defined on the global K."""
    K = x_local.shape[-1] * parts
    pieces = k_pieces(K)
    if parts > pieces or pieces % parts:
        raise ValueError(f"K={K} cannot be split into {parts} subtrees (tree has {pieces} pieces)")
    return _tree_dot(x_local, _as_float(w_local), pieces // parts)


def tree_matmul(x: torch.Tensor, w, out_dtype: "torch.dtype | None" = None) -> torch.Tensor:
    """x [M, K] @ w[N, K].T with float32 products summed along the K tree.  ``w`` may be a
    QuantWeight (dequantized to float32 first).  Returns float32 unless ``out_dtype``."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = _tree_dot(x2, _as_float(w), k_pieces(x2.shape[-1]))
    y = y.reshape(*lead, y.shape[-1])
    return y if out_dtype is None else y.to(out_dtype)


# ---- deterministic transcendental functions -------------------------------------------
# torch.exp / torch.log on CPU use SIMD (Sleef) code for most elements and libm for the tail
# of each vector loop, so an element's result can depend on where it sits in the tensor.
# These versions use IEEE mul/add/div only (evaluated in float64, rounded once to float32).

_LN2 = math.log(2.0)


def _pow2_f64(n: torch.Tensor) -> torch.Tensor:
    """2.0 ** n for integer-valued float64 n in [-1022, 1023], exactly, via the exponent bits."""
    return ((n.to(torch.int64) + 1023) << 52).view(torch.float64)


def exp_det(x: torch.Tensor) -> torch.Tensor:
    """exp(x) as float32 (|error| <= ~0.5 ulp): exp(r) * 2^n with |r| <= ln2/2, Taylor to r^13."""
    z = x.double().clamp(-700.0, 88.8)
    n = torch.round(z / _LN2)
    r = z - n * _LN2
    p = torch.ones_like(r)
    for k in range(13, 0, -1):
        p = p * (r / k) + 1.0
    return (p * _pow2_f64(n)).float()


def log_det(x: torch.Tensor) -> torch.Tensor:
    """log(x) as float32 for x > 0 (finite): e*ln2 + 2*atanh((m-1)/(m+1)), m in [sqrt(.5), sqrt(2))."""
    m, e = torch.frexp(x.double())           # x = m * 2^e, m in [0.5, 1); exact
    small = m < math.sqrt(0.5)
    m = torch.where(small, m * 2.0, m)
    e = (e - small.to(e.dtype)).double()
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    p = torch.zeros_like(s)
    for k in range(21, 0, -2):
        p = p * s2 + 1.0 / k
    return (e * _LN2 + 2.0 * s * p).float()


# ---- row ops --------------------------------------------------------------------------

def rmsnorm_tree(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * weight / sqrt(mean(x^2) + eps), computed in float32, returned in x's dtype."""
    xf = x.float()
    ms = tree_sum(xf * xf, -1) / x.shape[-1]
    inv = 1.0 / torch.sqrt(ms + eps)
    return (xf * inv[..., None] * weight.float()).to(x.dtype)


def _exp_shifted(x: torch.Tensor, dim: int):
    m = x.amax(dim, keepdim=True)            # max is exact, order-free
    return exp_det(x - m), m


def softmax_tree(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Numerically stable softmax in float32 with the denominator summed by tree."""
    e, _ = _exp_shifted(x.float(), dim)
    return e / tree_sum(e, dim).unsqueeze(dim)


def log_softmax_tree(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log-softmax in float32: (x - max) - log(tree_sum(exp(x - max)))."""
    xf = x.float()
    e, m = _exp_shifted(xf, dim)
    return (xf - m) - log_det(tree_sum(e, dim)).unsqueeze(dim)


# ---- attention ------------------------------------------------------------------------

def attention_tree(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor,
                   scale: float, kv_split: int = 64) -> torch.Tensor:
    """Causal grouped-query attention, exact per query row.

    q [Tq, Hq, D], k/v [Tk, Hkv, D]; query row t sits at absolute position q_positions[t] and
    sees keys 0..q_positions[t] (key j is at position j).  Scores are tree sums over D; the key
    axis is cut into chunks of ``kv_split`` starting at position 0; each chunk's softmax sums
    and value sums are tree sums over the chunk (masked keys are exact zeros), and chunks are
    merged left to right with the usual running max.  A row's bits therefore depend only on
    its own q, its position and keys 0..pos: not on Tq, on the other rows, or on Tk.
    Returns float32 [Tq, Hq, D].
    """
    Tq, Hq, D = q.shape
    Tk, Hkv, _ = k.shape
    g = Hq // Hkv
    S = kv_split
    n_chunks = -(-Tk // S)
    pad = n_chunks * S - Tk
    kf = F.pad(k.float(), (0, 0, 0, 0, 0, pad))
    vf = F.pad(v.float(), (0, 0, 0, 0, 0, pad))
    # [Hkv, g] grouping: query head h uses kv head h // g.
    qf = q.float().reshape(Tq, Hkv, g, D)
    pos = q_positions.to(torch.int64)
    out = torch.empty(Tq, Hkv, g, D, dtype=torch.float32, device=q.device)
    rows = max(1, _CHUNK_ELEMS // (Hq * S * _pow2(D)))
    for t0 in range(0, Tq, rows):
        qb, pb = qf[t0:t0 + rows], pos[t0:t0 + rows]
        out[t0:t0 + rows] = _attention_rows(qb, pb, kf, vf, scale, S, int(pb.max()) // S + 1)
    return out.reshape(Tq, Hq, D)


def _attention_rows(q, pos, k, v, scale, S, n_chunks):
    T, Hkv, g, D = q.shape
    shape = (T, Hkv, g)
    m_run = torch.full(shape, -math.inf, device=q.device)
    l_run = torch.zeros(shape, device=q.device)
    o_run = torch.zeros(*shape, D, device=q.device)
    for c in range(n_chunks):
        kc = k[c * S:(c + 1) * S].permute(1, 0, 2)            # [Hkv, S, D]
        vc = v[c * S:(c + 1) * S].permute(1, 2, 0)            # [Hkv, D, S]
        s = tree_sum(q[:, :, :, None, :] * kc[None, :, None], -1) * scale   # [T, Hkv, g, S]
        key_pos = torch.arange(c * S, (c + 1) * S, device=q.device)
        valid = (key_pos[None, :] <= pos[:, None])[:, None, None, :]        # [T, 1, 1, S]
        s = torch.where(valid, s, -math.inf)
        m_c = s.amax(-1)
        has = valid.any(-1)                                                 # [T, 1, 1]
        p = torch.where(valid, exp_det(s - torch.where(has, m_c, 0.0)[..., None]), 0.0)
        l_c = tree_sum(p, -1)
        o_c = tree_sum(p[..., None, :] * vc[None, :, None], -1)             # [T, Hkv, g, D]
        first = torch.isinf(m_run)                                          # nothing merged yet
        m_new = torch.maximum(m_run, m_c)
        a = exp_det(torch.where(first, 0.0, m_run - m_new))
        b = exp_det(torch.where(has, m_c - m_new, 0.0))
        l_new = torch.where(first, l_c, l_run * a + l_c * b)
        o_new = torch.where(first[..., None], o_c, o_run * a[..., None] + o_c * b[..., None])
        m_run = torch.where(has, m_new, m_run)
        l_run = torch.where(has, l_new, l_run)
        o_run = torch.where(has[..., None], o_new, o_run)
    return o_run / l_run[..., None]
