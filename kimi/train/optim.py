"""MuonClip: Muon for hidden weight matrices, AdamW for everything else, QK-Clip after each step.

One optimizer class, `MuonAdamW`, holds parameter groups tagged by `kind` ("muon" or "adamw");
`build_optimizer(model, ...)` routes every trainable parameter by name and shape into exactly one
group (asserted) and attaches a `QKClip` (kimi/train/qk_clip.py), which makes the pair MuonClip
(Kimi K2 Algorithm 1: optimizer update first, then the per-head clip).

The math, its sources and the pitfalls it avoids are in shared/reference/muon.md:
  §1.1 Nesterov momentum in the EMA form (same direction as the sum form, NS is scale-free),
  §1.2 Newton–Schulz quintic, 5 steps, bf16, coefficients (3.4445, -4.7750, 2.0315) (in fp32 where bf16 would be
       emulated: on a CPU without native bf16 the bf16 iteration was ~40% of a built-in-model training step),
  §1.4 the update scale: Moonlight's 0.2·√max(A, B) (default: update RMS = 0.2·lr, so AdamW's lr and
       weight decay carry over) or Keller Jordan's √max(1, A/B),
  §1.3 / §5 routing: embeddings, lm_head, norms, biases, gate scalars and conv kernels go to AdamW.
The Muon half is bit-identical to `torch.optim.Muon` on a 2-D parameter with Newton–Schulz in bf16
(tests/test_optim.py).

Data parallelism: under DDP every rank holds the full, already all-reduced gradient and runs the
same deterministic Newton–Schulz, so each update orthogonalises the full matrix. Parameters sharded
as DTensors (FSDP2) are gathered to the full matrix before Newton–Schulz (muon.md §4, core
constraint) and the result is sliced back to the local shard.
"""

import math

import torch
from torch import nn

from kimi.ops.dtypes import default_dtype

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
SCALES = ("moonlight", "keller")
OPTIMIZERS = ("muonclip", "muon", "adamw")
NS_BATCH_NUMEL = 1 << 25  # elements per stacked Newton–Schulz batch (128 MB fp32): bounds the extra memory
# Settings per group kind and their defaults (K2/Moonlight: betas (0.9, 0.95), wd 0.1, momentum 0.95).
_DEFAULTS = {
    "muon": dict(lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5, ns_eps=1e-7,
                 scale="moonlight"),
    "adamw": dict(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8),
}

# Last name component → AdamW, whatever the shape: the KDA gate scalars A_log [1, 1, H, 1] and
# dt_bias [P], and biases.
_ADAMW_LEAVES = {"A_log", "dt_bias", "bias"}


