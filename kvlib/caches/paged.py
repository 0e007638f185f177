"""Paged KV cache: a pool of fixed-size blocks, one block table per sequence, blocks allocated on demand and
freed when a sequence finishes (the memory manager of vLLM's PagedAttention, in plain PyTorch).

Memory: a sequence holds ceil(tokens / block_size) blocks, so at most block_size - 1 of its slots are reserved
but empty, whatever the mix of lengths in the batch; a contiguous cache reserves max_len slots for every row.
`nbytes()` is the whole pool (what the engine set aside), `allocated_bytes()` the blocks the sequences hold, and
`used_bytes()` the slots holding real tokens; the waste vLLM reports is 1 - used / allocated.

Attention: PyTorch has no paged-attention kernel, so each update gathers a layer's blocks into a contiguous
(B, nkv, S, hd) tensor (one index_select). vLLM's kernel reads the blocks in place; the gather is an O(S) copy
per layer and step, like the growing cache's torch.cat, and decode latency includes it.

Left padding: with `attention_mask` (the prompts' (B, P) mask) among the options, each row's pad slots map to a
scratch block (block 0, never handed out) instead of getting blocks of their own, so a short prompt costs only its
real tokens. Attention never uses pad slots (they are masked), so the tokens are unchanged. Without the mask,
pad slots are stored like any other.

Prefix sharing: blocks are reference counted. `fork` turns a one-sequence cache (a prefilled prefix) into a batch
whose block tables all point at the same blocks; a write into a shared block copies it first (copy-on-write).
"""

from __future__ import annotations

import math

import torch

from kvlib.caches.base import CacheOverflowError, KVCache, register_layout
from kvlib.core import checks
from kvlib.core.config import ModelConfig
from kvlib.core.errors import KvlibError

SCRATCH_BLOCK = 0  # pad slots and released rows read and write here; it is never allocated to a sequence


