"""Paged flash attention in Triton: one kernel for prefill, chunked prefill and decode.

Layout as ``attention.paged_attention_ref``: packed query rows q [T, Hq, D]; sequence s owns
rows cu_seqlens_q[s]:cu_seqlens_q[s+1], the last ones of its context of context_lens[s] tokens,
whose K/V sit in the pages block_tables[s] of k_cache/v_cache [num_blocks, page, Hkv, D].

A program owns one query tile of one sequence and one KV head: BLOCK_Q tokens x GROUP_P query
heads of that KV head (grouped-query heads share each K/V load), and one KV *split*: the key
range [split * SPLIT, (split + 1) * SPLIT), walked in BLOCK_N chunks with an online softmax
(scores in log2 units, exp2). Split partials (unnormalised acc, running max m, sum l) are
merged one split after another, in split order: by ``_combine_kernel``, or, in fast-mode decode,
by the last split program of each (sequence, KV head) to finish (``_combine_if_last``: one
launch per decode step instead of two).

Batch invariance: SPLIT is a number of tokens (not a number of splits) and chunk boundaries
are absolute key positions, so a query row meets the same chunks in the same order whatever
tile, batch or step (prefill, chunked prefill, decode) it is in; chunks past the row's own
position are fully masked, an exact no-op for the online softmax (alpha = 2^0 = 1, p = 0).
The invariant mode fixes every tile size (``INVARIANT_TILES``) and always merges through
the combine kernel. Fast mode runs prefill unsplit and picks the decode split from the shapes.

Grid sizes come from tensor shapes only (an upper bound on tiles, found per program by a
binary search of the per-sequence tile counts; a split bound from the block-table width), so
the launch never reads device values on the host and can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from exactllm.kernels import pdl

# (BLOCK_M query rows, BLOCK_N keys, num_warps) of the invariant mode, for every step kind.
INVARIANT_TILES = (64, 64, 4)


@triton.jit
def _find_seq(cum_ptr, n_seqs, idx, n_iter):
    """Largest s in [0, n_seqs) with cum[s] <= idx (cum nondecreasing, cum[0] = 0)."""
    lo = 0
    hi = n_seqs
    for _ in range(n_iter):
        mid = (lo + hi) // 2
        go = tl.load(cum_ptr + mid) <= idx
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


@triton.jit
def _load_kv(k_ptr, v_ptr, bt_row, kpos, bound, d, kvh, stride_kb, stride_kt, stride_kh, PAGE: tl.constexpr,
             MASKED: tl.constexpr):
    """K and V [len(kpos), HEAD_DIM] of keys kpos (masked: those < bound; zeros elsewhere)."""
    if MASKED:
        kin = kpos < bound
        page = tl.load(bt_row + kpos // PAGE, mask=kin, other=0).to(tl.int64)
    else:
        page = tl.load(bt_row + kpos // PAGE).to(tl.int64)
    kv_off = page * stride_kb + (kpos % PAGE) * stride_kt + kvh * stride_kh
    if MASKED:
        k = tl.load(k_ptr + kv_off[:, None] + d[None, :], mask=kin[:, None], other=0.0)
        v = tl.load(v_ptr + kv_off[:, None] + d[None, :], mask=kin[:, None], other=0.0)
    else:
        k = tl.load(k_ptr + kv_off[:, None] + d[None, :])
        v = tl.load(v_ptr + kv_off[:, None] + d[None, :])
    return k, v


@triton.jit
def _attn_update(q, k, v, kpos, hi, pos, qk_scale, m_i, l_i, acc, PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """One online-softmax step over the keys kpos with their K and V (masked: causal and < hi)."""
    sc = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        ok = (kpos[None, :] <= pos[:, None]) & (kpos < hi)[None, :]
        sc = tl.where(ok, sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(sc - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attn_chunk(q, k_ptr, v_ptr, bt_row, n0, hi, pos, d, kvh, stride_kb, stride_kt, stride_kh, qk_scale,
                m_i, l_i, acc, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr,
                MASKED: tl.constexpr):
    """One online-softmax step over keys n0 .. n0 + BLOCK_N (masked: causal and < hi)."""
    kpos = n0 + tl.arange(0, BLOCK_N)
    k, v = _load_kv(k_ptr, v_ptr, bt_row, kpos, hi, d, kvh, stride_kb, stride_kt, stride_kh, PAGE, MASKED)
    return _attn_update(q, k, v, kpos, hi, pos, qk_scale, m_i, l_i, acc, PRECISION, MASKED)


@triton.jit
def _attn_kernel(q_ptr, k_ptr, v_ptr, o_ptr, ws_ptr, ml_ptr, cnt_ptr, cu_q_ptr, ctx_ptr, bt_ptr, tile_cu_ptr,
                 n_seqs, n_iter, qk_scale, T, HQ,
                 stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_kt, stride_kh, stride_bt,
                 GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                 HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, SPLIT: tl.constexpr, SPLIT_OUT: tl.constexpr,
                 PRECISION: tl.constexpr, DECODE: tl.constexpr, INVARIANT: tl.constexpr,
                 FUSED_COMBINE: tl.constexpr, PDL: tl.constexpr):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    d = tl.arange(0, HEAD_DIM)
    # DECODE: one query row per sequence, tile s is row s of sequence s (only indexing differs)
    if DECODE and not INVARIANT:
        s = tile
        q_start = tile
        q_len = 1
        t0 = 0
        ctx = tl.load(ctx_ptr + s)
        if split * SPLIT >= tl.maximum(ctx, 1):  # no keys here (split 0 of a padding row writes its zeros)
            return
        # Before the wait for the previous kernel: the context length, the page table and every
        # key and value but the newest were written before this step began (by the host, or by
        # earlier steps), so this program's first chunk of them loads under the previous
        # kernel's tail. Only q and the newest key's K/V (position ctx - 1, stored by the qkv
        # kernel just before) are read after the wait, and patched into the chunk.
        bt_row = bt_ptr + s.to(tl.int64) * stride_bt
        kpos0 = split * SPLIT + tl.arange(0, BLOCK_N)
        k0, v0 = _load_kv(k_ptr, v_ptr, bt_row, kpos0, tl.minimum(split * SPLIT + SPLIT, ctx - 1), d, kvh,
                          stride_kb, stride_kt, stride_kh, PAGE, True)
        newest = ctx - 1
        new_in = (newest >= split * SPLIT) & (newest < split * SPLIT + BLOCK_N)
        new_page = tl.load(bt_row + newest // PAGE, mask=new_in, other=0).to(tl.int64)
        new_off = new_page * stride_kb + (newest % PAGE) * stride_kt + kvh * stride_kh
        pdl.enter(PDL)
    elif DECODE:  # the invariant modes keep the order that was checked on the GPU (decode == prefill bits)
        pdl.enter(PDL)
        s = tile
        q_start = tile
        q_len = 1
        t0 = 0
        ctx = tl.load(ctx_ptr + s)
        bt_row = bt_ptr + s.to(tl.int64) * stride_bt
    else:
        pdl.enter(PDL)
        if tile >= tl.load(tile_cu_ptr + n_seqs):
            return
        s = _find_seq(tile_cu_ptr, n_seqs, tile, n_iter)
        q_start = tl.load(cu_q_ptr + s)
        q_len = tl.load(cu_q_ptr + s + 1) - q_start
        t0 = (tile - tl.load(tile_cu_ptr + s)) * BLOCK_Q
        ctx = tl.load(ctx_ptr + s)
        bt_row = bt_ptr + s.to(tl.int64) * stride_bt
    kv_end = ctx - q_len + tl.minimum(t0 + BLOCK_Q, q_len)  # keys any row of this tile may see
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P
    r = tl.arange(0, BLOCK_M)
    tok = t0 + r // GROUP_P
    head = kvh * GROUP + r % GROUP_P
    row_ok = (tok < q_len) & (r % GROUP_P < GROUP)
    pos = ctx - q_len + tok                   # absolute position of each query row
    row = (q_start + tok).to(tl.int64)
    o_ptrs = o_ptr + row[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    if FUSED_COMBINE or not SPLIT_OUT:
        if kv_end <= 0:  # padding rows (no context): zeros, as the combine kernel writes
            if split == 0:
                tl.store(o_ptrs, tl.zeros((BLOCK_M, HEAD_DIM), tl.float32).to(o_ptr.dtype.element_ty),
                         mask=row_ok[:, None])
            return
    lo = split * SPLIT
    if lo >= kv_end:
        return
    hi = tl.minimum(lo + SPLIT, kv_end)
    q = tl.load(q_ptr + row[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    # Fast mode: chunks wholly below the tile's first position are visible to every row, so they
    # skip the masks. Not in the invariant modes: which chunks those are depends on how rows are
    # tiled (prefill vs decode), and the compiler may contract the unmasked path's scale multiply
    # and max subtraction into one FMA, which rounds differently (seen on H100: decode and
    # prefill log-probs parted at a split boundary). Masking every chunk keeps one arithmetic.
    if INVARIANT:
        full_end = lo
    else:
        full_end = lo + tl.maximum(tl.minimum(hi, ctx - q_len + t0 + 1) - lo, 0) // BLOCK_N * BLOCK_N
    first = lo
    if DECODE and not INVARIANT:  # the preloaded chunk, the newest key patched in: the tile the loop would load
        k_new = tl.load(k_ptr + new_off + d, mask=tl.where(new_in, d < HEAD_DIM, False), other=0.0)
        v_new = tl.load(v_ptr + new_off + d, mask=tl.where(new_in, d < HEAD_DIM, False), other=0.0)
        is_new = (kpos0 == newest)[:, None]
        k0 = tl.where(is_new, k_new[None, :], k0)
        v0 = tl.where(is_new, v_new[None, :], v0)
        if lo + BLOCK_N <= full_end:
            m_i, l_i, acc = _attn_update(q, k0, v0, kpos0, hi, pos, qk_scale, m_i, l_i, acc, PRECISION, False)
        else:
            m_i, l_i, acc = _attn_update(q, k0, v0, kpos0, hi, pos, qk_scale, m_i, l_i, acc, PRECISION, True)
        first = lo + BLOCK_N
    for n0 in range(first, full_end, BLOCK_N):
        m_i, l_i, acc = _attn_chunk(q, k_ptr, v_ptr, bt_row, n0, hi, pos, d, kvh, stride_kb, stride_kt, stride_kh,
                                    qk_scale, m_i, l_i, acc, BLOCK_N, PAGE, PRECISION, False)
    for n0 in range(tl.maximum(full_end, first), hi, BLOCK_N):
        m_i, l_i, acc = _attn_chunk(q, k_ptr, v_ptr, bt_row, n0, hi, pos, d, kvh, stride_kb, stride_kt, stride_kh,
                                    qk_scale, m_i, l_i, acc, BLOCK_N, PAGE, PRECISION, True)

    if SPLIT_OUT:
        # workspace [n_splits, T, HQ, D] float32 and [n_splits, T, HQ, 2] (m, l)
        base = (split * T + row) * HQ + head
        tl.store(ws_ptr + base[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])
        tl.store(ml_ptr + base * 2, m_i, mask=row_ok)
        tl.store(ml_ptr + base * 2 + 1, l_i, mask=row_ok)
        if FUSED_COMBINE:
            _combine_if_last(ws_ptr, ml_ptr, cnt_ptr + s * tl.num_programs(1) + kvh, o_ptrs, row, head, row_ok, d,
                             tl.cdiv(kv_end, SPLIT), T, HQ, HEAD_DIM)
    else:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _combine_if_last(ws_ptr, ml_ptr, cnt_ptr, o_ptrs, row, head, row_ok, d, n_active, T, HQ, HEAD_DIM: tl.constexpr):
    """Fast-mode decode: the last of a (sequence, KV head)'s n_active split programs to finish
    merges all their partials, split 0 first, so no combine kernel is launched. Each program
    counts itself in at cnt_ptr after its partials are stored (barrier, then an acq_rel atomic
    at GPU scope); the last one resets the counter to 0 for the next launch and reads the
    partials past L1 (.cg). Counters are shared per device: one stream at a time."""
    tl.debug_barrier()
    ticket = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == n_active - 1:
        tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")
        out = _merged_partials(ws_ptr, ml_ptr, row, head, row_ok, d, n_active, T, HQ, HEAD_DIM, True)
        tl.store(o_ptrs, out.to(o_ptrs.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _partial(ws_ptr, ml_ptr, i, n_parts, row, head, mask, d, T, HQ, HEAD_DIM: tl.constexpr, CG: tl.constexpr,
             L_OTHER: tl.constexpr):
    """Split i's running max m, sum l and unnormalized acc for token ``row``, heads ``head`` (none
    loaded where not ``mask`` or i >= n_parts)."""
    b = (i * T + row) * HQ + head
    mask = tl.where(i < n_parts, mask, False)
    m = tl.load(ml_ptr + b * 2, mask=mask, other=0.0, cache_modifier=".cg" if CG else "")
    l = tl.load(ml_ptr + b * 2 + 1, mask=mask, other=L_OTHER, cache_modifier=".cg" if CG else "")
    a = tl.load(ws_ptr + b[:, None] * HEAD_DIM + d[None, :], mask=mask[:, None], other=0.0,
                cache_modifier=".cg" if CG else "")
    return m, l, a


@triton.jit
def _merge(m, l, acc, m_i, l_i, a_i, take):
    """(m, l, acc) with one more split's partial merged in, where ``take``; else unchanged."""
    m_new = tl.maximum(m, m_i)
    wa = tl.exp2(m - m_new)
    wb = tl.exp2(m_i - m_new)
    acc_new = acc * wa[:, None] + a_i * wb[:, None]
    l_new = l * wa + l_i * wb
    return tl.where(take, m_new, m), tl.where(take, l_new, l), tl.where(take, acc_new, acc)


