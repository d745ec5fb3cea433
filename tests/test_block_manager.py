"""BlockManager (paged latent blocks, refcounts, chained-hash prefix cache) and StatePool, on CPU without a model."""

import pytest
import torch

from kimi.engine.block_manager import BlockManager
from kimi.engine.sampling_params import SamplingParams
from kimi.engine.sequence import Sequence
from kimi.engine.state_pool import StatePool
from tests.test_model import kl_tiny


def seq(tokens):
    return Sequence("r", 0, tokens, SamplingParams(), torch.Generator())


def run(bm, s, n):
    """Admit s with its prefix hits, allocate n more tokens and mark them computed."""
    hits, hashes = bm.match(s.token_ids, s.num_tokens - 1)
    bm.admit(s, hits, hashes)
    s.num_computed_tokens = len(hits) * bm.block_size
    assert bm.grow(s, s.num_computed_tokens + n)
    s.num_computed_tokens += n
    bm.commit(s)
    return len(hits)


def test_allocate_and_release_account_exactly():
    bm = BlockManager(10, 4)
    a = seq(list(range(10)))
    assert run(bm, a, 10) == 0
    assert len(a.block_table) == 3 and bm.num_used == 3 and bm.num_free == 7
    assert len(a.block_hashes) == 2  # only full blocks are hashed
    bm.release(a)
    assert bm.num_used == 0 and bm.num_free == 10 and a.block_table == []
    assert bm.num_cached == 2  # lazily evicted: still findable


def test_prefix_hit_shares_blocks_and_verifies_tokens():
    bm = BlockManager(10, 4)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    run(bm, a, 9)
    b = seq([1, 2, 3, 4, 5, 6, 7, 8, 0, 0])
    assert run(bm, b, 2) == 2
    assert b.block_table[:2] == a.block_table[:2]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    c = seq([1, 2, 3, 4, 9, 9, 9, 9, 1])  # shares the first block only
    assert run(bm, c, 5) == 1
    # a forged hash entry whose tokens differ is not trusted
    blk = bm.blocks[a.block_table[1]]
    blk.token_ids = (0, 0, 0, 0)
    d = seq([1, 2, 3, 4, 5, 6, 7, 8, 1])
    assert bm.match(d.token_ids, 8)[0] == [a.block_table[0]]


def test_never_matches_the_last_token():
    bm = BlockManager(10, 4)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8])
    run(bm, a, 8)
    b = seq([1, 2, 3, 4, 5, 6, 7, 8])
    assert run(bm, b, 4) == 1  # 8 tokens, at most 7 cached: one full block


def test_freed_blocks_are_revived_and_evicted_lru_with_callback():
    evicted = []
    bm = BlockManager(4, 2)
    bm.on_evict = evicted.append
    a = seq([1, 2, 3, 4, 5])
    run(bm, a, 5)
    hashes = list(a.block_hashes)
    bm.release(a)
    b = seq([1, 2, 3, 4, 6])
    assert run(bm, b, 1) == 2  # revived from the free list
    assert bm.num_free == 1
    bm.release(b)
    c = seq([9, 9, 9, 9, 9, 9, 9])  # needs all 4 blocks: every cached block gets evicted
    assert run(bm, c, 7) == 0
    assert set(evicted) == set(hashes) and bm.num_free == 0


def test_grow_fails_without_side_effects():
    bm = BlockManager(3, 4)
    a = seq(list(range(8)))
    run(bm, a, 8)
    b = seq(list(range(20, 30)))
    bm.admit(b, [], [])
    assert not bm.grow(b, 10)
    assert b.block_table == [] and bm.num_free == 1
    assert bm.can_admit([], 4) and not bm.can_admit([], 5)


def test_prefix_caching_off_never_hits():
    bm = BlockManager(10, 4, enable_prefix_caching=False)
    a = seq(list(range(9)))
    run(bm, a, 9)
    assert run(bm, seq(list(range(9))), 9) == 0 and bm.num_cached == 0


def test_state_pool_slots_and_snapshots():
    cfg = kl_tiny()
    pool = StatePool(cfg, num_slots=2, num_snapshots=2, dtype=torch.float32)
    assert pool.has_state and pool.conv.shape[:2] == (3, 4) and pool.state.dtype == torch.float32
    s0, s1 = pool.allocate(), pool.allocate()
    assert (s0, s1) == (0, 1) and pool.num_free == 0
    with pytest.raises(RuntimeError):
        pool.allocate()
    pool.state[:, s0] = 1.0
    pool.conv[:, s0] = 2.0
    pool.save_snapshot(s0, key=11)
    pool.state[:, s0] = 5.0
    pool.load_snapshot(11, s1)
    assert (pool.state[:, s1] == 1.0).all() and (pool.conv[:, s1] == 2.0).all()
    pool.save_snapshot(s0, key=12)
    pool.load_snapshot(11, s1)  # touch 11: 12 is now the least recently used
    pool.save_snapshot(s0, key=13)
    assert pool.has_snapshot(11) and not pool.has_snapshot(12) and pool.has_snapshot(13)
    pool.drop_snapshot(11)
    assert len(pool.snapshots) == 1 and len(pool.free_snapshot_rows) == 1
    pool.free(s0)
    assert (pool.state[:, pool.allocate()] == 0).all()  # a reused slot starts from zero state
