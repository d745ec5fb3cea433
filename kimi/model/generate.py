"""The reference generate: prefill once, then decode token by token over a DenseCache (model/cache.py).

Simple on purpose: it is the oracle the engine's paged, batched fast path is held to, token for token.
Greedy when temperature == 0; otherwise temperature / top-k / top-p sampling from a seeded generator.
"""

from __future__ import annotations

import torch

from kimi.model.cache import DenseCache
from kimi.model.model import Transformer


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt_ids: torch.Tensor | list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: tuple[int, ...] | list[int] = (),
    prefill_chunk: int | None = None,
) -> list[list[int]]:
    """prompt_ids: [B, T] (equal-length prompts) or one list of ids -> the generated ids per row (prompt excluded).

    A row stops after emitting a stop id (kept in its output); others keep going until max_new_tokens.
    prefill_chunk splits the prompt into pieces fed one after another (exercises the cache's continuation path).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens = {max_new_tokens}, expected >= 0")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"invalid sampling settings: temperature {temperature} (>= 0), top_p {top_p} (0, 1], "
                         f"top_k {top_k} (>= 0)")
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=model.device)
    if ids.dim() == 1:
        ids = ids[None]
    B, T = ids.shape
    if T == 0:
        raise ValueError("empty prompt: generate needs at least one prompt token")
    vocab = model.config.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"prompt token ids must lie in [0, {vocab}), got min {int(ids.min())} max {int(ids.max())}")
    cache = DenseCache(model.config, B, T + max_new_tokens, model.dtype, model.device)
    gen = torch.Generator(device=model.device)
    if seed is not None:
        gen.manual_seed(seed)
    step = prefill_chunk or T
    for s in range(0, T, step):
        logits = model(ids[:, s:s + step], cache=cache)[:, -1]
    out = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=ids.device)
    for i in range(max_new_tokens):
        nxt = sample(logits.float(), temperature, top_k, top_p, gen)  # [B]
        for b in range(B):
            if not done[b]:
                out[b].append(int(nxt[b]))
        done |= torch.isin(nxt, stop)
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = model(nxt[:, None], cache=cache)[:, -1]
    return out


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """logits [B, V] fp32 -> token ids [B]."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]
