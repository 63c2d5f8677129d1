"""The slot cache: fixed-capacity KV storage for a fixed pool of sequences.

Every sequence owns one row b of every tensor. Its KV lives in C slots (C = m + R + 1 for a bounded
policy: m kept between steps, plus room for the R rebuilt tokens and the current one), the same
token set in every layer, so one slot index per sequence addresses all layers. A slot is empty when
its position is -1; releasing a token only marks its slot empty (no data moves). Slot C is a trash
slot that padded query rows write into; it is never attended.

Per-position state (token ids, controller features, released flags) is indexed by absolute position,
so the released list costs no bookkeeping: a token's entry is written once, when it arrives.

A second tier (store_size > 0) keeps released tokens' K/V, all layers, in `store_size` more slots
per sequence (`release` puts them there, `restore` brings them back), so a token that comes back has exactly the
K/V it left with. When a row's store is full, the lowest-scored stored tokens make room.

Active sequences are kept packed in rows [0, n_active): when one leaves, the last one moves into its
row (`move`), so decode runs on views `[:n_active]` without gathers.
"""

from __future__ import annotations

import torch

from .kernels import copy_tokens


class SlotCache:
    def __init__(self, *, layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 max_positions: int, feat_dim: int = 0, ctrl_dim: int = 0, store_size: int = 0,
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
        # (one more column, never read: where fixed-shape updates send their padded entries)
        self.released = torch.zeros(batch, max_positions + 1, dtype=torch.bool, device=device)
        self.feat_at = torch.zeros(batch, max_positions, feat_dim, device=device) if feat_dim else None
        # per sequence: the controller's recurrent state
        self.ctrl_h = torch.zeros(batch, ctrl_dim, device=device) if ctrl_dim else None
        # the second tier: released tokens' K/V [L, B, Hkv, S + 1, D] (slot S is its trash slot) and
        # their positions [B, S + 1] (-1: empty)
        self.store_size = store_size
        # Bounds the engine keeps on the host, so that a step needs no device sync to find them:
        # 1 + the highest position of any active row this step (None: found from the tensors), and
        # at least 1 + the highest occupied store slot of any active row (from the previous step's
        # count, which crosses with the tokens, raised by the prompts placed since; None: unknown)
        self.pos_bound: int | None = None
        self.store_bound: int | None = None
        if store_size:
            sshape = (layers, batch, kv_heads, store_size + 1, head_dim)
            self.store_k = torch.zeros(sshape, dtype=dtype, device=device)
            self.store_v = torch.zeros(sshape, dtype=dtype, device=device)
            self.store_pos = torch.full((batch, store_size + 1), -1, dtype=torch.long, device=device)
        else:
            self.store_k = self.store_v = self.store_pos = None

    @staticmethod
    def slots_allocated(capacity: int) -> int:
        """KV slots one sequence's row holds: `capacity` (Policy.capacity) plus the trash slot."""
        return capacity + 1

    @property
    def trash(self) -> int:
        return self.capacity

    def kv_bytes_per_sequence(self) -> int:
        """Bytes of K and V storage one sequence owns, its second tier included (fixed, whatever the
        generation length)."""
        tiers = [t for t in (self.k, self.store_k) if t is not None]
        return sum(2 * t[:, 0].numel() * t.element_size() for t in tiers)

    def valid(self, n: int) -> torch.Tensor:
        """[n, C] bool: occupied slots of the first n rows (the trash slot excluded)."""
        return self.pos[:n, : self.capacity] >= 0

    def used_slots(self, n: int) -> int:
        """1 + the highest occupied slot over the first n rows: attention reads slots [0, used)."""
        return int(_used(self.valid(n)))

    def used_both(self, n: int) -> tuple[int, int]:
        """used_slots(n) and the same for the second tier (store_put fills the lowest free store slots
        first, so a store read [0, used) sees every stored token and little else), in one transfer."""
        if self.store_pos is None:
            return self.used_slots(n), 0
        a, b = torch.stack([_used(self.valid(n)), _used(self.stored(n))]).tolist()
        return a, b

    def read_widths(self, n: int) -> tuple[int, int]:
        """How many cache slots and store slots of the first n rows a scorer reads: on a GPU the whole
        allocation of the cache and the store up to `store_bound` (finding the occupied prefixes,
        `used_both`, is a device sync; the scorer kernel does not load an empty slot's key), elsewhere
        the occupied prefixes (no sync to pay there)."""
        if self.k.device.type == "cuda":
            bound = self.store_size if self.store_bound is None else self.store_bound
            return self.capacity, min(self.store_size, bound)
        return self.used_both(n)

    def store_used(self, n: int) -> torch.Tensor:
        """1 + the highest occupied store slot of the first n rows (a 0-d device tensor; 1 with none)."""
        return _used(self.stored(n))

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

    def stored(self, n: int) -> torch.Tensor:
        """[n, S] bool: occupied store slots of the first n rows (trash excluded)."""
        return self.store_pos[:n, : self.store_size] >= 0

    def release(self, drop: torch.Tensor, pos_scores: torch.Tensor | None, most: int) -> torch.Tensor:
        """Release the slots drop [n, C] marks in the first n rows: their K/V go to the second tier (if
        any), their positions are flagged released, the slots become empty. Returns the number released
        (a 0-d device tensor). pos_scores [n, P] rank the stored tokens (None: by age).

        Fixed shapes, no device sync: `most` bounds what a row releases in one call (C - m after a
        decode step: a row holds at most C slots and keeps m), so the dropped slots are taken as
        [n, most] columns, the padding sent to the trash slots."""
        n = drop.shape[0]
        width = max(1, min(most, drop.shape[1]))
        order = drop.to(torch.int8).sort(dim=1, descending=True, stable=True).indices[:, :width]  # [n, W]
        ok = drop.gather(1, order)  # dropped slots first in each row
        slots = torch.where(ok, order, self.trash)
        positions = self.pos[:n].gather(1, slots)  # -1 at the trash slot
        if self.store_k is not None:
            rows = torch.arange(n, device=drop.device).repeat_interleave(width)
            self.store_from(self.k, self.v, rows, slots.flatten(), rows, positions.flatten(), pos_scores,
                            ok.flatten())
        # padding goes to the spare column, with False: it stays False
        self.released[:n].scatter_(1, torch.where(ok, positions, self.max_positions), ok)
        self.pos[:n].scatter_(1, slots, -1)
        self.mass[:n].scatter_(1, slots, 0.0)
        return ok.sum()

    def store_from(self, src_k: torch.Tensor, src_v: torch.Tensor, src_b: torch.Tensor, src_s: torch.Tensor,
                   rows: torch.Tensor, positions: torch.Tensor, pos_scores: torch.Tensor | None,
                   ok: torch.Tensor | None = None) -> None:
        """Put J tokens into the stores of rows [J] (sorted): token j is src_k/src_v[:, src_b[j], :, src_s[j]]
        (src [L, B', Hkv, S', D]: the cache itself on release, a prompt's K/V at its cut) at position
        positions[j]; the slots as in `_store_slots`. ok [J]: which entries are tokens (None: all; the
        others must come after a row's tokens). No device sync: tokens that find no room, and entries
        that are not tokens, are written to the trash slot, which is never read."""
        kept, dst = self._store_slots(rows, pos_scores)
        if ok is not None:
            kept, dst = kept & ok, torch.where(ok, dst, self.store_size)
        copy_tokens(src_k, src_b, src_s, self.store_k, rows, dst)  # straight across, no temporary
        copy_tokens(src_v, src_b, src_s, self.store_v, rows, dst)
        self.store_pos[rows, dst] = torch.where(kept, positions, -1)

    def _store_slots(self, rows: torch.Tensor, pos_scores: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Where J tokens of rows [J] (sorted) go in the stores: which of them are kept [J] bool, and the
        store slot of each [J] (the trash slot for those not kept). A row's free store slots are used
        first (the lowest-numbered first), then its lowest-scored stored tokens (pos_scores [rows, P];
        None: the oldest) are dropped for good; a row putting more tokens than its store holds keeps
        the first store_size."""
        # rows (like pos_scores) cover the first n rows; rows.numel() bounds what one row puts (both
        # known on the host: no device sync)
        n = pos_scores.shape[0] if pos_scores is not None else self.store_pos.shape[0]
        rank = torch.arange(rows.numel(), device=rows.device) - torch.searchsorted(rows, rows)  # 0, 1, .. per row
        sp = self.store_pos[:n, : self.store_size]
        prio = sp.double() if pos_scores is None else pos_scores[:n].gather(1, sp.clamp(min=0)).double()
        prio = prio.masked_fill(sp < 0, float("-inf"))  # empty slots first, the lowest-numbered first
        take = min(rows.numel(), self.store_size)
        dst_of = prio.sort(dim=1, stable=True).indices[:, :take]  # [n, take] the slots to (over)write
        ok = rank < take
        return ok, torch.where(ok, dst_of[rows, rank.clamp(max=take - 1)], self.store_size)

    def put(self, src_k: torch.Tensor, src_v: torch.Tensor, src_b: torch.Tensor, src_s: torch.Tensor,
            rows: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> None:
        """Write J tokens into cache slots (rows[j], slots[j]) [J]: token j is src_k/src_v[:, src_b[j], :,
        src_s[j]] (src [L, B', Hkv, S', D]: the second tier on re-admission, a prompt's K/V at its
        placement) at position positions[j]."""
        copy_tokens(src_k, src_b, src_s, self.k, rows, slots)
        copy_tokens(src_v, src_b, src_s, self.v, rows, slots)
        self.pos[rows, slots] = positions

    def restore(self, positions: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """Move the stored tokens at positions [n, r] of the first n rows where ok [n, r] back into free
        cache slots, exactly the K/V they were stashed with; their store slots become free. Returns the
        number restored (a 0-d device tensor). Fixed shapes, no device sync: the entries that are not
        ok copy into the trash slots.

        A row holds at most m + 1 tokens after the layers of a step (C - m - 1 = R free slots), so the
        r <= R tokens it gets back always find room."""
        n, r = positions.shape
        if r == 0:
            return positions.new_zeros(())
        slots = torch.where(ok, self.free_slots(n, r), self.trash)  # [n, r]
        found = self.store_pos[:n, None, : self.store_size] == positions[:, :, None]  # [n, r, S]
        src = torch.where(ok, found.to(torch.int8).argmax(2), self.store_size)  # [n, r]
        rows = torch.arange(n, device=positions.device).repeat_interleave(r)
        self.put(self.store_k, self.store_v, rows, src.flatten(), rows, slots.flatten(),
                 torch.where(ok, positions, -1).flatten())
        self.mass[:n].scatter_(1, slots, 0.0)
        self.store_pos[:n].scatter_(1, src, -1)
        return ok.sum()

    def clear(self, b: int | slice) -> None:
        self.pos[b] = -1
        self.mass[b] = 0
        self.released[b] = False
        if self.ctrl_h is not None:
            self.ctrl_h[b] = 0
        if self.store_pos is not None:
            self.store_pos[b] = -1

    def move(self, src: int, dst: int) -> None:
        """Row src -> row dst (compaction of the active rows when a sequence leaves)."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
        if self.store_k is not None:
            self.store_k[:, dst] = self.store_k[:, src]
            self.store_v[:, dst] = self.store_v[:, src]
        for t in (self.pos, self.mass, self.tok_at, self.released, self.feat_at, self.ctrl_h, self.store_pos):
            if t is not None:
                t[dst] = t[src]
        self.clear(src)


def _used(occupied: torch.Tensor) -> torch.Tensor:
    """occupied [n, S] bool -> 1 + the highest column occupied in any row (1 when none is), a 0-d
    tensor on the device (the caller moves it to the host once)."""
    cols = torch.arange(1, occupied.shape[1] + 1, device=occupied.device)
    return (occupied.any(0) * cols).max().clamp(min=1)
