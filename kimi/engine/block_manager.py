"""BlockManager: the paged MLA latent cache's bookkeeping (which block holds which tokens), with prefix caching.

The cache itself is one tensor per MLA layer of num_blocks * block_size latent rows (engine/runner.py); a sequence's
block table lists the blocks holding its tokens in order, so token p lives in row table[p // bs] * bs + p % bs.

Prefix caching (vLLM's design, ../shared/reference/serving.md §3.1): when a block becomes full and computed it gets
a chained hash, hash(parent hash, its token ids), and is registered in `hash_to_block`. A new sequence walks its full
blocks left to right and reuses every registered block whose token ids match (collisions are verified, not trusted).
Freed blocks keep their hash ("lazy eviction") on an LRU free list and can be revived by a later hit; a block is
forgotten only when the free list hands it out again, and then `on_evict(hash)` tells the state pool to drop the KDA
snapshot keyed by that hash. Blocks are refcounted: several sequences may share a cached prefix.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from kimi.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None


def chain_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks = {num_blocks} and block_size = {block_size}: both must be >= 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # ref 0, evicted from the front
        self.hash_to_block: dict[int, int] = {}
        self.on_evict: Callable[[int], None] | None = None

    # ---- accounting --------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def num_cached(self) -> int:
        """Blocks findable by a prefix hit (in use or free)."""
        return len(self.hash_to_block)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix lookup -------------------------------------------------------------------------------------
    def match(self, token_ids: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
        """The longest cached prefix of whole blocks within the first max_tokens tokens: (block ids, hashes)."""
        ids: list[int] = []
        hashes: list[int] = []
        if not self.enable_prefix_caching:
            return ids, hashes
        bs, h = self.block_size, None
        for j in range(max_tokens // bs):
            toks = tuple(token_ids[j * bs:(j + 1) * bs])
            h = chain_hash(h, toks)
            b = self.hash_to_block.get(h)
            if b is None or self.blocks[b].token_ids != toks:
                break
            ids.append(b)
            hashes.append(h)
        return ids, hashes

    # ---- allocation ----------------------------------------------------------------------------------------
    def can_admit(self, hits: list[int], num_tokens: int) -> bool:
        """Could a sequence reusing `hits` get blocks for num_tokens tokens? (Hits on free blocks cost a free block.)"""
        revive = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return revive + max(self.blocks_needed(num_tokens) - len(hits), 0) <= len(self.free)

    def admit(self, seq: Sequence, hits: list[int], hashes: list[int]) -> None:
        """Give seq the cached blocks `hits` (verified by `match`) as the start of its block table."""
        assert not seq.block_table, f"{seq} already holds blocks"
        for b in hits:
            blk = self.blocks[b]
            if blk.ref_count == 0:
                del self.free[b]
            blk.ref_count += 1
        seq.block_table = list(hits)
        seq.block_hashes = list(hashes)

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Extend seq's block table to hold num_tokens tokens; False (and no change) when too few blocks are free."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need > len(self.free):
            return False
        for _ in range(need):
            seq.block_table.append(self._take())
        return True

    def _take(self) -> int:
        b, _ = self.free.popitem(last=False)
        blk = self.blocks[b]
        if blk.hash is not None:
            if self.hash_to_block.get(blk.hash) == b:
                del self.hash_to_block[blk.hash]
                if self.on_evict is not None:
                    self.on_evict(blk.hash)
            blk.hash = blk.token_ids = None
        blk.ref_count = 1
        return b

    def release(self, seq: Sequence) -> None:
        """Drop seq's references. Tail blocks go to the LRU end first so they are evicted before the prefix;
        blocks nobody can hit (no hash) go to the front, to be reused first."""
        for b in reversed(seq.block_table):
            blk = self.blocks[b]
            blk.ref_count -= 1
            if blk.ref_count == 0:
                self.free[b] = None
                if blk.hash is None:
                    self.free.move_to_end(b, last=False)
        seq.block_table = []
        seq.block_hashes = []

    def commit(self, seq: Sequence) -> None:
        """Hash and register seq's blocks that are now full and computed."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for j in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            toks = tuple(seq.token_ids[j * bs:(j + 1) * bs])
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else None, toks)
            seq.block_hashes.append(h)
            blk = self.blocks[seq.block_table[j]]
            blk.hash, blk.token_ids = h, toks
            self.hash_to_block.setdefault(h, blk.block_id)  # an equal block cached earlier stays the canonical one
