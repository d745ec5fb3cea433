"""Sampling the next token for a batch of sequences, each with its own settings and its own seeded generator.

Order (as vLLM): penalties on the raw logits (repetition: CTRL-style, logit / p if > 0 else logit * p, for tokens in
the prompt or the output; presence and frequency: OpenAI-style, on output tokens only), then temperature, top-k,
top-p (smallest set whose mass reaches p), min-p (drop tokens below min_p x the top probability), then a draw.
Temperature 0 is greedy: the argmax of the penalised logits.

The draw is an exponential race, argmax(p_i / E_i) with E_i ~ Exp(1), which picks i with probability p_i. Each row
draws its E from its own generator, so a seeded request gets the same tokens whatever else shares the batch.
`filter_probs_reference` and `apply_penalties_reference` are the plain per-row twins the tests hold these to.
"""

from __future__ import annotations

import torch


def apply_penalties(logits: torch.Tensor, prompts: list[list[int]], outputs: list[list[int]],
                    repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """logits [B, V] fp32; token lists per row; penalties [B] -> penalised logits [B, V]."""
    B, V = logits.shape
    dev = logits.device

    def padded(lists):  # [B, max len] with V as the padding id (a dummy column, cut off below)
        width = max((len(x) for x in lists), default=0)
        return torch.tensor([x + [V] * (width - len(x)) for x in lists], dtype=torch.long, device=dev).view(B, width)

    out = padded(outputs)
    counts = torch.zeros(B, V + 1, device=dev).scatter_add_(1, out, torch.ones(out.shape, device=dev))[:, :V]
    seen = torch.zeros(B, V + 1, dtype=torch.bool, device=dev).scatter_(1, padded(prompts), True)[:, :V]
    seen |= counts > 0
    rep = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def filter_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 min_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] fp32, settings [B] (temperature > 0; top_k 0 = off) -> (probs [B, V'] over the tokens `ids`
    [B, V'], in descending order, zero where filtered). V' = V, or the largest top_k when every row has one."""
    B, V = logits.shape
    x = logits / temperature[:, None]
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    if bool((top_k > 0).all()):
        x, ids = x.topk(int(k.max()), dim=-1)
    else:
        x, ids = x.sort(dim=-1, descending=True)
    rank = torch.arange(x.shape[1], device=x.device)
    x = x.masked_fill(rank[None] >= k[:, None], float("-inf"))
    probs = x.softmax(-1)
    drop = probs.cumsum(-1) - probs >= top_p[:, None]  # the first token always stays
    drop |= probs < min_p[:, None] * probs[:, :1]
    probs = probs.masked_fill(drop, 0.0)
    return probs / probs.sum(-1, keepdim=True), ids


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits [B, V] fp32 (penalised); settings [B]; one generator per row (None for greedy rows) -> ids [B]."""
    greedy = temperature == 0
    best = logits.argmax(-1)
    if bool(greedy.all()):
        return best
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    if bool(((top_k <= 0) & (top_p >= 1) & (min_p <= 0)).all()):
        probs = (logits / t[:, None]).softmax(-1)
    else:
        kept, ids = filter_probs(logits, t, top_k, top_p, min_p)
        probs = torch.zeros_like(logits).scatter_(1, ids, kept)
    # noise in vocabulary order, V draws per row per step, so a row's draw never depends on how the batch was filtered
    noise = torch.ones_like(probs)
    for row, gen in enumerate(generators):
        if gen is not None and not bool(greedy[row]):
            noise[row].exponential_(generator=gen)
    return torch.where(greedy, best, (probs / noise).argmax(-1))


def logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int):
    """log_softmax of the raw logits [B, V]: (the chosen tokens' [B], top-k values [B, k], top-k ids [B, k])."""
    lp = logits.float().log_softmax(-1)
    top = lp.topk(k, dim=-1) if k else (lp[:, :0], tokens[:, None][:, :0])
    return lp.gather(1, tokens[:, None])[:, 0], top[0], top[1]


def filter_probs_reference(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                           min_p: float) -> torch.Tensor:
    """One row [V] -> probabilities [V] over the vocabulary, zero where filtered (plain, slow, fp64)."""
    p = (logits.double() / temperature).softmax(-1)
    order = sorted(range(p.numel()), key=lambda i: -float(p[i]))
    if top_k > 0:
        p[order[top_k:]] = 0.0
        p = p / p.sum()
    top = float(p[order[0]])
    keep, mass = [], 0.0
    for i in order:
        if mass >= top_p or float(p[i]) == 0.0:
            break
        if float(p[i]) >= min_p * top:
            keep.append(i)
        mass += float(p[i])
    out = torch.zeros_like(p)
    out[keep] = p[keep]
    return out / out.sum()


def apply_penalties_reference(logits: torch.Tensor, prompt: list[int], output: list[int], repetition: float,
                              presence: float, frequency: float) -> torch.Tensor:
    """One row [V], token by token."""
    x = logits.clone().double()
    for tok in set(prompt) | set(output):
        x[tok] = x[tok] / repetition if x[tok] > 0 else x[tok] * repetition
    for tok in set(output):
        x[tok] -= presence + frequency * output.count(tok)
    return x
