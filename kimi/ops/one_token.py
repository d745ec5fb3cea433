"""Batch-1 decode as a flat program of C calls (kimi/ops/cpu_kernels.py) on buffers allocated once.

A packed bf16 model (kimi/ops/packed_linear.py) decodes one token in ~100 C calls, one or a few per module. At
bench size the Python around them (module dispatch, argument checks, fresh tensors, views) was ~2 ms of a ~7.4 ms
token, where the weights' streaming floor is ~4.6 ms. OneTokenDecoder makes the same calls in the same order on the
same bytes, with every pointer and size worked out once, so its logits are bit for bit the module path's
(tests/test_one_token.py). Per token only the position (the rope row), the cache row of the new latent, the context
rows and the KDA state slot change.

The engine's runner takes it for decode-only steps of one sequence wherever `OneTokenDecoder.build` returns one: a
bf16 model packed on a CPU whose kernels have AVX512-BF16, each layer an MLA or KDA layer with its one-row variant
(OneRowMLA, OneRowKDA) and stacked input weights, each FFN a one-row SwiGLU MLP (OneRowMLP) or an MoE of a
OneRowRouter, tiled PackedExperts and an optional one-row shared MLP, every norm a OneRowRMSNorm. Anything else
(fp32 models, quantised experts, other devices) keeps the module path.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from kimi.model.moe import MoE
from kimi.ops import cpu_kernels
from kimi.ops.packed_linear import OneRowKDA, OneRowMLA, OneRowMLP, OneRowRMSNorm, OneRowRouter, PackedExperts, \
    PackedLinear


class Unsupported(Exception):
    """The model has a part the flat program does not cover (the module path runs it)."""


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _ok(failed: int, what: str) -> None:
    if failed:
        raise MemoryError(f"{what} could not allocate its scratch memory")


def _norm(m) -> tuple[int, float]:
    if type(m) is not OneRowRMSNorm or m.weight.dtype != torch.bfloat16 or not m.weight.is_contiguous():
        raise Unsupported(f"norm {type(m).__name__}")
    return _ptr(m.weight), m.eps


def _plain(m) -> torch.Tensor:
    """The plain [out, in] weight a PackedLinear's single rows go through (gemv)."""
    if type(m) is not PackedLinear or m.plain is None:
        raise Unsupported(f"linear {type(m).__name__} without a plain weight")
    return m.plain


class _Scratch:
    """bf16 vectors the program writes, allocated once (kept alive here; the program holds their addresses)."""

    def __init__(self):
        self.tensors = []

    def __call__(self, n: int, dtype=torch.bfloat16) -> torch.Tensor:
        t = torch.zeros(n, dtype=dtype)
        self.tensors.append(t)
        return t


