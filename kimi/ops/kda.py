"""Kimi Delta Attention (KDA) numerics: the chunked form (prefill, training), the recurrent form (decode)
and `kda`, the one dispatch point the layer calls.

Per head, with an fp32 state S of layout [K, V] (rows are key channels), paper Eq. 1:

    S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T (scale * q_t)

g is the per-channel log-decay (<= 0, unbounded below in Kimi-Linear-48B). The math and its numerical traps
are in the project reference kda.md (§1.4 recurrence, §2 chunked algorithm; paper arXiv 2510.26692 Eqs. 1-9).
The float64 oracle twin is kimi/ops/kda_naive.py.

Chunked form, chunk C = 64, G = in-chunk cumulative sum of g (<= 0, non-increasing), batched over many chunks:
  1. Akk[i, j] = beta_i sum_d k_i k_j exp(G_i - G_j) (j < i) and Aqk[i, j] = sum_d q_i k_j exp(G_i - G_j)
     (j <= i) as matmuls of decay-scaled operands whose exponents are bounded by TAME / 2 or are <= 0 (_scores).
  2. UT transform: Tb = (I + Akk)^-1 Diag(beta) by one unit-triangular solve; W = Tb (exp(G) k), U = Tb v.
  3. Scan over chunks with state S: V' = U - W S, O = exp(G) q S + Aqk V', S <- exp(G_C) S + Kd^T V', where
     Kd = exp(G_C - G) k. Every exponent here is <= 0; exp(-G) is never formed (kda.md §2).
The work runs over slices of about BLOCK elements so temporaries stay small: on CPU, fresh large buffers cost more
in page faults than the arithmetic done in them.

Packed variable-length input (cu_seqlens) uses a time-major "lane" layout: sequences sorted by length, chunk t of
every still-running sequence stored contiguously, so step t of the scan is one slice and finished sequences
drop off the end. The recurrent form is the same scan with C = 1.
"""

import functools
import importlib.util
import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger("kimi")

TAME = 60.0       # nats: a block whose gates decay less than this in every channel needs no splitting (_scores)
BLOCK = 1 << 18   # elements per [rows, H, C, K] slice worked on at once, so temporaries stay small and warm


