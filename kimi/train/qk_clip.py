"""QK-Clip: after each optimizer step, shrink the query/key weights of every attention head whose
largest pre-softmax logit in that step's forward passes exceeded τ (Kimi K2's MuonClip).

Math (shared/reference/muon.md §2.3-2.5): head h with recorded maximum S_h > τ gets γ_h = τ / S_h.
In MLA its logit is scale·(q_nope·k_nope + q_rope·k_rope), with k_rope shared by all heads, so
  q_nope rows of head h (q_proj or q_b_proj)   ×√γ_h
  k_nope rows of head h (kv_b_proj)            ×√γ_h
  q_rope rows of head h                        ×γ_h
  shared rope key (kv_a_proj_with_mqa), v rows, down-projections, norms, o_proj: untouched,
which multiplies every logit of head h by exactly γ_h and leaves every other head bit-identical.
The statistic is the signed maximum over batch, queries and allowed keys, softmax scale included,
recorded by the MLA module itself during training forwards (`record_max_logits`, `max_logits`),
taken over micro-batches (a running max) and all-reduced (MAX) over the data-parallel group.
The clip is applied in place to the parameters the optimizer updates, i.e. the fp32 master
weights when the model is trained in fp32 under bf16 autocast; the next forward sees it. Under
FSDP2 a clipped projection is gathered, scaled and re-sliced, since a head's rows may straddle
shards; every rank holds the same reduced maxima, so all take part in the same gathers.

KDA layers (Kimi Linear) are not touched: they have no softmax logits to blow up. Their q and k are
L2-normalised per head, so every q·k lies in [-1, 1] (shared/reference/kda.md).
"""

import math

import torch
import torch.distributed as dist
from torch import nn

from kimi.train.optim import checkpoint_name, gather_full


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) for every softmax-attention layer that records per-head max logits (MLA);
    names without DDP/compile wrapper prefixes, e.g. "model.layers.3.self_attn"."""
    return [(checkpoint_name(n), m) for n, m in model.named_modules()
            if hasattr(m, "max_logits") and hasattr(m, "kv_b_proj")]


@torch.no_grad()
def clip_mla_(attn: nn.Module, gamma: torch.Tensor) -> None:
    """Scale head h's logits by gamma[h] (gamma [H], 1 = leave alone) by rescaling q/k rows in place.

    Row layouts (HF): q rows of head h are [q_nope (nope) | q_rope (rope)], kv_b_proj rows of head h
    are [k_nope (nope) | v (v_head_dim)].
    """
    H, nope, rope, v = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim
    if gamma.shape != (H,):
        raise ValueError(f"gamma must have one factor per head, shape ({H},), got {tuple(gamma.shape)}")
    q = attn.q_proj if getattr(attn, "q_proj", None) is not None else attn.q_b_proj
    root = gamma.to(torch.float64).sqrt()
    # (projection, rows per head, [(first row, last row, factor)] within a head's rows)
    plan = ((q, nope + rope, ((0, nope, root), (nope, nope + rope, gamma.to(torch.float64)))),
            (attn.kv_b_proj, nope + v, ((0, nope, root),)))
    for proj, width, parts in plan:
        for tensor in (proj.weight, proj.bias):
            if tensor is None:
                continue
            # FSDP2 shards rows across ranks: scale the gathered full tensor, then keep the local shard.
            full, put_back = gather_full(tensor)
            rows = full.view(H, width, -1)  # [H, rows per head, in (1 for a bias)]
            for lo, hi, factor in parts:
                rows[:, lo:hi] *= factor.to(full.dtype)[:, None, None]
            if full is not tensor:
                tensor.copy_(put_back(full))


class QKClip:
    """Collects, all-reduces, clips and resets the per-head max logits of a model's MLA layers.

    Call it once after each optimizer step (MuonAdamW does, with `qk_clip=`). It returns the
    per-layer maxima {layer name: fp32 [H]} of the forwards since the previous call, for logging.
    tau=None only collects and resets (plain Muon or AdamW runs still log their max logits).
    Constructing it switches recording on; MLA records in training mode only, so evaluation
    forwards (model.eval()) do not count.
    """

    def __init__(self, model: nn.Module, tau: float | None = 100.0, group=None):
        if tau is not None and not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"QK-Clip threshold tau must be a positive finite number or None, got {tau}")
        self.tau, self.group = tau, group
        self.layers = attention_layers(model)
        for _, layer in self.layers:
            layer.record_max_logits = True

    def collect(self) -> dict[str, torch.Tensor]:
        """Per-layer maxima [H], MAX-reduced over the data-parallel group, then reset in the layers.

        Layers without a recorded forward are left out. Every rank takes part in one all-reduce of
        the same shape, with -inf standing in for a layer a rank did not record.
        """
        if not self.layers:
            return {}
        device = next(self.layers[0][1].parameters()).device
        parts = []
        for _, layer in self.layers:
            m = layer.max_logits
            parts.append(torch.full((layer.num_heads,), -math.inf, device=device) if m is None
                         else m.detach().float().to(device))
            layer.max_logits = None
        flat = torch.cat(parts)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=self.group)
        out = {}
        for (name, _), m in zip(self.layers, flat.split([len(p) for p in parts])):
            if not torch.isneginf(m).all():
                out[name] = m
        return out

    def __call__(self) -> dict[str, torch.Tensor]:
        maxima = self.collect()
        if self.tau is None:
            return maxima
        layers = dict(self.layers)
        for name, m in maxima.items():
            # Non-finite maxima are reported, not clipped: γ = 0 or NaN would destroy the head.
            over = torch.isfinite(m) & (m > self.tau)
            if over.any():
                gamma = torch.where(over, self.tau / m.double(), torch.ones_like(m, dtype=torch.float64))
                clip_mla_(layers[name], gamma)
        return maxima