class _Ffn:
    """post_attention_layernorm, then the FFN: x += mlp(h), or x += bf16(experts(h) + shared(h))."""

    def __init__(self, norm, ffn, D: int, scratch: _Scratch):
        self.norm_w, self.eps = _norm(norm)
        self.h, self.y, self.s = (_ptr(scratch(D)) for _ in range(3))
        self.mlp = self.shared = None
        if type(ffn) is OneRowMLP:
            self.mlp = self._swiglu(ffn)
            return
        if not (type(ffn) is MoE and type(ffn.gate) is OneRowRouter and type(ffn.experts) is PackedExperts
                and ffn.experts.tiles is not None and ffn.gate.weight.dtype == torch.bfloat16
                and ffn.gate.weight.shape[0] <= 1024 and ffn.gate.top_k <= 64):  # the kernels' limits
            raise Unsupported(f"ffn {type(ffn).__name__}")
        if hasattr(ffn, "shared_experts"):
            if type(ffn.shared_experts) is not OneRowMLP:
                raise Unsupported("shared experts without a one-row variant")
            self.shared = self._swiglu(ffn.shared_experts)
        g = ffn.gate
        self.keep = (g.weight.detach().contiguous(), g.e_score_correction_bias.float().contiguous())
        self.router = (_ptr(self.keep[0]), _ptr(self.keep[1]), g.weight.shape[0], g.n_group, g.topk_group, g.top_k,
                       int(g.norm_topk_prob), g.scaling)
        self.k = g.top_k
        self.idx, self.w = _ptr(scratch(g.top_k, torch.int64)), _ptr(scratch(g.top_k, torch.float32))
        gu, dn = ffn.experts.tiles
        self.experts = (_ptr(gu), _ptr(dn), gu.shape[0], gu.shape[1] * 32)

    @staticmethod
    def _swiglu(mlp: OneRowMLP) -> tuple[int, int, int]:
        if mlp.gate_up_plain is None or mlp.down_proj.plain is None:
            raise Unsupported("an MLP without plain weights")
        return _ptr(mlp.gate_up_plain), _ptr(mlp.down_proj.plain), mlp.down_proj.plain.shape[1]

    def __call__(self, lib, x: int, D: int, threads: int) -> None:
        lib.kimi_rmsnorm_bf16(x, 1, D, self.norm_w, self.eps, self.h)
        if self.mlp is not None:
            gate_up, down, I = self.mlp
            _ok(lib.kimi_swiglu_one_bf16(self.h, D, gate_up, down, I, 1.0, None, self.y, threads), "swiglu")
        else:
            lib.kimi_route_one_bf16(self.h, D, *self.router, self.idx, self.w)
            gu, dn, E, I = self.experts
            _ok(lib.kimi_moe_experts_pairs(self.h, 1, D, self.idx, self.w, self.k, gu, dn, E, I, self.y, threads),
                "moe_experts")
            if self.shared is not None:
                gate_up, down, I = self.shared
                _ok(lib.kimi_swiglu_one_bf16(self.h, D, gate_up, down, I, 1.0, None, self.s, threads), "swiglu")
                lib.kimi_add_bf16(self.y, self.s, D, self.y)
        lib.kimi_add_bf16(x, self.y, D, x)


