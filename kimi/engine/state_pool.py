"""StatePool: fixed-size KDA state slots (short-conv windows + fp32 recurrent state) and prefix-cache snapshots.

A Kimi Linear sequence's KDA memory does not grow with its length: per KDA layer it is the conv window
[3P, kernel-1] (model dtype) and the recurrent state [H, K, V] (fp32) (../shared/reference/kda.md §1.6). All KDA
layers live in one tensor each, so copying a slot (a snapshot, a restore) is one op for every layer at once:
conv [layers, slots, 3P, kernel-1], state [layers, slots, H, K, V].

Rows [0, num_slots) are live slots, one per running sequence. Rows after them hold snapshots: the state of a
sequence exactly at the end of one of its full blocks, keyed by that block's chained hash (block_manager.py). A
prefix hit on a hybrid model is only usable up to a block whose snapshot exists; the hit copies the snapshot into the
sequence's own slot (serving.md §3.3). Snapshots are evicted LRU, and dropped when their block is evicted.
For a model without KDA layers the pool holds no tensors but still hands out slot ids.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from kimi.config import ModelConfig


class StatePool:
    def __init__(self, cfg: ModelConfig, num_slots: int, num_snapshots: int, dtype: torch.dtype, device="cpu"):
        if num_slots < 1 or num_snapshots < 0:
            raise ValueError(f"num_slots = {num_slots} (expected >= 1), num_snapshots = {num_snapshots} "
                             "(expected >= 0)")
        self.kda_layers = [i for i, kind in enumerate(cfg.layer_types) if kind == "kda"]
        self.row = {layer: r for r, layer in enumerate(self.kda_layers)}
        self.num_slots, self.num_snapshots = num_slots, num_snapshots
        total = num_slots + num_snapshots
        self.conv = self.state = None
        if self.kda_layers:
            L, H, K, P = len(self.kda_layers), cfg.kda_num_heads, cfg.kda_head_dim, cfg.kda_num_heads * cfg.kda_head_dim
            self.conv = torch.zeros(L, total, 3 * P, cfg.short_conv_kernel_size - 1, dtype=dtype, device=device)
            self.state = torch.zeros(L, total, H, K, K, dtype=torch.float32, device=device)
        self.free_slots = list(range(num_slots - 1, -1, -1))  # popped from the end: lowest ids first
        self.free_snapshot_rows = list(range(total - 1, num_slots - 1, -1))
        self.snapshots: OrderedDict[int, int] = OrderedDict()  # block hash -> row, least recently used first

    @property
    def has_state(self) -> bool:
        return bool(self.kda_layers)

    @property
    def num_free(self) -> int:
        return len(self.free_slots)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self.free_slots)

    def slot_bytes(self) -> int:
        if not self.has_state:
            return 0
        return (self.conv[:, 0].numel() * self.conv.element_size() + self.state[:, 0].numel() * 4)

    def allocate(self) -> int:
        """A zeroed live slot (a fresh sequence starts from zero state)."""
        if not self.free_slots:
            raise RuntimeError("no free KDA state slot; the scheduler admits at most num_slots sequences")
        slot = self.free_slots.pop()
        if self.has_state:
            self.conv[:, slot].zero_()
            self.state[:, slot].zero_()
        return slot

    def free(self, slot: int) -> None:
        assert 0 <= slot < self.num_slots and slot not in self.free_slots, f"bad free of state slot {slot}"
        self.free_slots.append(slot)

    # ---- snapshots -----------------------------------------------------------------------------------------
    def has_snapshot(self, key: int) -> bool:
        return key in self.snapshots

    def save_snapshot(self, slot: int, key: int) -> None:
        """Copy live slot `slot` into the snapshot for `key` (evicting the least recently used if full)."""
        if not self.has_state or self.num_snapshots == 0:
            return
        if key in self.snapshots:  # the same tokens give the same state: keep the one we have
            self.snapshots.move_to_end(key)
            return
        if not self.free_snapshot_rows:
            _, row = self.snapshots.popitem(last=False)
            self.free_snapshot_rows.append(row)
        row = self.free_snapshot_rows.pop()
        self.conv[:, row] = self.conv[:, slot]
        self.state[:, row] = self.state[:, slot]
        self.snapshots[key] = row

    def load_snapshot(self, key: int, slot: int) -> None:
        row = self.snapshots[key]
        self.snapshots.move_to_end(key)
        self.conv[:, slot] = self.conv[:, row]
        self.state[:, slot] = self.state[:, row]

    def drop_snapshot(self, key: int) -> None:
        row = self.snapshots.pop(key, None)
        if row is not None:
            self.free_snapshot_rows.append(row)