@triton.jit
def _merged_partials(ws_ptr, ml_ptr, row, head, mask, d, n_parts, T, HQ, HEAD_DIM: tl.constexpr, CG: tl.constexpr):
    """Attention output [len(head), HEAD_DIM] (float32, normalized) of token ``row`` from its first
    n_parts KV-split partials (split i's running max, sum and unnormalized acc at index
    (i * T + row) * HQ + head), merged split 0 first, one split at a time. Four splits' loads are
    issued together before their merges, so a merge of n splits waits on about n / 4 memory
    round trips, not n (the arithmetic and its order are those of a one-at-a-time loop). CG: read
    them past L1 (partials stored by other programs of the same launch)."""
    m, l, acc = _partial(ws_ptr, ml_ptr, 0, n_parts, row, head, mask, d, T, HQ, HEAD_DIM, CG, 1.0)
    for i in range(1, n_parts, 4):
        m1, l1, a1 = _partial(ws_ptr, ml_ptr, i, n_parts, row, head, mask, d, T, HQ, HEAD_DIM, CG, 0.0)
        m2, l2, a2 = _partial(ws_ptr, ml_ptr, i + 1, n_parts, row, head, mask, d, T, HQ, HEAD_DIM, CG, 0.0)
        m3, l3, a3 = _partial(ws_ptr, ml_ptr, i + 2, n_parts, row, head, mask, d, T, HQ, HEAD_DIM, CG, 0.0)
        m4, l4, a4 = _partial(ws_ptr, ml_ptr, i + 3, n_parts, row, head, mask, d, T, HQ, HEAD_DIM, CG, 0.0)
        m, l, acc = _merge(m, l, acc, m1, l1, a1, True)
        m, l, acc = _merge(m, l, acc, m2, l2, a2, i + 1 < n_parts)
        m, l, acc = _merge(m, l, acc, m3, l3, a3, i + 2 < n_parts)
        m, l, acc = _merge(m, l, acc, m4, l4, a4, i + 3 < n_parts)
    return acc / l[:, None]


