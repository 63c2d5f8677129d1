"""The slot cache: fixed-capacity KV storage for a fixed pool of sequences.

Every sequence owns one row b of every tensor. Its KV lives in C slots (C = m + R + 1 for a bounded
policy: m kept between steps, plus room for the R rebuilt tokens and the current one), the same
token set in every layer, so one slot index per sequence addresses all layers. A slot is empty when
its position is -1; releasing a token only marks its slot empty (no data moves). Slot C is a trash
slot that padded query rows write into; it is never attended.

Per-position state (token ids, controller features, released flags) is indexed by absolute position,
so the released list costs no bookkeeping: a token's entry is written once, when it arrives.

Active sequences are kept packed in rows [0, n_active): when one leaves, the last one moves into its
row (`move`), so decode runs on views `[:n_active]` without gathers.
"""

from __future__ import annotations

import torch


class SlotCache:
    def __init__(self, *, layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 max_positions: int, feat_dim: int = 0, ctrl_dim: int = 0,
                 dtype=torch.float32, device="cpu") -> None:
        self.capacity, self.batch, self.max_positions = capacity, batch, max_positions
        shape = (layers, batch, kv_heads, self.slots_allocated(capacity), head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # per slot
        self.pos = torch.full((batch, shape[3]), -1, dtype=torch.long, device=device)
        self.mass = torch.zeros(batch, shape[3], dtype=torch.float32, device=device)
        # per absolute position
        self.tok_at = torch.zeros(batch, max_positions, dtype=torch.long, device=device)
        self.released = torch.zeros(batch, max_positions, dtype=torch.bool, device=device)
        self.feat_at = torch.zeros(batch, max_positions, feat_dim, device=device) if feat_dim else None
        # per sequence: the controller's recurrent state
        self.ctrl_h = torch.zeros(batch, ctrl_dim, device=device) if ctrl_dim else None

    @staticmethod
    def slots_allocated(capacity: int) -> int:
        """KV slots one sequence's row holds: `capacity` (Policy.capacity) plus the trash slot."""
        return capacity + 1

    @property
    def trash(self) -> int:
        return self.capacity

    def kv_bytes_per_sequence(self) -> int:
        """Bytes of K and V storage one sequence owns (fixed, whatever the generation length)."""
        return 2 * self.k[:, 0].numel() * self.k.element_size()

    def valid(self, n: int) -> torch.Tensor:
        """[n, C] bool: occupied slots of the first n rows (the trash slot excluded)."""
        return self.pos[:n, : self.capacity] >= 0

    def used_slots(self, n: int) -> int:
        """1 + the highest occupied slot over the first n rows: attention reads slots [0, used)."""
        occ = self.valid(n).any(0).nonzero()
        return int(occ[-1]) + 1 if len(occ) else 1

    def free_slots(self, n: int, rows: int) -> torch.Tensor:
        """[n, rows] the lowest-numbered empty slots of each of the first n rows."""
        occupied = self.valid(n).to(torch.int8)
        return torch.sort(occupied, dim=1, stable=True).indices[:, :rows]

    def write_kv(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots [n, R] (trash for padded rows); k, v [n, Hkv, R, D] -> stored in layer `layer`."""
        n = slots.shape[0]
        b = torch.arange(n, device=slots.device)[:, None]
        self.k[layer][b, :, slots] = k.transpose(1, 2).to(self.k.dtype)
        self.v[layer][b, :, slots] = v.transpose(1, 2).to(self.v.dtype)

    def clear(self, b: int) -> None:
        self.pos[b] = -1
        self.mass[b] = 0
        self.released[b] = False
        if self.ctrl_h is not None:
            self.ctrl_h[b] = 0

    def move(self, src: int, dst: int) -> None:
        """Row src -> row dst (compaction of the active rows when a sequence leaves)."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
        for t in (self.pos, self.mass, self.tok_at, self.released, self.feat_at, self.ctrl_h):
            if t is not None:
                t[dst] = t[src]
        self.clear(src)