def _check(q, k, v, g, beta, initial_state, cu_seqlens) -> int:
    """Validates shapes and returns N, the number of sequences."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    for name, x, want in (("k", k, (B, T, H, K)), ("g", g, (B, T, H, K)), ("beta", beta, (B, T, H))):
        if tuple(x.shape) != want:
            raise ValueError(f"{name} must have shape {want} (like q's [B, T, H, K]), got {tuple(x.shape)}")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] with B, T, H = {B, T, H}, got {tuple(v.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; all inputs must share a device")
    if cu_seqlens is None:
        if T < 1:
            raise ValueError("sequence length T must be >= 1")
        n = B
    else:
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1 (sequences packed along T), got {B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError(f"cu_seqlens must be an integer tensor [N + 1], got {cu_seqlens.dtype} "
                             f"{tuple(cu_seqlens.shape)}")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != T or any(a > b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to T = {T} without decreasing, got {bounds}")
        n = len(bounds) - 1
    if initial_state is not None and tuple(initial_state.shape) != (n, H, K, v.shape[-1]):
        raise ValueError(f"initial_state must be [N, H, K, V] = {(n, H, K, v.shape[-1])} "
                         f"(N = one row per sequence), got {tuple(initial_state.shape)}")
    return n


def _prepare(x, dt, scale=None, l2norm=False):
    """Casts to the compute dtype; optionally L2-normalises the last dim (eps inside the sqrt) and scales."""
    x = x.to(dt)
    if not l2norm:
        return x if scale is None else x * scale
    inv = torch.rsqrt(torch.linalg.vecdot(x, x)[..., None] + 1e-6)     # FLA and the HF reference, not F.normalize
    return x * (inv if scale is None else inv * scale)


class _Lanes:
    """Time-major layout of B dense rows, or of the packed sequences of cu_seqlens, in chunks of C tokens.

    Row r of the layout is one chunk [H, C, D]. Step t of the scan is the slice steps[t] = (start, count): chunk t
    of every sequence still running, sequences sorted longest first (`order`), so finished ones drop off the end.
    Padding positions read as zeros, which with g = 0, beta = 0, k = v = 0 leave the state unchanged.
    """

    def __init__(self, B, T, C, cu_seqlens, device):
        self.B, self.T, self.C = B, T, C
        if cu_seqlens is None:
            self.order = None
            self.steps = [(t * B, B) for t in range(-(-T // C))]
            return
        cu = cu_seqlens.to("cpu", torch.long)
        lens, starts = cu.diff(), cu[:-1]
        chunks = (lens + C - 1) // C
        self.order = torch.argsort(chunks, descending=True, stable=True)
        t = torch.arange(int(chunks.max()))
        live = chunks[self.order][None, :] > t[:, None]                   # [steps, N]: row t = running lanes
        count = live.sum(1)
        first = (starts[self.order][None, :] + t[:, None] * C)[live]      # [Nc] first token of each chunk
        left = (lens[self.order][None, :] - t[:, None] * C)[live]         # [Nc] tokens left from there
        j = torch.arange(C)
        idx = torch.where(j < left[:, None], first[:, None] + j, T).reshape(-1)   # [Nc * C]; T = padding
        pos = torch.empty(T, dtype=torch.long)
        real = idx < T
        pos[idx[real]] = torch.arange(idx.numel())[real]
        self.idx, self.pad, self.pos = idx.clamp(max=max(T - 1, 0)).to(device), (~real).to(device), pos.to(device)
        self.steps = list(zip((count.cumsum(0) - count).tolist(), count.tolist()))

    def groups(self, rows: int):
        """Consecutive whole steps covering about `rows` layout rows each: [(lo, hi, steps)]."""
        out, cur = [], []
        for st in self.steps:
            cur.append(st)
            if st[0] + st[1] - cur[0][0] >= rows:
                out.append((cur[0][0], st[0] + st[1], cur))
                cur = []
        if cur:
            out.append((cur[0][0], cur[-1][0] + cur[-1][1], cur))
        return out

    def take(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Layout rows lo..hi of x [B, T, H, D] (or [B, T, H]) as [hi - lo, H, C, D] (or [hi - lo, H, C])."""
        C = self.C
        if x.dim() == 3:
            return self.take(x[..., None], lo, hi)[..., 0]
        B, T, H, D = x.shape
        if self.order is None:
            t0, t1 = lo // B, hi // B
            x = x[:, t0 * C:t1 * C]
            if x.shape[1] < (t1 - t0) * C:
                x = F.pad(x, (0, 0, 0, 0, 0, (t1 - t0) * C - x.shape[1]))
            return x.view(B, t1 - t0, C, H, D).permute(1, 0, 3, 2, 4).reshape((t1 - t0) * B, H, C, D)
        rows = x[0].index_select(0, self.idx[lo * C:hi * C])
        rows = rows.masked_fill(self.pad[lo * C:hi * C, None, None], 0.0)
        return rows.view(hi - lo, C, H, D).transpose(1, 2)

    def put(self, outs: list, H: int, D: int, like: torch.Tensor) -> torch.Tensor:
        """Inverse of take for the concatenated rows of outs ([rows, H, C, D] each) -> [B, T, H, D] (like's dtype)."""
        B, T, C = self.B, self.T, self.C
        if self.order is None:
            o = torch.cat([x.view(-1, B, H, C, D).permute(1, 0, 3, 2, 4).reshape(B, -1, H, D) for x in outs], 1)
            return o[:, :T]
        if not outs:
            return like.new_zeros(1, 0, H, D)
        return torch.cat(outs).transpose(1, 2).reshape(-1, H, D)[self.pos][None]

    def scan(self, S: torch.Tensor, groups, work) -> torch.Tensor:
        """Runs S = work(S, lo, hi, steps) over the groups; `work` advances S over its steps, calling
        `self.retire(S, count)` before each. S is [N, ...]; returns the final states in sequence order."""
        self.done = []
        if self.order is not None:
            S = S[self.order]
        for lo, hi, steps in groups:
            S = work(S, lo, hi, steps)
        self.done.append(S)
        S = torch.cat(self.done[::-1])
        return S if self.order is None else S[torch.argsort(self.order)]

    def retire(self, S: torch.Tensor, count: int) -> torch.Tensor:
        """Keeps the first `count` lanes running; the rest have finished and their states are final."""
        if count < S.shape[0]:
            self.done.append(S[count:])
            S = S[:count]
        return S