def newton_schulz(update: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximate the polar factor U·Vᵀ of every matrix in `update` [..., A, B], computed and returned in
    `dtype` (bf16 as in muon.md; fp32 where bf16 matmuls are emulated).

    Each matrix over the leading (expert) dims is normalised by its own Frobenius norm and
    orthogonalised on its own: a batch of matrices, never one slab. The quintic's coefficients
    maximise the slope at 0 and do not converge, so singular values land in ~[0.68, 1.13]
    (muon.md §1.2). Casting before normalising is safe in bf16 (fp32's exponent range) and keeps
    the 2-D case bit-identical to torch.optim.Muon.
    """
    if update.ndim < 2:
        raise ValueError(f"newton_schulz expects [..., A, B] matrices, got shape {tuple(update.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # work on [.., min, max] so the Gram matrix is min(A, B)² in size
    x = x.reshape(-1, *x.shape[-2:])  # (batch, n, m), n <= m
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius <= 1
    for _ in range(steps):
        gram = x @ x.mT  # (batch, n, n)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b·G + c·G²
        x = torch.baddbmm(x, poly, x, beta=a)  # a·X + (b·G + c·G²)·X
    if tall:
        x = x.mT
    return x.reshape(update.shape)


def muon_scale(shape: torch.Size, scale: str) -> float:
    """Multiplier on lr for one [A, B] = [fan_out, fan_in] matrix (muon.md §1.4)."""
    rows, cols = shape[-2], shape[-1]
    if scale == "moonlight":
        return 0.2 * math.sqrt(max(rows, cols))
    if scale == "keller":
        return math.sqrt(max(1.0, rows / cols))
    raise ValueError(f"muon scale must be one of {SCALES}, got {scale!r}")


def param_kind(name: str, param: torch.Tensor) -> str:
    """'muon' or 'adamw' for one named parameter; by name first, then by shape.

    Muon takes hidden weight matrices: attention and MLP projections, shared experts, the MoE
    router [E, hidden] (Moonlight applies Muon to routers, muon.md §1.3) and stacked routed experts
    [E, out, in] (one matrix per expert). AdamW takes embeddings and lm_head (output neurons should
    not move orthogonally), 1-D tensors (norm gains, biases), KDA gate scalars and depthwise conv
    kernels [P, 1, K]. Anything else is refused rather than guessed.
    """
    parts = name.split(".")
    if "embed_tokens" in parts or "lm_head" in parts:
        return "adamw"
    if param.ndim <= 1 or parts[-1] in _ADAMW_LEAVES or any(p.endswith("conv1d") for p in parts):
        return "adamw"
    if param.ndim == 2:
        return "muon"
    if param.ndim == 3 and "experts" in parts:
        return "muon"
    raise ValueError(
        f"cannot assign parameter {name!r} of shape {tuple(param.shape)} to an optimizer group: "
        "expected a 2-D weight matrix, stacked experts [E, out, in] under '.experts.', an embedding, "
        "lm_head, a norm gain, a bias, a gate scalar (A_log, dt_bias) or a conv1d kernel"
    )


def checkpoint_name(name: str) -> str:
    """Drop wrapper prefixes (DDP's "module.", torch.compile's "_orig_mod.") so saved optimizer
    state names the checkpoint tensors and loads whichever way the model is wrapped."""
    while name.startswith(("module.", "_orig_mod.")):
        name = name.split(".", 1)[1]
    return name


def build_param_groups(
    model: nn.Module,
    *,
    optimizer: str = "muonclip",
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    adamw_lr: float | None = None,
    adamw_weight_decay: float | None = None,
    **hyper,
) -> list[dict]:
    """Named parameter groups for `MuonAdamW`: every trainable parameter exactly once.

    With optimizer="adamw" everything is one AdamW group. Otherwise matrices go to Muon and the
    rest to AdamW, which uses `adamw_lr` / `adamw_weight_decay` when given (Keller-scaled Muon
    needs a ~50x larger lr than AdamW; Moonlight scaling shares both, muon.md §1.4 and §5 item 2).
    Weight decay applies to every group, norm gains included (Moonlight found that decay on
    RMSNorm gains matters for stability, muon.md §1.5). `hyper` holds the remaining per-kind
    settings (betas, eps, momentum, nesterov, ns_steps, ns_eps, scale), each routed to the kind
    that uses it.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    unknown = set(hyper) - set(_DEFAULTS["muon"]) - set(_DEFAULTS["adamw"])
    if unknown:
        raise ValueError(f"unknown optimizer settings {sorted(unknown)}; expected some of "
                         f"{sorted(set(_DEFAULTS['muon']) | set(_DEFAULTS['adamw']))}")
    named = [(checkpoint_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    by_kind = {"muon": [], "adamw": []}
    for name, p in named:
        by_kind["adamw" if optimizer == "adamw" else param_kind(name, p)].append((name, p))
    grouped = [id(p) for pairs in by_kind.values() for _, p in pairs]
    assert len(grouped) == len(set(grouped)) == len({id(p) for _, p in named}), \
        "every trainable parameter must land in exactly one optimizer group"

    def settings(kind):
        return {k: v for k, v in hyper.items() if k in _DEFAULTS[kind]}

    groups = []
    if by_kind["muon"]:
        groups.append(dict(params=by_kind["muon"], kind="muon", lr=lr, weight_decay=weight_decay,
                           **settings("muon")))
    if by_kind["adamw"]:
        groups.append(dict(params=by_kind["adamw"], kind="adamw",
                           lr=lr if adamw_lr is None else adamw_lr,
                           weight_decay=weight_decay if adamw_weight_decay is None else adamw_weight_decay,
                           **settings("adamw")))
    return groups


def _check_group(group: dict) -> None:
    kind = group.get("kind")
    if kind not in _DEFAULTS:
        raise ValueError(f"param group kind must be one of {tuple(_DEFAULTS)}, got {kind!r}")
    extra = set(group) - set(_DEFAULTS[kind]) - {"params", "param_names", "kind", "initial_lr"}
    if extra:
        raise ValueError(f"{kind} group got settings it does not use: {sorted(extra)}")
    for key, default in _DEFAULTS[kind].items():
        group.setdefault(key, default)
    eps = group["ns_eps" if kind == "muon" else "eps"]
    if not (group["lr"] >= 0 and group["weight_decay"] >= 0 and eps > 0):
        raise ValueError(f"{kind} group needs lr >= 0, weight_decay >= 0 and eps > 0, got "
                         f"lr={group['lr']}, weight_decay={group['weight_decay']}, eps={eps}")
    if kind == "muon":
        if not 0 <= group["momentum"] < 1:
            raise ValueError(f"muon momentum must be in [0, 1), got {group['momentum']}")
        if not (isinstance(group["ns_steps"], int) and group["ns_steps"] >= 1):
            raise ValueError(f"muon ns_steps must be a positive int, got {group['ns_steps']!r}")
        muon_scale((1, 1), group["scale"])
    else:
        b1, b2 = group["betas"]
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"adamw betas must each be in [0, 1), got {group['betas']}")


def gather_full(tensor: torch.Tensor):
    """(full tensor, put-back) for a possibly sharded DTensor; (tensor itself, identity) otherwise.

    put-back turns a full-size result into a DTensor laid out like `tensor`."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor, lambda x: x  # no process group, no DTensor; skips a ~1 s import
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(tensor, DTensor):
        return tensor, lambda x: x
    mesh, placements = tensor.device_mesh, tensor.placements
    # Every rank gathers the same full matrix and computes the same result, so each slices its
    # own shard locally (src_data_rank=None: no further communication).
    return tensor.full_tensor(), lambda x: distribute_tensor(x, mesh, placements, src_data_rank=None)


def muon_step_(params, grads, momentum_buffers, *, lr, weight_decay, momentum, nesterov, ns_steps, ns_eps,
               scale, ns_dtype=torch.bfloat16) -> None:
    """One Muon step on a list of parameters ([A, B] matrices or stacked experts [E, A, B]), in place.

    Updates of the same shape are stacked into one batched Newton–Schulz (fewer, larger matmuls:
    ~1.5x faster on CPU for a small model's many equal-shape matrices). Each matrix is still
    normalised and orthogonalised on its own, and the result is bit-identical to one call per
    matrix, i.e. to torch.optim.Muon (tests/test_optim.py).
    """
    by_shape = {}
    for i, (grad, buf) in enumerate(zip(grads, momentum_buffers)):
        buf.lerp_(grad, 1 - momentum)  # EMA momentum, fp32
        update = grad.lerp(buf, momentum) if nesterov else buf
        full, put_back = gather_full(update)
        by_shape.setdefault(full.shape, []).append((i, full, put_back))
    for shape, items in by_shape.items():
        per_batch = max(1, NS_BATCH_NUMEL // shape.numel())
        for start in range(0, len(items), per_batch):
            batch = items[start:start + per_batch]
            stacked = torch.stack([full for _, full, _ in batch])  # [n, *shape]
            ortho = newton_schulz(stacked, ns_steps, ns_eps, ns_dtype)
            for (i, _, put_back), o in zip(batch, ortho):
                p = params[i]
                p.mul_(1 - lr * weight_decay)  # decoupled; on the unscaled lr like torch and Moonlight
                p.add_(put_back(o), alpha=-lr * muon_scale(shape, scale))


def adamw_update_(param, grad, exp_avg, exp_avg_sq, step, *, lr, weight_decay, betas, eps) -> None:
    """One AdamW step (decoupled weight decay, bias-corrected) on one parameter, in place."""
    beta1, beta2 = betas
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for groups of kind "muon", AdamW for groups of kind "adamw"; optional post-step hook.

    `qk_clip` (a `kimi.train.qk_clip.QKClip`, or any callable) runs after every update, on the
    updated fp32 master weights; what it returns (per-layer max logits) is kept in `max_logits`.
    Optimizer state is fp32 whatever the parameter dtype (muon.md §5.5). `ns_dtype`: Newton–Schulz's dtype; None
    (default) = bf16 where the parameters' device multiplies bf16 natively, fp32 where it would be emulated.
    """

    def __init__(self, params, qk_clip=None, ns_dtype: torch.dtype | None = None):
        self.qk_clip = qk_clip
        self.ns_dtype = ns_dtype
        self.max_logits = None
        super().__init__(params, {})

    def add_param_group(self, param_group: dict) -> None:
        _check_group(param_group)
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if param_group["kind"] == "muon" and p.ndim not in (2, 3):
                raise ValueError(f"muon takes [out, in] matrices or stacked experts [E, out, in], "
                                 f"got a parameter of shape {tuple(p.shape)}")

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, after checking that the saved groups hold the same kinds, parameter names and
        shapes: a resume from a different model fails here, by name, not later or silently."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(saved)} param groups, expected {len(self.param_groups)}")
        for s, o in zip(saved, self.param_groups):
            names_s, names_o = s.get("param_names") or [], o.get("param_names") or []
            if s.get("kind") != o["kind"] or names_s != names_o:
                only_model, only_state = sorted(set(names_o) - set(names_s)), sorted(set(names_s) - set(names_o))
                raise ValueError(
                    f"optimizer state does not match this model's {o['kind']} group: saved a {s.get('kind')!r} "
                    f"group of {len(names_s)} params for {len(names_o)}; only in the model: {only_model[:3]}, "
                    f"only in the state: {only_state[:3]}")
        params = [(n, p) for g in self.param_groups for n, p in zip(g.get("param_names") or [""] * len(g["params"]),
                                                                     g["params"])]
        for index, state in state_dict["state"].items():  # keyed by position in the flat parameter list
            name, p = params[index]
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape != p.shape:
                    raise ValueError(f"optimizer state {key!r} of parameter {name!r} has shape "
                                     f"{tuple(value.shape)}, expected the parameter's {tuple(p.shape)}")
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            settings = {k: group[k] for k in _DEFAULTS[group["kind"]]}
            muon_params, muon_grads, muon_buffers = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("MuonAdamW does not take sparse gradients")
                grad = p.grad.float()
                state = self.state[p]
                if group["kind"] == "muon":
                    if not state:
                        state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                    muon_params.append(p)
                    muon_grads.append(grad)
                    muon_buffers.append(state["momentum_buffer"])
                else:
                    if not state:
                        state["step"] = 0
                        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    state["step"] += 1
                    adamw_update_(p, grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                                  **settings)
            if muon_params:
                ns_dtype = self.ns_dtype or default_dtype(muon_params[0].device)
                muon_step_(muon_params, muon_grads, muon_buffers, **settings, ns_dtype=ns_dtype)
        if self.qk_clip is not None:
            self.max_logits = self.qk_clip()
        return loss


def build_optimizer(model: nn.Module, *, optimizer: str = "muonclip", lr: float = 1e-3,
                    weight_decay: float = 0.1, qk_clip_tau: float = 100.0, ns_dtype: torch.dtype | None = None,
                    **kwargs) -> MuonAdamW:
    """The optimizer for `kimi train`: "muonclip" (Muon + AdamW + QK-Clip at `qk_clip_tau`),
    "muon" (no clip) or "adamw" (AdamW on everything).

    In every mode the attention layers' per-head max logits are collected and reset after each
    step, so they can be logged (`optimizer.max_logits`); only "muonclip" rescales weights.
    ns_dtype: see MuonAdamW. Other keyword arguments go to `build_param_groups`.
    """
    from kimi.train.qk_clip import QKClip

    groups = build_param_groups(model, optimizer=optimizer, lr=lr, weight_decay=weight_decay, **kwargs)
    return MuonAdamW(groups, qk_clip=QKClip(model, tau=qk_clip_tau if optimizer == "muonclip" else None),
                     ns_dtype=ns_dtype)