@triton.jit
def _combine_kernel(ws_ptr, ml_ptr, o_ptr, cu_q_ptr, ctx_ptr, n_seqs, n_iter, T, HQ, stride_ot, stride_oh,
                    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, SPLIT: tl.constexpr, DECODE: tl.constexpr):
    """Merge one token's split partials, split 0 first, one split at a time."""
    t = tl.program_id(0)
    if DECODE:
        pos = tl.load(ctx_ptr + t) - 1
    else:
        s = _find_seq(cu_q_ptr, n_seqs, t, n_iter)
        q_start = tl.load(cu_q_ptr + s)
        q_len = tl.load(cu_q_ptr + s + 1) - q_start
        pos = tl.load(ctx_ptr + s) - q_len + (t - q_start)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HEAD_DIM)
    hmask = h < HQ
    row = t.to(tl.int64)
    o_ptrs = o_ptr + row * stride_ot + h[:, None] * stride_oh + d[None, :]
    if pos < 0:  # padding row with no context
        tl.store(o_ptrs, tl.zeros((BLOCK_H, HEAD_DIM), tl.float32).to(o_ptr.dtype.element_ty), mask=hmask[:, None])
        return
    out = _merged_partials(ws_ptr, ml_ptr, row, h, hmask, d, pos // SPLIT + 1, T, HQ, HEAD_DIM, False)
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=hmask[:, None])


