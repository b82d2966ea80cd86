"""KV memory for the serving engine: slot rows for running sequences, and a prefix block pool.

`SlotKVCache` is a `transformers.Cache`: the model's own attention layers call its `update`, so any
decoder whose attention goes through `cache.update` + an attention function that honours a 4D mask
runs unchanged. Each layer holds one tensor [2, rows, kv_heads, L, head_dim]. Running sequences own
rows 0..B-1 (kept compact: a finished sequence's row is refilled by moving the last row into it,
one copy of that sequence's tokens), and a token at position p sits at index p of its row. A step
writes its new keys with one indexed store per layer and returns the whole layer; the engine's
attention (`batched_forward.engine_attention`) reads *views* of it ([:B, :, :max_len] for the
decode rows, one row's prefix for a prompt chunk): nothing is gathered or re-copied per step, and
the per-step Python work does not grow with context. Rows shorter than `max_len` are padded; the
engine's 4D masks hide the padding. Memory is accounted as this padded rectangle (rows × longest
reservation, rounded to `seq_block`), which is exactly what is allocated, so admission control against the
budget can never lead to an out-of-memory error later.

`PrefixCache` keeps KV of prompt prefixes in fixed blocks of `block` tokens (vLLM's scheme): a
block is addressed by (parent block, its tokens), so a block stands for the whole prefix up to it
and a lookup walks a new prompt block by block. Blocks live in one preallocated pool per layer,
are evicted least-recently-used leaf first, and are copied into a new sequence's row in one
indexed copy per layer.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from transformers.cache_utils import Cache


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


class SlotKVCache(Cache):
    """Rows of KV for the running batch; see the module docstring."""

    is_compileable = False

    def __init__(
        self,
        config,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        budget_tokens: int,
        seq_block: int = 64,
        row_block: int = 8,
    ):
        # Deliberately not Cache.__init__: this cache manages its own storage, not per-layer objects.
        self.layers = []
        self.layer_class_to_replicate = None
        self.offloading = False
        self.num_layers, self.kv_heads, self.head_dim = kv_shape(config)
        self.dtype, self.device = dtype, torch.device(device)
        self.budget_tokens = budget_tokens
        self.seq_block, self.row_block = seq_block, row_block
        self.kv: list[torch.Tensor] = []
        self.capacity_rows = 0
        self.capacity_len = 0
        # Set by the engine before each forward (`plan_flat`): where each new token's key goes.
        self._view_len = 0
        self._write_rows: torch.Tensor | None = None
        self._write_pos: torch.Tensor | None = None

    # ---- accounting -------------------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.kv_heads * self.head_dim * elem

    def padded_len(self, tokens: int) -> int:
        return _round_up(max(tokens, 1), self.seq_block)

    def fits(self, rows: int, longest: int) -> bool:
        """Whether `rows` sequences, the longest reserving `longest` tokens, fit the budget."""
        return rows * self.padded_len(longest) <= self.budget_tokens

    @property
    def allocated_tokens(self) -> int:
        return self.capacity_rows * self.capacity_len

    # ---- storage ------------------------------------------------------------------------------------
    def ensure(self, rows: int, longest: int, lengths: list[int]) -> None:
        """Storage for `rows` compact rows of `longest` tokens; rows keep their first lengths[i] tokens."""
        need_len = self.padded_len(longest)
        if rows <= self.capacity_rows and need_len <= self.capacity_len:
            return
        # Regrow both dimensions to what is needed now, never keeping an old larger one: the
        # allocation then stays within the budget that admission checked.
        new_rows = max(rows, min(_round_up(rows, self.row_block), self.budget_tokens // need_len))
        new_kv = []
        for old in self.kv or [None] * self.num_layers:
            t = torch.zeros(
                (2, new_rows, self.kv_heads, need_len, self.head_dim), dtype=self.dtype, device=self.device
            )
            rows_kept = min(len(lengths), old.shape[1]) if old is not None else 0
            if rows_kept:
                keep = min(max(lengths[:rows_kept]), old.shape[3], need_len)
                t[:, :rows_kept, :, :keep] = old[:, :rows_kept, :, :keep]
            new_kv.append(t)
        self.kv = new_kv
        self.capacity_rows, self.capacity_len = new_rows, need_len

    def release(self) -> None:
        self.kv = []
        self.capacity_rows = self.capacity_len = 0

    def move_row(self, src: int, dst: int, length: int) -> None:
        for t in self.kv:
            t[:, dst, :, :length] = t[:, src, :, :length]

    def copy_row_to(self, src: int, dsts: list[int], length: int) -> None:
        if not dsts:
            return
        idx = torch.tensor(dsts, device=self.device)
        for t in self.kv:
            t[:, idx, :, :length] = t[:, src : src + 1, :, :length]

    # ---- the forward's writes ---------------------------------------------------------------------------
    def plan_flat(self, write_rows: torch.Tensor, write_pos: torch.Tensor, view_len: int) -> None:
        """The next forward is one flat [1, T] batch (`batched_forward.step_logits`): token i goes to
        (write_rows[i], write_pos[i]); `update` returns whole layers and attention slices them.
        `view_len` (highest position + 1) is what transformers asks the cache for."""
        self._write_rows, self._write_pos, self._view_len = write_rows, write_pos, view_len

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        t = self.kv[layer_idx]
        t[0][self._write_rows, :, self._write_pos] = key_states[0].transpose(0, 1).to(t.dtype)
        t[1][self._write_rows, :, self._write_pos] = value_states[0].transpose(0, 1).to(t.dtype)
        return t[0], t[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._view_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._view_len, 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.capacity_len

    def __len__(self) -> int:
        return self.num_layers


class PrefixCache:
    """Block pool of prompt-prefix KV, LRU; see the module docstring."""

    def __init__(self, config, *, dtype, device, capacity_tokens: int, block: int = 16):
        self.num_layers, self.kv_heads, self.head_dim = kv_shape(config)
        self.block = block
        self.num_blocks = capacity_tokens // block
        self.dtype, self.device = dtype, torch.device(device)
        self.pool: list[torch.Tensor] = []
        self._index: dict[tuple[int, tuple[int, ...]], int] = {}  # (parent, tokens) -> block
        self._key: list[tuple[int, tuple[int, ...]] | None] = [None] * self.num_blocks
        self._children = [0] * self.num_blocks
        self._lru: OrderedDict[int, None] = OrderedDict()  # used blocks, least recent first
        self._free = list(range(self.num_blocks - 1, -1, -1))

    @property
    def enabled(self) -> bool:
        return self.num_blocks > 0

    @property
    def used_tokens(self) -> int:
        return len(self._lru) * self.block

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block

    def _blocks_of(self, tokens: list[int]) -> list[tuple[int, ...]]:
        b = self.block
        return [tuple(tokens[i : i + b]) for i in range(0, len(tokens) - b + 1, b)]

    def _touch(self, chain: list[int]) -> None:
        # Leaf first, root last: a parent is always more recent than its children, so the LRU end
        # always holds a leaf and eviction never orphans a cached block.
        for blk in reversed(chain):
            self._lru.move_to_end(blk)

    def lookup(self, tokens: list[int]) -> list[int]:
        """Blocks holding the longest cached prefix of `tokens` (whole blocks), marked recently used."""
        if not self.enabled:
            return []
        chain, parent = [], -1
        for key in self._blocks_of(tokens):
            blk = self._index.get((parent, key))
            if blk is None:
                break
            chain.append(blk)
            parent = blk
        self._touch(chain)
        return chain

    def _allocate(self, pinned: set[int]) -> int | None:
        if self._free:
            return self._free.pop()
        for victim in self._lru:
            if victim in pinned or self._children[victim]:
                continue
            key = self._key[victim]
            del self._index[key]
            if key[0] >= 0:
                self._children[key[0]] -= 1
            self._key[victim] = None
            del self._lru[victim]
            return victim
        return None

    def _ensure_pool(self) -> None:
        if not self.pool:
            shape = (2, self.num_blocks, self.kv_heads, self.block, self.head_dim)
            # Uninitialised: only written blocks are ever read.
            self.pool = [
                torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)
            ]

    def insert(self, tokens: list[int], kv: list[torch.Tensor], row: int) -> int:
        """Cache the whole blocks of `tokens`, whose KV sits at row `row` of `kv` (SlotKVCache.kv).
        Returns the number of tokens newly stored."""
        if not self.enabled:
            return 0
        blocks = self._blocks_of(tokens)
        chain, parent, start = [], -1, 0
        for key in blocks:
            blk = self._index.get((parent, key))
            if blk is None:
                break
            chain.append(blk)
            parent = blk
            start += 1
        self._touch(chain)
        pinned = set(chain)
        new: list[int] = []
        for key in blocks[start:]:
            blk = self._allocate(pinned)
            if blk is None:
                break
            self._index[(parent, key)] = blk
            self._key[blk] = (parent, key)
            self._children[blk] = 0
            if parent >= 0:
                self._children[parent] += 1
            self._lru[blk] = None
            pinned.add(blk)
            new.append(blk)
            parent = blk
        if new:
            self._ensure_pool()
            self._touch(chain + new)
            b, lo, hi = self.block, start * self.block, (start + len(new)) * self.block
            idx = torch.tensor(new, device=self.device)
            for pool, t in zip(self.pool, kv, strict=True):
                src = t[:, row, :, lo:hi].reshape(2, self.kv_heads, len(new), b, self.head_dim)
                pool[:, idx] = src.transpose(1, 2).to(pool.dtype)
        return len(new) * self.block

    def copy_into(self, chain: list[int], n_tokens: int, kv: list[torch.Tensor], row: int) -> None:
        """Write the first `n_tokens` tokens of the prefix `chain` into row `row` of `kv`."""
        if not chain or n_tokens <= 0:
            return
        idx = torch.tensor(chain, device=self.device)
        for pool, t in zip(self.pool, kv, strict=True):
            blocks = (
                pool[:, idx].transpose(1, 2).reshape(2, self.kv_heads, len(chain) * self.block, self.head_dim)
            )
            t[:, row, :, :n_tokens] = blocks[:, :, :n_tokens]
