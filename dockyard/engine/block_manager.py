"""Block manager: the KV cache as a pool of fixed-size blocks, with prefix caching.

Each sequence holds a block table. Blocks are reference-counted. Once a block is full its
contents are fixed, so it gets a hash of (parent block's hash, its token ids); a later sequence
whose prompt starts with the same tokens reuses those blocks instead of recomputing them
(**prefix caching**). A block whose last user is gone keeps its hash and stays reusable until
the pool needs it: free blocks are handed out least recently freed first (LRU eviction).
"""

from __future__ import annotations

from collections import OrderedDict

from dockyard.engine.sequence import Sequence


def block_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    """Hash of a full block: depends on every token before it through ``parent``."""
    return hash((parent, token_ids))


class BlockManager:
    """Hands out KV blocks to sequences, shares full blocks by content, takes them back."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        # Free blocks in LRU order (first = evicted first); a free block may still hold cached content.
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, tuple[int, tuple[int, ...]]] = {}  # hash -> (block, tokens)
        self.block_hash: dict[int, int] = {}  # block -> its hash, for cached blocks
        self.prefix_queries = 0  # prompt tokens looked up in the cache
        self.prefix_hits = 0  # of which found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    # ---- prefix cache ----
    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the leading full blocks of ``seq`` (at least one token left to compute).

        A sequence computing prompt logprobs needs the logits of every prompt row it has no logprobs
        for yet, so it reuses only blocks whose rows it already has (none on its first run).
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        tokens = seq.token_ids
        limit = len(tokens) - 1
        if seq.max_cached_prefix is not None:
            limit = min(limit, seq.max_cached_prefix)
        blocks: list[int] = []
        parent = None
        for i in range(limit // bs):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = block_hash(parent, chunk)
            hit = self.cached.get(h)
            if hit is None or hit[1] != chunk:
                break
            blocks.append(hit[0])
            parent = h
        return blocks

    def seal_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks of ``seq`` that became full (their KV is computed, their tokens known) in
        the cache; call after its computed length or its known tokens grew."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        # Only blocks whose tokens are all known: a pending token's block is sealed once it arrives.
        for i in range(len(seq.block_hashes), min(seq.num_computed_tokens, seq.num_known_tokens) // bs):
            chunk = tuple(seq.tokens(i * bs, (i + 1) * bs))
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = block_hash(parent, chunk)
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.cached and block not in self.block_hash:
                self.cached[h] = (block, chunk)
                self.block_hash[block] = h

    # ---- allocation ----
    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether ``seq`` can grow to hold ``num_tokens`` tokens."""
        return self._blocks_for(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow ``seq``'s block table to hold ``num_tokens`` tokens (caller checked can_allocate)."""
        for _ in range(self._blocks_for(num_tokens) - len(seq.block_table)):
            block, _ = self.free_blocks.popitem(last=False)
            old = self.block_hash.pop(block, None)  # evict whatever it cached
            if old is not None:
                del self.cached[old]
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def allocate_prompt(self, seq: Sequence, max_new_tokens: int) -> int | None:
        """Start ``seq`` (no blocks yet): reuse cached prefix blocks, then allocate for up to
        ``max_new_tokens`` more tokens. Returns the number of tokens to compute, or None if the
        blocks are not there (nothing is changed then)."""
        hits = self._match_prefix(seq)
        computed = len(hits) * self.block_size
        n = min(len(seq) - computed, max_new_tokens)
        reusable_free = sum(1 for b in hits if self.ref_counts[b] == 0)
        if self._blocks_for(computed + n) - len(hits) > self.num_free_blocks - reusable_free:
            return None
        self.prefix_queries += len(seq.prompt_token_ids)
        self.prefix_hits += computed
        for block in hits:
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
        seq.block_hashes = [self.block_hash[b] for b in hits]
        seq.num_computed_tokens = computed
        self.allocate(seq, computed + n)
        return n

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the blocks of ``seq`` past the first ``num_tokens`` tokens (speculative rows that were
        rejected); never a sealed block, since only computed, known tokens are sealed."""
        keep = self._blocks_for(num_tokens)
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None

    def free(self, seq: Sequence) -> None:
        """Release every block of ``seq``; cached content stays reusable until evicted."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        seq.block_table.clear()
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