# Fast-mode prefill reads each sequence's whole context in one program: its SPLIT is this one
# constant rather than the batch's longest context, so a new context length never compiles a new
# kernel (SPLIT is a compile-time constant; the server's mixed steps kept hitting new values).
UNSPLIT = 1 << 30


def _fast_decode_split(n_seqs: int, n_kv: int, max_ctx: int, block_n: int) -> int:
    """Split size (tokens) giving at least ~2 programs per SM of an H100 at long contexts; a power
    of two (>= block_n, itself one), so only a handful of values ever need compiling."""
    want = max(1, -(-264 // max(1, n_seqs * n_kv)))
    return max(block_n, triton.next_power_of_2(-(-max_ctx // want)))


_COUNTERS: dict = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Per-device int32 arrival counters of the fused decode combine, zero between launches
    (each launch's last programs reset theirs). Allocated once, large enough for 512 sequences
    x 32 KV heads, so CUDA-graph capture never allocates them."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[device] = torch.zeros(max(n, 1 << 14), dtype=torch.int32, device=device)
    return buf


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    context_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                    kv_split: int | None = None, tiles: tuple | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """As ``attention.paged_attention_ref``.

    kv_split: fixed split size in tokens (the invariant modes pass numerics.kv_split; then the
    tiles are ``INVARIANT_TILES`` and split partials always go through the combine kernel).
    None: fast mode. ``tiles`` overrides (BLOCK_M, BLOCK_N, num_warps), for tests; ``out``: an
    optional output shaped like q (tests poison it).
    """
    T, HQ, D = q.shape
    _, page, HKV, _ = k_cache.shape
    n_seqs = context_lens.shape[0]
    assert D & (D - 1) == 0 and q.stride(2) == 1 and k_cache.stride() == v_cache.stride()
    group = HQ // HKV
    group_p = triton.next_power_of_2(group)
    decode = T == n_seqs  # every sequence has exactly one query row (chunks are never empty)
    max_ctx = block_tables.shape[1] * page  # bound on any context length, from shapes only
    if kv_split is not None:
        bm, bn, warps = tiles or INVARIANT_TILES
        bn = min(bn, kv_split)
        split, split_out = kv_split, True
        assert split % bn == 0 and bn & (bn - 1) == 0, "the KV split must be a multiple of a power-of-two BLOCK_N"
    elif decode:
        bm, bn, warps = tiles or (max(16, group_p), 64, 4)
        split = _fast_decode_split(n_seqs, HKV, max_ctx, bn)
        split_out = split < max_ctx
    else:
        bm, bn, warps = tiles or (128, 64, 8)
        split, split_out = UNSPLIT, False
    bm = max(bm, group_p)
    block_q = bm // group_p
    n_splits = triton.cdiv(max_ctx, split) if split_out else 1
    out = torch.empty_like(q) if out is None else out
    if T == 0:
        return out
    if decode:  # tiles are sequences: no per-sequence tile counts to compute
        tile_cu, n_tiles = cu_seqlens_q, n_seqs
    else:
        q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
        tile_cu = torch.zeros(n_seqs + 1, dtype=torch.int32, device=q.device)
        tile_cu[1:] = torch.cumsum((q_lens + block_q - 1) // block_q, 0, dtype=torch.int32)
        n_tiles = min(T, triton.cdiv(T, block_q) + n_seqs)
    n_iter = max(1, (n_seqs - 1).bit_length())
    if split_out:
        ws = torch.empty(n_splits, T, HQ, D, dtype=torch.float32, device=q.device)
        ml = torch.empty(n_splits, T, HQ, 2, dtype=torch.float32, device=q.device)
    else:
        ws = ml = out
    fused = split_out and decode and kv_split is None
    counters = _counters(q.device, n_seqs * HKV) if fused else out
    qk_scale = scale * 1.4426950408889634  # log2(e): scores in log2 units for exp2
    use_pdl = pdl.enabled(q.device)
    _attn_kernel[(n_tiles, HKV, n_splits)](
        q, k_cache, v_cache, out, ws, ml, counters, cu_seqlens_q, context_lens, block_tables, tile_cu,
        n_seqs, n_iter, qk_scale, T, HQ,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_P=group_p, BLOCK_Q=block_q, BLOCK_N=bn, HEAD_DIM=D, PAGE=page, SPLIT=split,
        SPLIT_OUT=split_out, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", DECODE=decode,
        INVARIANT=kv_split is not None, FUSED_COMBINE=fused, PDL=use_pdl, num_warps=warps, **pdl.launch_kwargs(use_pdl))
    if split_out and not fused:
        _combine_kernel[(T,)](ws, ml, out, cu_seqlens_q, context_lens, n_seqs, max(1, n_seqs.bit_length()), T, HQ,
                              out.stride(0), out.stride(1), HEAD_DIM=D, BLOCK_H=triton.next_power_of_2(HQ),
                              SPLIT=split, DECODE=decode, num_warps=4)
    return out