def _scores(L: torch.Tensor, k: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Decayed scores P[b, i, :, j] = sum_d L[b, i, :, d] k[b, j, d] exp(G[b, i, d] - G[b, j, d]) for j <= i, else 0.

    L: [Nb, n, 2, K] (the two query-side operands, q and beta*k); k, G: [Nb, n, K] with G non-increasing in n.
    Returns [Nb, n, 2, n]. Never exponentiates an unbounded difference: a block whose decay span is at most TAME
    is one matmul with factors exp(+-(G - M)) <= e^(TAME/2) around the mid value M (kda.md §2 (c) without the
    lower-bound assumption); any other block is halved, its off-diagonal quarter anchored at the first query
    gate (both factors <= 1, kda.md §2 (b)) and its diagonal halves handled recursively. Single tokens are tame.
    """
    Nb, n = k.shape[:2]
    tame = (G[:, 0] - G[:, -1]).amax(-1) <= TAME                         # [Nb]
    if n == 1 or bool(tame.all()):
        return _tame_scores(L, k, G)
    if not bool(tame.any()):
        return _split_scores(L, k, G)
    it, iu = tame.nonzero()[:, 0], (~tame).nonzero()[:, 0]
    P = torch.cat([_tame_scores(L[it], k[it], G[it]), _split_scores(L[iu], k[iu], G[iu])])
    return P[torch.argsort(torch.cat([it, iu]))]


def _tame_scores(L, k, G):
    Nb, n, _, K = L.shape
    a = torch.exp(G - (G[:, :1] + G[:, -1:]) / 2)                         # [Nb, n, K] within e^(+-TAME/2)
    P = ((L * a[:, :, None]).flatten(1, 2) @ (k / a).transpose(1, 2)).view(Nb, n, 2, n)
    upper = torch.ones(n, n, dtype=torch.bool, device=k.device).triu(1)[:, None, :]
    return P.masked_fill(upper, 0.0)


def _split_scores(L, k, G):
    Nb, n, _, K = L.shape
    h = n // 2
    if n % 2 == 0:
        halves = _scores(torch.cat([L[:, :h], L[:, h:]]), torch.cat([k[:, :h], k[:, h:]]),
                         torch.cat([G[:, :h], G[:, h:]]))
        P11, P22 = halves[:Nb], halves[Nb:]
    else:
        P11, P22 = _scores(L[:, :h], k[:, :h], G[:, :h]), _scores(L[:, h:], k[:, h:], G[:, h:])
    anchor = G[:, h:h + 1]                                                # first gate of the query half
    La = L[:, h:] * torch.exp(G[:, h:] - anchor)[:, :, None]              # factors <= 1
    kb = k[:, :h] * torch.exp(anchor - G[:, :h])
    P21 = (La.flatten(1, 2) @ kb.transpose(1, 2)).view(Nb, n - h, 2, h)
    top = torch.cat([P11, P11.new_zeros(Nb, h, 2, n - h)], -1)
    return torch.cat([top, torch.cat([P21, P22], -1)], 1)


def _chunk_terms(q, k, v, g, beta):
    """Per-chunk pieces of the chunked form for rows [R, H, C, *] (whole chunks), kda.md §2 steps 1-3.

    Returns WQ [R, H, 2C, K] (W over exp(G) q), U [R, H, C, V], Aqk [R, H, C, C], Kd [R, H, K, C] (keys decayed
    to the chunk end, transposed) and the chunk's total decay [R, H, K, 1].
    """
    R, H, C, K = q.shape
    G = g.cumsum(-2)                                                      # in-chunk cumulative log-decay, <= 0
    L = torch.stack([q, beta[..., None] * k], -2)                         # [R, H, C, 2, K]
    P = _scores(L.flatten(0, 1), k.flatten(0, 1), G.flatten(0, 1)).view(R, H, C, 2, C)
    Aqk, Akk = P[..., 0, :], P[..., 1, :].tril(-1)                        # [R, H, C, C]
    # UT transform (I + Akk)^-1 Diag(beta): W = Tb (exp(G) k), U = Tb v
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    Tb = torch.linalg.solve_triangular(Akk, eye, upper=False, unitriangular=True) * beta[..., None, :]
    eG = G.exp()                                                          # <= 1
    G_end = G[..., -1:, :]                                                # [R, H, 1, K]
    Kd = (k * torch.exp(G_end - G)).transpose(-1, -2)                     # exp(G_C - G_r) <= 1
    WQ = torch.cat([Tb @ (k * eG), q * eG], -2)
    return WQ, Tb @ v, Aqk, Kd, G_end.exp().transpose(-1, -2)


def chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
              use_qk_l2norm_in_kernel=False, cu_seqlens=None, chunk_size=64):
    """Chunked KDA for prefill and training; plain torch autograd flows through it.

    q, k, g: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]; g is the log-decay (<= 0). initial_state: [N, H, K, V]
    (N = B, or one row per packed sequence of cu_seqlens [N + 1] with B = 1). Returns o [B, T, H, V] in q's dtype
    and, if asked, the final state [N, H, K, V] (fp32; fp64 for fp64 input).
    """
    n_seq = _check(q, k, v, g, beta, initial_state, cu_seqlens)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = K ** -0.5 if scale is None else scale
    lanes = _Lanes(B, T, chunk_size, cu_seqlens, q.device)
    outs = []

    def work(S, lo, hi, steps):
        # one slice of whole steps: its per-chunk terms, then the scan over its chunks, then its outputs
        take = functools.partial(lanes.take, lo=lo, hi=hi)
        WQ, U, Aqk, Kd, decay = _chunk_terms(_prepare(take(q), dt, scale, use_qk_l2norm_in_kernel),
                                             _prepare(take(k), dt, None, use_qk_l2norm_in_kernel),
                                             take(v).to(dt), take(g).to(dt), take(beta).to(dt))
        C = U.shape[-2]
        o = []
        # one split per term, not a slice per step: under autograd every slice's backward fills a zero tensor
        # the size of the whole term, a split's backward is one concatenation
        counts = [count for _, count in steps]
        for count, wq, u, aqk, kd, dec in zip(counts, *(x.split(counts) for x in (WQ, U, Aqk, Kd, decay))):
            S = lanes.retire(S, count)
            W_S, qS = (wq @ S).split(C, -2)                               # [n, H, C, V] each: W S and exp(G) q S
            Vn = (u - W_S).flatten(0, 1)                                  # delta-corrected values V'
            o.append(torch.baddbmm(qS.flatten(0, 1), aqk.flatten(0, 1), Vn))  # inter + intra
            S = torch.baddbmm((S * dec).flatten(0, 1), kd.flatten(0, 1), Vn).view_as(S)
        outs.append(torch.cat(o).view(-1, H, C, V).to(q.dtype))
        return S

    S0 = torch.zeros(n_seq, H, K, V, dtype=dt, device=q.device) if initial_state is None else initial_state.to(dt)
    final = lanes.scan(S0, lanes.groups(max(1, BLOCK // (H * chunk_size * max(K, V)))), work)
    return lanes.put(outs, H, V, q), (final if output_final_state else None)


def recurrent_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                  use_qk_l2norm_in_kernel=False, cu_seqlens=None):
    """Token-by-token KDA for decode; same arguments and results as `chunk_kda` (without chunk_size)."""
    n_seq = _check(q, k, v, g, beta, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = K ** -0.5 if scale is None else scale
    lanes = _Lanes(B, T, 1, cu_seqlens, q.device)
    outs = []

    def work(S, lo, hi, steps):
        take = functools.partial(lanes.take, lo=lo, hi=hi)
        qs = _prepare(take(q), dt, scale, use_qk_l2norm_in_kernel)        # [n, H, 1, K]
        ks = _prepare(take(k), dt, None, use_qk_l2norm_in_kernel)
        vs, bs = take(v).to(dt), take(beta)[..., None].to(dt)            # [n, H, 1, V], [n, H, 1, 1]
        decay = take(g).to(dt).exp().transpose(-1, -2)                   # [n, H, K, 1]
        o = []
        for start, count in steps:
            S = lanes.retire(S, count)
            t = slice(start - lo, start - lo + count)
            S = S * decay[t]
            delta = bs[t] * (vs[t] - ks[t] @ S)                            # [count, H, 1, V]
            S = torch.baddbmm(S.flatten(0, 1), ks[t].transpose(-1, -2).flatten(0, 1), delta.flatten(0, 1))
            S = S.view(count, H, K, V)
            o.append(qs[t] @ S)
        outs.append(torch.cat(o).to(q.dtype))
        return S

    S0 = torch.zeros(n_seq, H, K, V, dtype=dt, device=q.device) if initial_state is None else initial_state.to(dt)
    final = lanes.scan(S0, lanes.groups(max(1, BLOCK // (H * max(K, V)))), work)
    return lanes.put(outs, H, V, q), (final if output_final_state else None)


@functools.cache
def backend() -> str:
    """'fla' (fla-core Triton kernels for every CUDA tensor), 'fla-half' (for bf16/fp16 CUDA tensors; fp32 stays
    on our torch ops) or 'torch'; resolved once, logged.

    Automatic choice: 'fla-half' where CUDA and fla-core are importable, else 'torch'. fla's chunked kernels take
    fp32 inputs through TF32 tensor-core products, ~1e-3 rms-relative error against the float64 oracle (measured
    on an H200; our torch path: ~3e-7), enough to flip fp32 greedy tokens between differently batched runs; so fp32,
    chosen for exactness, keeps the exact path. KIMI_KDA_BACKEND=torch|fla overrides ('fla': every dtype).
    """
    want = os.environ.get("KIMI_KDA_BACKEND", "auto").strip().lower() or "auto"
    if want not in ("auto", "torch", "fla"):
        raise ValueError(f"KIMI_KDA_BACKEND must be 'torch' or 'fla' (or unset), got {want!r}")
    have_fla = torch.cuda.is_available() and importlib.util.find_spec("fla") is not None
    if want == "fla" and not have_fla:
        raise ValueError("KIMI_KDA_BACKEND=fla needs a CUDA device and fla-core installed (pip install kimi[gpu])")
    choice = want if want != "auto" else "fla-half" if have_fla else "torch"
    log.info("KDA backend: %s (KIMI_KDA_BACKEND=%s)", choice, want)
    return choice


def uses_fla(q: torch.Tensor) -> bool:
    b = backend()
    return q.is_cuda and (b == "fla" or (b == "fla-half" and q.dtype in (torch.bfloat16, torch.float16)))


def kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
        use_qk_l2norm_in_kernel=False, cu_seqlens=None, chunk_size=64):
    """The KDA entry point: recurrent form for decode (one token per sequence), chunked form otherwise;
    fla-core kernels for CUDA tensors where the backend says so (uses_fla), our torch ops everywhere else."""
    n_tokens = q.shape[0] * q.shape[1]
    n_seq = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    decode = n_tokens <= n_seq
    kw = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
              use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, cu_seqlens=cu_seqlens)
    if uses_fla(q):
        from fla.ops.kda import chunk_kda as fla_chunk, fused_recurrent_kda as fla_recurrent
        if decode:
            return fla_recurrent(q, k, v, g, beta, **kw)
        return fla_chunk(q, k, v, g, beta, **kw, **({} if chunk_size == 64 else {"chunk_size": chunk_size}))
    if decode:
        return recurrent_kda(q, k, v, g, beta, **kw)
    return chunk_kda(q, k, v, g, beta, chunk_size=chunk_size, **kw)
