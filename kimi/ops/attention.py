"""MLA attention over the paged latent cache (one flat [num_blocks * block_size, W] tensor per MLA layer, W =
kv_lora_rank + qk_rope_head_dim; token p of a sequence lives in row table[p // block_size] * block_size + p %
block_size). Math: ../shared/reference/k2.md §2.3 (absorbed decode), serving.md §3.1 (paged MLA cache).

`context_rows` turns block tables into the row indices of each sequence's context (one [B, S] index matrix for a
whole decode batch, padded and masked), or into a plain slice when a sequence's blocks happen to be consecutive, so
batch-1 decode reads the cache in place instead of gathering a copy. A batch's gather goes into a caller-owned
buffer reused layer after layer and step after step: a fresh tensor of tens of MB is a fresh mmap that the kernel
zero-fills page by page, which on CPU cost ~6x the copy itself. `paged_decode` attends a batch of single-token
queries over their contexts in the absorbed form (MQA over the latent). `paged_attention_reference` is the plain
twin: per sequence, token by token, the dense form.
"""

from __future__ import annotations

import torch

from kimi.ops import cpu_kernels


def c_kernel_max_context() -> float:
    """Longest context the C kernel attends over. With AVX512-BF16, any: a context over 2,048 tokens is split into
    chunks attended in parallel (bench/decode_kernels.py: 1.8-4.7x the torch path from 512 to 131,072 tokens at
    bench sizes, torch on two threads). Without, its fp32 multiply-adds lose from ~3k tokens on, and longer contexts
    keep torch's GEMMs over the gathered context."""
    return float("inf") if cpu_kernels.bf16_dot() else 2048


def kernel_attends(cache: torch.Tensor, context: int) -> bool:
    """Whether paged_decode runs a bf16 batch over contexts of up to `context` tokens as one C call (no gather: each
    sequence reads its own rows, so batching sequences of any lengths together costs no padding)."""
    return (cache.dtype == torch.bfloat16 and cache.device.type == "cpu" and cpu_kernels.available()
            and context <= c_kernel_max_context())


def contiguous(table: list[int], num_tokens: int, block_size: int) -> slice | None:
    """The rows of a sequence's first num_tokens tokens as one slice, when its blocks are consecutive."""
    n = -(-num_tokens // block_size)
    first = table[0]
    if table[n - 1] - first != n - 1 or any(table[j] != first + j for j in range(1, n - 1)):
        return None
    return slice(first * block_size, first * block_size + num_tokens)


def context_rows(tables: list[list[int]], lengths: list[int], block_size: int, device):
    """Row indices [B, S] of the first lengths[b] tokens of each sequence (S = max length, padding rows point at row
    0) and the validity mask [B, S]."""
    S = max(lengths)
    n = -(-S // block_size)
    bt = torch.tensor([t[:n] + [0] * (n - len(t[:n])) for t in tables], dtype=torch.long, device=device)
    offs = torch.arange(block_size, device=device)
    rows = (bt[:, :, None] * block_size + offs).flatten(1)[:, :S]
    mask = torch.arange(S, device=device)[None] < torch.tensor(lengths, device=device)[:, None]
    return rows, mask


def paged_decode(mla, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, rows, mask,
                 buffer: torch.Tensor | None = None) -> torch.Tensor:
    """q_nope [B, 1, H, nope], q_pe [B, 1, H, rope]; cache [R, W]; rows: [B, S] indices or a slice (B = 1);
    mask [B, S] (True on a prefix of each row: its context); buffer: None or a contiguous [>= B*S, W] scratch
    tensor for the gathered contexts -> [B, 1, H, v].
    The absorbed form (MLA.attend_absorbed is its reference), laid out so that both products stream the context
    row-major as one GEMM per sequence: scores = ctx @ q^T, not q @ ctx^T, which torch runs as a slow per-head
    strided GEMV for bf16 on CPU; and p @ ctx over all W columns, dropping the rope columns of the product
    afterwards (slicing ctx first would make bmm copy the whole context). In bf16 on a CPU with kimi's C kernels the
    whole form is one call up to c_kernel_max_context() tokens (kimi/ops/cpu_kernels.py; no gather, no per-op
    overhead; this code is its twin); in fp32, where kv_b_proj has a bf16 copy (kimi/ops/bf16_weights.py), so is
    its fp32 form, at any context: it splits long ones into chunks attended in parallel (1.2-2.6x this path from 100
    to 32,768 tokens on a 2-core EPYC, one thread or two, bench/decode_kernels.py)."""
    if kernel_attends(cache, mask.shape[1]):
        return cpu_kernels.mla_decode(mla, q_nope, q_pe, cache, rows, mask.sum(1))
    if (cache.dtype == torch.float32 and cache.device.type == "cpu" and hasattr(mla.kv_b_proj, "plain")
            and cpu_kernels.fp32_available()):
        return cpu_kernels.mla_decode_fp32(mla, q_nope, q_pe, cache, rows, mask.sum(1))
    if isinstance(rows, slice):
        ctx = cache[rows][None]  # [1, S, W], in place
    else:
        B, S = rows.shape
        out = None if buffer is None else buffer[:B * S]
        ctx = torch.index_select(cache, 0, rows.reshape(-1), out=out).view(B, S, -1)  # [B, S, W]
    r = mla.kv_lora_rank
    w_uk, w_uv_t = mla.absorbed_weights()  # [H, nope, r], [H, r, v]
    q_lat = torch.bmm(q_nope[:, 0].transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, r]
    q = torch.cat([q_lat, q_pe[:, 0]], dim=-1)  # [B, H, W]
    scores = torch.bmm(ctx, q.transpose(1, 2)).transpose(1, 2)  # [B, H, S], a view of [B, S, H]
    # made contiguous in the fp32 copy: a softmax over a strided dim is ~6x slower than over the last one
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32), memory_format=torch.contiguous_format)
    p = (scores * mla.scale).masked_fill_(~mask[:, None, :], float("-inf")).softmax(dim=-1).to(ctx.dtype)
    o_lat = torch.bmm(p, ctx)[..., :r]  # [B, H, r]
    return torch.bmm(o_lat.transpose(0, 1), w_uv_t).transpose(0, 1)[:, None]  # [B, 1, H, v]


def paged_attention_reference(mla, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                              tables: list[list[int]], starts: list[int], counts: list[int],
                              block_size: int) -> torch.Tensor:
    """q_nope [1, N, H, nope], q_pe [1, N, H, rope] packed sequence after sequence: sequence b has counts[b] queries
    at positions starts[b].. (their latents already in the cache) -> [1, N, H, v], by the dense expanded form over
    a latent gathered token by token."""
    outs, a = [], 0
    for table, start, n in zip(tables, starts, counts):
        S = start + n
        latent = torch.stack([cache[table[p // block_size] * block_size + p % block_size] for p in range(S)])
        mask = torch.arange(S)[None, :] <= torch.arange(start, S)[:, None]
        outs.append(mla.attend_expanded(q_nope[:, a:a + n], q_pe[:, a:a + n], latent[None], mask))
        a += n
    return torch.cat(outs, 1)
