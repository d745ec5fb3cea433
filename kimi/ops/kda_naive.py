"""The oracle for KDA: paper Eq. 1 applied token by token with explicit matrices, in float64.

    S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T (scale * q_t)

State layout [K, V] (rows are key channels). The math is in the project reference kda.md §1.4
(paper arXiv 2510.26692, Eq. 1). Same signature as `kimi.ops.kda.recurrent_kda`. Deliberately slow
(O(K^2 V) per token and head); used only by the tests, never exported or dispatched to.
"""

import torch


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def naive_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
              use_qk_l2norm_in_kernel=False, cu_seqlens=None):
    """q, k, g: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]; initial_state: [N, H, K, V].

    Returns o [B, T, H, V] in q's dtype and the final state [N, H, K, V] (float32, float64 for float64 q; or None).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    out_dtype, f64 = q.dtype, torch.float64
    q, k, v, g, beta = (x.to(f64) for x in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = _l2norm(q), _l2norm(k)
    q = q * scale
    # Every sequence is a (batch row, start, end) span; cu_seqlens packs them, in order, into row 0.
    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        bounds = cu_seqlens.tolist()
        spans = [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    eye = torch.eye(K, dtype=f64, device=q.device)
    rows, finals = [[] for _ in range(B)], []
    for n, (b, start, end) in enumerate(spans):
        S = q.new_zeros(H, K, V) if initial_state is None else initial_state[n].to(f64)
        for t in range(start, end):
            kt, bt = k[b, t], beta[b, t, :, None, None]                     # [H, K], [H, 1, 1]
            transition = (eye - bt * kt[:, :, None] * kt[:, None, :]) @ torch.diag_embed(g[b, t].exp())
            S = transition @ S + bt * kt[:, :, None] * v[b, t][:, None, :]   # [H, K, V]
            rows[b].append((S.transpose(-1, -2) @ q[b, t][:, :, None])[..., 0])  # [H, V]
        finals.append(S)
    o = torch.stack([torch.stack(r) for r in rows]).to(out_dtype)
    state_dtype = f64 if out_dtype == f64 else torch.float32
    return o, (torch.stack(finals).to(state_dtype) if output_final_state else None)