class BlockPool:
    """`num_blocks` blocks of `block_size` token slots (plus the scratch block), for every layer at once: a block id
    names the same slots in every layer's pool, so one block table serves the whole model."""

    def __init__(
        self, cfg: ModelConfig, num_blocks: int, block_size: int, device: torch.device | str, dtype: torch.dtype
    ) -> None:
        num_blocks = checks.whole("num_blocks", num_blocks, where="paged cache:")
        block_size = checks.whole("block_size", block_size, where="paged cache:")
        self.cfg, self.num_blocks, self.block_size = cfg, num_blocks, block_size
        shape = (cfg.n_layer, (num_blocks + 1) * block_size, cfg.n_kv_head, cfg.head_dim)  # (L, slots, nkv, hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.refcount = [0] * (num_blocks + 1)
        self.free_blocks = list(range(num_blocks, SCRATCH_BLOCK, -1))  # pop() hands out 1, 2, 3, ...

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block: K and V, every layer."""
        c = self.cfg
        return 2 * c.n_layer * self.block_size * c.n_kv_head * c.head_dim * self.k.element_size()

    def allocate(self) -> int:
        if not self.free_blocks:
            raise CacheOverflowError(f"paged cache: all {self.num_blocks} blocks of the pool are in use")
        block = self.free_blocks.pop()
        self.refcount[block] = 1
        return block

    def share(self, block: int) -> None:
        if self.refcount[block] < 1:
            raise KvlibError(f"paged cache: block {block} is free and cannot be shared")
        self.refcount[block] += 1

    def release(self, block: int) -> None:
        """Drop one reference; the block returns to the free list with its last one."""
        if block == SCRATCH_BLOCK or self.refcount[block] < 1:
            raise KvlibError(f"paged cache: block {block} released but not allocated (double free)")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self.free_blocks.append(block)

    def copy_block(self, src: int, dst: int) -> None:
        bs = self.block_size
        self.k[:, dst * bs : (dst + 1) * bs] = self.k[:, src * bs : (src + 1) * bs]
        self.v[:, dst * bs : (dst + 1) * bs] = self.v[:, src * bs : (src + 1) * bs]


@register_layout
class PagedCache(KVCache):
    """Options: block_size (16), num_blocks (default: enough for every row at max_len), attention_mask (map left
    padding out), pool (a BlockPool to share with other caches)."""

    name = "paged"
    step_overhead = "gathering its blocks"
    colour = "#029e73"

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        block_size: int = 16,
        num_blocks: int | None = None,
        attention_mask: torch.Tensor | None = None,
        pool: BlockPool | None = None,
    ) -> None:
        super().__init__(cfg, batch_size, max_len, device, dtype)
        block_size = checks.whole("block_size", block_size, where="paged cache:")
        num_blocks = checks.optional_whole("num_blocks", num_blocks, where="paged cache:")
        if pool is not None and not isinstance(pool, BlockPool):
            raise checks.fail("pool", pool, "None or a BlockPool", "paged cache:")
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            raise checks.fail("attention_mask", attention_mask, "None or a (batch, prompt_len) tensor", "paged cache:")
        if pool is None:
            blocks = num_blocks if num_blocks is not None else batch_size * math.ceil(max_len / block_size)
            pool = BlockPool(cfg, blocks, block_size, device, dtype)
        self.pool = pool
        self.block_size = pool.block_size
        self.pad = self._pad_lengths(attention_mask)  # left-pad slots per row, stored nowhere
        self.tables: list[list[int]] = [[] for _ in range(batch_size)]
        self.active = [True] * batch_size
        self.reserved_end = 0  # slots [0, reserved_end) of every active row have a home
        # Physical slot (block * block_size + offset) of every logical slot; 0 (in the scratch block) until mapped.
        self.slot_map = torch.zeros(batch_size, max_len, dtype=torch.long, device=self.device)  # (B, S_max)

    def _pad_lengths(self, attention_mask: torch.Tensor | None) -> list[int]:
        if attention_mask is None:
            return [0] * self.batch_size
        if attention_mask.dim() != 2 or attention_mask.shape[0] != self.batch_size:
            raise KvlibError(
                f"paged cache: attention_mask must be (batch={self.batch_size}, prompt_len), "
                f"got {tuple(attention_mask.shape)}"
            )
        valid = attention_mask.to(torch.long)
        if bool((valid[:, 1:] < valid[:, :-1]).any()) or bool((valid[:, -1] == 0).any()):
            raise KvlibError("paged cache: attention_mask must be left padding (0s then 1s, at least one 1 per row)")
        return [int(n) for n in (valid == 0).sum(dim=1).tolist()]

    # -- allocation ---------------------------------------------------------------------------------------------

    def _map_block(self, row: int, index: int, block: int) -> None:
        """Point the logical slots of the row's `index`-th block at physical block `block`."""
        bs = self.block_size
        lo = self.pad[row] + index * bs
        hi = min(lo + bs, self.max_len)
        self.slot_map[row, lo:hi] = torch.arange(block * bs, block * bs + hi - lo, device=self.device)

    def _reserve(self, start: int, end: int) -> None:
        """Give every active row blocks for slots [start, end): new blocks past its table, private copies of shared
        blocks it is about to write into (copy-on-write). Blocks serve all layers, so this runs once per slot range."""
        bs = self.block_size
        for row in range(self.batch_size):
            if not self.active[row]:
                continue
            first, last = max(start - self.pad[row], 0), end - self.pad[row]  # real-token indices written
            if last <= 0:
                continue  # only padding so far
            table = self.tables[row]
            for index in range(first // bs, min(len(table), math.ceil(last / bs))):
                if self.pool.refcount[table[index]] > 1:  # shared with another sequence: copy before writing
                    private = self.pool.allocate()
                    self.pool.copy_block(table[index], private)
                    self.pool.release(table[index])
                    table[index] = private
                    self._map_block(row, index, private)
            while len(table) * bs < last:
                table.append(self.pool.allocate())
                self._map_block(row, len(table) - 1, table[-1])
        self.reserved_end = end

    @torch.inference_mode()  # the slot map may have been made under inference mode (by generate)
    def release(self, row: int) -> None:
        """A sequence finished: its blocks go back to the pool; later writes of the row go to the scratch block."""
        checks.whole("row", row, minimum=0, maximum=self.batch_size - 1, where="paged cache: release:")
        if not self.active[row]:
            return
        for block in self.tables[row]:
            self.pool.release(block)
        self.tables[row] = []
        self.active[row] = False
        self.slot_map[row] = SCRATCH_BLOCK * self.block_size

    def release_all(self) -> None:
        for row in range(self.batch_size):
            self.release(row)

    @torch.inference_mode()
    def fork(self, batch_size: int, max_len: int) -> PagedCache:
        """A cache of `batch_size` sequences that all start with this one-sequence cache's tokens, sharing its
        blocks (each gains a reference per sequence); they continue at slot `seq_len`, copying on write."""
        batch_size = checks.whole("batch_size", batch_size, where="paged cache: fork:")
        max_len = checks.whole("max_len", max_len, where="paged cache: fork:")
        if self.batch_size != 1 or self.pad[0]:
            raise KvlibError("paged cache: only an unpadded one-sequence cache can be forked")
        if len(set(self.lengths)) != 1 or max_len < self.seq_len:
            raise KvlibError(f"paged cache: cannot fork {self.lengths} written slots into max_len {max_len}")
        child = PagedCache(self.cfg, batch_size, max_len, self.device, self.dtype, pool=self.pool)
        n = self.seq_len
        for row in range(batch_size):
            child.tables[row] = list(self.tables[0])
            for index, block in enumerate(self.tables[0]):
                self.pool.share(block)
                # Mapped from the table, not copied from this cache's slot map, which ends at its own max_len:
                # the slots of a partly filled last block beyond it must point at that block too.
                child._map_block(row, index, block)
        child.lengths = [n] * self.cfg.n_layer
        child.reserved_end = n
        return child

    # -- the cache interface ------------------------------------------------------------------------------------

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._check_write(layer, k, start, capacity=self.max_len)
        if end > self.reserved_end:  # the first layer to reach new slots allocates for all layers
            self._reserve(start, end)
        B, nkv, T, hd = k.shape
        slots = self.slot_map[:, start:end].reshape(-1)  # (B*T,)
        # Pad slots and released rows all land in the scratch block; what ends up there is never attended to.
        self.pool.k[layer].index_copy_(0, slots, k.transpose(1, 2).reshape(B * T, nkv, hd))
        self.pool.v[layer].index_copy_(0, slots, v.transpose(1, 2).reshape(B * T, nkv, hd))
        return self._gather(layer, end)

    def _gather(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, c = self.batch_size, self.cfg
        idx = self.slot_map[:, :end].reshape(-1)  # (B*S,)
        k = self.pool.k[layer].index_select(0, idx).view(B, end, c.n_kv_head, c.head_dim).transpose(1, 2)
        v = self.pool.v[layer].index_select(0, idx).view(B, end, c.n_kv_head, c.head_dim).transpose(1, 2)
        return k, v  # (B, nkv, S, hd)

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._gather(layer, self.lengths[layer])

    def tensors(self) -> list[torch.Tensor]:
        return [self.pool.k, self.pool.v]

    # -- accounting ---------------------------------------------------------------------------------------------

    def held_blocks(self) -> set[int]:
        """Distinct blocks this cache's sequences hold (a block shared by several rows counts once)."""
        return {block for table in self.tables for block in table}

    def allocated_bytes(self) -> int:
        """Bytes of the blocks the sequences hold: what paging reserves for them."""
        return len(self.held_blocks()) * self.pool.block_bytes

    def real_tokens(self) -> list[int]:
        """Real (non-pad) tokens stored per row; 0 for released rows."""
        n = self.seq_len
        return [max(n - p, 0) if a else 0 for p, a in zip(self.pad, self.active, strict=True)]

    def used_bytes(self) -> int:
        """Bytes of the distinct slots holding real tokens (a shared prefix counts once)."""
        rows = [self.slot_map[r, self.pad[r] : self.seq_len] for r in range(self.batch_size) if self.active[r]]
        if not rows:
            return 0
        slots = int(torch.unique(torch.cat(rows)).numel())
        return slots * self.pool.block_bytes // self.block_size