class _Mla:
    """input_layernorm, MLA's projections, the new latent into its cache row, absorbed attention, o_proj, x += o."""

    def __init__(self, norm, mla: OneRowMLA, cache: torch.Tensor, D: int, scratch: _Scratch):
        if mla.in_plain is None or mla.one_call:
            raise Unsupported(f"attention {type(mla).__name__}")
        self.norm_w, self.eps = _norm(norm)
        H, nope, rope, v, r = (mla.num_heads, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim,
                               mla.kv_lora_rank)
        self.shape = (H, nope, rope, v, r)
        self.h = _ptr(scratch(D))
        self.in_plain, self.n_in = _ptr(mla.in_plain), mla.in_plain.shape[0]
        inputs = scratch(self.n_in)
        self.inputs, self.kv = _ptr(inputs), _ptr(inputs) + 2 * mla.in_split[0]
        q = scratch(H * (nope + rope))
        self.q_lora = None
        if mla.q_lora:  # q = q_b_proj(q_a_layernorm(q_a))
            self.q_lora = (*_norm(mla.q_a_layernorm), mla.in_split[0], _ptr(scratch(mla.in_split[0])),
                           _ptr(_plain(mla.q_b_proj)), H * (nope + rope))
            self.q = _ptr(q)
        else:
            self.q = self.inputs
            q = inputs[:H * (nope + rope)]
        self.q_nope_view = q.view(H, nope + rope)[:, :nope]  # copied to q_nope: the attention reads [H, nope]
        self.q_nope = scratch(H * nope).view(H, nope)
        self.q_pe = _ptr(scratch(H * rope))
        self.kv_norm = _norm(mla.kv_a_layernorm)
        self.rotary = mla.rotary
        self.cache, self.width = cache, r + rope
        self.pairs = cpu_kernels.kv_b_pairs(mla)
        self.wk2, self.wv2 = (_ptr(t) for t in self.pairs)
        self.scale = mla.scale
        self.o, self.delta = _ptr(scratch(H * v)), _ptr(scratch(D))
        self.o_proj = _ptr(_plain(mla.o_proj))

    def __call__(self, lib, x: int, D: int, threads: int, step: "_Step") -> None:
        H, nope, rope, v, r = self.shape
        lib.kimi_rmsnorm_bf16(x, 1, D, self.norm_w, self.eps, self.h)
        _ok(lib.kimi_gemv_bf16(self.h, 1, D, self.in_plain, self.n_in, self.inputs, threads), "gemv")
        if self.q_lora is not None:
            w, eps, q_a, normed, q_b, n_q = self.q_lora
            lib.kimi_rmsnorm_bf16(self.inputs, 1, q_a, w, eps, normed)
            _ok(lib.kimi_gemv_bf16(normed, 1, q_a, q_b, n_q, self.q, threads), "gemv")
        cos = sin = None
        if self.rotary is not None:
            cos_t, sin_t = self.rotary.table(step.position + 1, "cpu")
            cos = _ptr(cos_t) + 4 * step.position * (rope // 2)
            sin = _ptr(sin_t) + 4 * step.position * (rope // 2)
        latent = _ptr(self.cache) + 2 * step.slot * self.width  # written straight into its cache row
        lib.kimi_mla_project_one_bf16(self.q, H, nope, rope, self.kv, r, *self.kv_norm, cos, sin, self.q_pe, latent)
        self.q_nope.copy_(self.q_nope_view)
        _ok(lib.kimi_mla_decode_pairs(_ptr(self.q_nope), self.q_pe, self.wk2, self.wv2, _ptr(self.cache), step.rows,
                                      step.start, step.length_ptr, 1, step.span, H, nope, rope, v, r, self.scale,
                                      self.o, threads), "mla_decode")
        _ok(lib.kimi_gemv_bf16(self.o, 1, H * v, self.o_proj, D, self.delta, threads), "gemv")
        lib.kimi_add_bf16(x, self.delta, D, x)


class _Kda:
    """input_layernorm, KDA's stacked input products, f_b and g_b, the decode step on the pool's slot, o_proj, x += o."""

    def __init__(self, norm, kda: OneRowKDA, windows: torch.Tensor, states: torch.Tensor, D: int, scratch: _Scratch):
        if kda.in_plain is None or kda.o_norm.weight.dtype != torch.bfloat16:
            raise Unsupported(f"attention {type(kda).__name__}")
        self.norm_w, self.eps = _norm(norm)
        H, K = kda.num_heads, kda.head_dim
        P = H * K
        self.shape = (H, K, P)
        self.h = _ptr(scratch(D))
        self.in_plain, self.n_in = _ptr(kda.in_plain), kda.in_plain.shape[0]
        qkv_n, f_n, g_n, _ = kda.in_split
        inputs = _ptr(scratch(self.n_in))
        self.qkv, self.f, self.g, self.b = inputs, inputs + 2 * qkv_n, inputs + 2 * (qkv_n + f_n), \
            inputs + 2 * (qkv_n + f_n + g_n)
        self.f_n, self.g_n = f_n, g_n
        self.f_b, self.g_b = _ptr(_plain(kda.f_b_proj)), _ptr(_plain(kda.g_b_proj))
        self.fb, self.gb, self.o, self.delta = (_ptr(scratch(n)) for n in (P, P, P, D))
        self.keep = (kda.conv_weight, kda.dt_bias.detach().float().contiguous(), kda.A_log.detach().float().contiguous(),
                     kda.o_norm.weight.detach().contiguous())
        self.conv, self.dt_bias, self.a_log, self.o_norm = (_ptr(t) for t in self.keep)
        self.o_eps, self.conv_size = kda.o_norm.eps, kda.conv_size
        self.windows, self.states, self.num_slots = _ptr(windows), _ptr(states), windows.shape[0]
        self.o_proj = _ptr(_plain(kda.o_proj))

    def __call__(self, lib, x: int, D: int, threads: int, step: "_Step") -> None:
        H, K, P = self.shape
        lib.kimi_rmsnorm_bf16(x, 1, D, self.norm_w, self.eps, self.h)
        _ok(lib.kimi_gemv_bf16(self.h, 1, D, self.in_plain, self.n_in, self.qkv, threads), "gemv")
        _ok(lib.kimi_gemv_bf16(self.f, 1, self.f_n, self.f_b, P, self.fb, threads), "gemv")
        _ok(lib.kimi_gemv_bf16(self.g, 1, self.g_n, self.g_b, P, self.gb, threads), "gemv")
        if lib.kimi_kda_decode_bf16(self.qkv, self.fb, self.b, self.gb, self.conv, self.conv_size, self.dt_bias,
                                    self.a_log, self.o_norm, self.o_eps, self.windows, self.states, step.state_slot_ptr,
                                    self.num_slots, 1, H, K, K, self.o, threads):
            raise ValueError(f"kda_decode: state slot outside the pool's {self.num_slots} rows")
        _ok(lib.kimi_gemv_bf16(self.o, 1, P, self.o_proj, D, self.delta, threads), "gemv")
        lib.kimi_add_bf16(x, self.delta, D, x)


class _Step:
    """What changes from token to token."""

    def __init__(self):
        self.length = (ctypes.c_int64 * 1)()  # the context length, as the attention kernel reads it
        self.state_slot = (ctypes.c_int64 * 1)()
        self.length_ptr, self.state_slot_ptr = ctypes.addressof(self.length), ctypes.addressof(self.state_slot)
        self.position = self.slot = self.start = self.span = 0
        self.rows = None  # the context rows' address (int64 [1, span]), or None for consecutive rows from start


class OneTokenDecoder:
    """model(one token) -> fp32 logits [1, vocab], as the packed model's modules compute them, bit for bit."""

    def __init__(self, model: nn.Module, kv_cache: torch.Tensor, mla_row: dict[int, int], pool):
        if not (cpu_kernels.available() and cpu_kernels.bf16_dot() and model.dtype == torch.bfloat16
                and model.device.type == "cpu" and kv_cache.is_contiguous()):
            raise Unsupported("needs a bf16 CPU model and AVX512-BF16 kernels")
        self.lib = cpu_kernels._loaded()
        scratch = self.scratch = _Scratch()
        D = self.D = model.config.hidden_size
        self.embed = model.model.embed_tokens.weight.detach()
        self.x = _ptr(scratch(D))
        self.layers = []
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            if type(attn) is OneRowMLA:
                mixer = _Mla(layer.input_layernorm, attn, kv_cache[mla_row[i]], D, scratch)
            elif type(attn) is OneRowKDA:
                r = pool.row[i]
                mixer = _Kda(layer.input_layernorm, attn, pool.conv[r], pool.state[r], D, scratch)
            else:
                raise Unsupported(f"attention {type(attn).__name__}")
            self.layers.append((mixer, _Ffn(layer.post_attention_layernorm, layer._modules[layer.ffn_name], D,
                                            scratch)))
        self.final_norm = _norm(model.model.norm)
        self.h = _ptr(scratch(D))
        self.lm_head = _plain(model.lm_head)  # a tied lm_head (the embedding) stays nn.Linear: Unsupported
        self.logits = scratch(self.lm_head.shape[0])
        self.step = _Step()

    @classmethod
    def build(cls, model: nn.Module, kv_cache: torch.Tensor, mla_row: dict[int, int], pool) -> OneTokenDecoder | None:
        """The program for `model`, or None where a part of it is not covered (see the module docstring)."""
        try:
            return cls(model, kv_cache, mla_row, pool)
        except Unsupported:
            return None

    def __call__(self, token: int, position: int, slot: int, rows: torch.Tensor | slice, state_slot: int) -> torch.Tensor:
        """token at `position`, its latent going to cache row `slot`; rows: the cache rows of its context (a slice of
        consecutive rows, or int64 [1, position + 1]); state_slot: its KDA slot -> fp32 logits [1, vocab]."""
        lib, D, step, x = self.lib, self.D, self.step, self.x
        if not 0 <= token < self.embed.shape[0]:
            raise ValueError(f"token id {token} outside the vocabulary of {self.embed.shape[0]}")
        step.position, step.slot, step.length[0], step.state_slot[0] = position, slot, position + 1, state_slot
        if isinstance(rows, slice):
            step.rows, step.start, step.span = None, rows.start, rows.stop - rows.start
        else:
            rows = rows.to(torch.int64).contiguous()  # alive until the call returns
            step.rows, step.start, step.span = _ptr(rows), 0, rows.shape[-1]
        threads = torch.get_num_threads()
        ctypes.memmove(x, _ptr(self.embed) + 2 * D * token, 2 * D)
        for mixer, ffn in self.layers:
            mixer(lib, x, D, threads, step)
            ffn(lib, x, D, threads)
        lib.kimi_rmsnorm_bf16(x, 1, D, *self.final_norm, self.h)
        _ok(lib.kimi_gemv_bf16(self.h, 1, D, _ptr(self.lm_head), self.lm_head.shape[0], _ptr(self.logits), threads),
            "gemv")
        return self.logits.float()[None]
