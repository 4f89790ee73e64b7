//! Paged-KV block pool: reference counts, per-sequence block tables (owned by the sequences),
//! and the prefix cache: full blocks are keyed by a chained hash of their token ids, and a
//! freed block keeps its hash and content until it is handed out again, so a later prompt
//! with the same prefix revives it instead of recomputing it.

use std::hash::{BuildHasher, Hasher};

/// Sentinel for "no neighbour" in the intrusive free list.
const NIL: u32 = u32::MAX;

/// Fixed seeds: hashes must be stable across runs so results are reproducible.
fn hasher_state() -> ahash::RandomState {
    ahash::RandomState::with_seeds(
        0x243f_6a88_85a3_08d3,
        0x1319_8a2e_0370_7344,
        0xa409_3822_299f_31d0,
        0x082e_fa98_ec4e_6c89,
    )
}

/// hash(parent_hash, tokens of the block): a block's key depends on everything before it,
/// so equal keys mean equal prefixes (content is compared on a hit as well, see `lookup`).
pub fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = hasher_state().build_hasher();
    h.write_u64(parent);
    for &t in tokens {
        h.write_u32(t);
    }
    // 0 marks "no hash" in `BlockManager::hash`; remap the (astronomically rare) real 0.
    h.finish().max(1)
}

/// Extends `hashes` (the chained hashes of `tokens`' leading full blocks) to `num_blocks`.
pub fn extend_hashes(hashes: &mut Vec<u64>, tokens: &[u32], num_blocks: usize, block_size: usize) {
    while hashes.len() < num_blocks {
        let i = hashes.len();
        let parent = if i == 0 { 0 } else { hashes[i - 1] };
        hashes.push(chain_hash(parent, &tokens[i * block_size..(i + 1) * block_size]));
    }
}

/// A prompt's cached prefix (`BlockManager::match_prefix`): its blocks in order, the tokens
/// they hold, and how many of them sit on the free list (taking them shrinks it).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PrefixHit {
    pub blocks: Vec<u32>,
    pub num_cached_tokens: usize,
    pub num_free: usize,
}

pub struct BlockManager {
    pub block_size: usize,
    /// log2(block_size): positions map to blocks by shifts (a division costs ~40 cycles, and
    /// a 1,024-sequence step does several per sequence).
    pub block_shift: u32,
    ref_count: Vec<u32>,
    /// Prefix-cache key of a full, computed block; 0 = none.
    hash: Vec<u64>,
    /// Token ids of each hashed block (flat, block_size per block): a hit is verified
    /// against them so a hash collision can never serve another prompt's KV.
    content: Vec<u32>,
    cached: ahash::AHashMap<u64, u32>,
    // Free blocks form an intrusive doubly linked list: allocation takes the head (least
    // recently freed), freeing appends to the tail, and a cache hit on a free block
    // unlinks it in O(1).
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    num_free: usize,
    pub enable_prefix_caching: bool,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize, enable_prefix_caching: bool) -> Self {
        assert!(num_blocks > 0 && num_blocks < NIL as usize && block_size.is_power_of_two());
        let n = num_blocks as u32;
        let prev = (0..n).map(|i| if i == 0 { NIL } else { i - 1 }).collect();
        let next = (0..n).map(|i| if i + 1 == n { NIL } else { i + 1 }).collect();
        BlockManager {
            block_size,
            block_shift: block_size.trailing_zeros(),
            ref_count: vec![0; num_blocks],
            hash: vec![0; num_blocks],
            content: vec![0; if enable_prefix_caching { num_blocks * block_size } else { 0 }],
            cached: ahash::AHashMap::default(),
            prev,
            next,
            head: 0,
            tail: n - 1,
            num_free: num_blocks,
            enable_prefix_caching,
        }
    }

    #[inline]
    pub fn num_total_blocks(&self) -> usize {
        self.ref_count.len()
    }
    #[inline]
    pub fn num_free_blocks(&self) -> usize {
        self.num_free
    }
    #[inline]
    pub fn ref_count(&self, block: u32) -> u32 {
        self.ref_count[block as usize]
    }
    #[inline]
    pub fn block_hash(&self, block: u32) -> u64 {
        self.hash[block as usize]
    }
    pub fn block_content(&self, block: u32) -> &[u32] {
        let b = block as usize * self.block_size;
        &self.content[b..b + self.block_size]
    }
    #[inline]
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        (num_tokens + self.block_size - 1) >> self.block_shift
    }

    fn unlink(&mut self, b: u32) {
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        if p == NIL {
            self.head = n
        } else {
            self.next[p as usize] = n
        }
        if n == NIL {
            self.tail = p
        } else {
            self.prev[n as usize] = p
        }
        self.prev[b as usize] = NIL;
        self.next[b as usize] = NIL;
        self.num_free -= 1;
    }

    fn push_tail(&mut self, b: u32) {
        self.prev[b as usize] = self.tail;
        self.next[b as usize] = NIL;
        if self.tail == NIL {
            self.head = b
        } else {
            self.next[self.tail as usize] = b
        }
        self.tail = b;
        self.num_free += 1;
    }

    fn push_head(&mut self, b: u32) {
        self.next[b as usize] = self.head;
        self.prev[b as usize] = NIL;
        if self.head == NIL {
            self.tail = b
        } else {
            self.prev[self.head as usize] = b
        }
        self.head = b;
        self.num_free += 1;
    }

    /// The cached block holding exactly `tokens` under `hash`, if any (free or in use).
    pub fn lookup(&self, hash: u64, tokens: &[u32]) -> Option<u32> {
        let &b = self.cached.get(&hash)?;
        (self.block_content(b) == tokens).then_some(b)
    }

    /// The longest run of `tokens`' leading full blocks (at most `max_blocks`) the cache
    /// holds. `hashes` are the sequence's chained block hashes, extended as far as the probe
    /// reads (they are kept: the same blocks are registered under them once computed).
    pub fn match_prefix(&self, tokens: &[u32], hashes: &mut Vec<u64>, max_blocks: usize) -> PrefixHit {
        let bs = self.block_size;
        let mut hit = PrefixHit::default();
        for j in 0..max_blocks {
            extend_hashes(hashes, tokens, j + 1, bs);
            match self.lookup(hashes[j], &tokens[j * bs..(j + 1) * bs]) {
                Some(b) => hit.blocks.push(b),
                None => break,
            }
        }
        hit.num_cached_tokens = hit.blocks.len() * bs;
        hit.num_free = self.free_among(&hit.blocks);
        hit
    }

    /// Takes a reference on each block of `hit` and appends them to `table` (which holds
    /// nothing yet: a prefix starts the table).
    pub fn acquire_prefix(&mut self, hit: &PrefixHit, table: &mut Vec<u32>) {
        debug_assert!(table.is_empty() || hit.blocks.is_empty());
        for &b in &hit.blocks {
            self.acquire(b);
            table.push(b);
        }
    }

    /// Blocks a set of hits would take off the free list (hits on free cached blocks).
    pub fn free_among(&self, blocks: &[u32]) -> usize {
        blocks.iter().filter(|&&b| self.ref_count[b as usize] == 0).count()
    }

    /// Takes a reference on a block found by `lookup` (reviving it if it was free).
    pub fn acquire(&mut self, b: u32) {
        if self.ref_count[b as usize] == 0 {
            self.unlink(b);
        }
        self.ref_count[b as usize] += 1;
    }

    /// Extra reference for a sequence forked from the block's owner.
    pub fn share(&mut self, b: u32) {
        debug_assert!(self.ref_count[b as usize] > 0);
        self.ref_count[b as usize] += 1;
    }

    /// Grows `table` to `num_blocks` blocks; false (and nothing taken) when the pool is short.
    pub fn grow(&mut self, table: &mut Vec<u32>, num_blocks: usize) -> bool {
        if num_blocks <= table.len() {
            return true;
        }
        let need = num_blocks - table.len();
        if need > self.num_free {
            return false;
        }
        for _ in 0..need {
            let b = self.head;
            self.unlink(b);
            let h = self.hash[b as usize];
            if h != 0 {
                // Evicted: the least recently freed cached block loses its cache entry.
                if self.cached.get(&h) == Some(&b) {
                    self.cached.remove(&h);
                }
                self.hash[b as usize] = 0;
            }
            self.ref_count[b as usize] = 1;
            table.push(b);
        }
        true
    }

    /// Drops one reference on every block of `table` (last block first, so a sequence's tail,
    /// the part least likely to be shared, is evicted before its prefix) and clears it.
    pub fn free(&mut self, table: &mut Vec<u32>) {
        for &b in table.iter().rev() {
            let rc = &mut self.ref_count[b as usize];
            debug_assert!(*rc > 0, "block {b} freed more often than taken");
            *rc -= 1;
            if *rc == 0 {
                // Blocks that hold no cached prefix go to the head: reuse them before
                // evicting anything a future prompt could hit.
                if self.hash[b as usize] == 0 {
                    self.push_head(b)
                } else {
                    self.push_tail(b)
                }
            }
        }
        table.clear();
    }

    /// Marks a full, computed block as holding `tokens` under `hash`. A block already cached
    /// (a hit, or shared from a fork) keeps its key; a duplicate of content cached elsewhere
    /// stays unkeyed so the map never points at two blocks.
    pub fn register(&mut self, b: u32, hash: u64, tokens: &[u32]) {
        debug_assert_eq!(tokens.len(), self.block_size);
        if !self.enable_prefix_caching || self.hash[b as usize] != 0 {
            return;
        }
        if self.cached.contains_key(&hash) {
            return;
        }
        self.cached.insert(hash, b);
        self.hash[b as usize] = hash;
        let s = b as usize * self.block_size;
        self.content[s..s + self.block_size].copy_from_slice(tokens);
    }

    /// Drops every cached key of free blocks (vLLM's reset_prefix_cache).
    pub fn reset_prefix_cache(&mut self) -> bool {
        if self.num_free != self.num_total_blocks() {
            return false;
        }
        self.cached.clear();
        self.hash.iter_mut().for_each(|h| *h = 0);
        true
    }

    /// Free-list length walked from both ends; for tests of the invariants.
    pub fn check_free_list(&self) -> Result<usize, String> {
        let mut n = 0;
        let mut cur = self.head;
        let mut last = NIL;
        while cur != NIL {
            if self.ref_count[cur as usize] != 0 {
                return Err(format!("free block {cur} has ref count {}", self.ref_count[cur as usize]));
            }
            if self.prev[cur as usize] != last {
                return Err(format!("broken prev link at {cur}"));
            }
            last = cur;
            cur = self.next[cur as usize];
            n += 1;
            if n > self.num_total_blocks() {
                return Err("free list has a cycle".into());
            }
        }
        if last != self.tail {
            return Err("tail does not end the free list".into());
        }
        if n != self.num_free {
            return Err(format!("free list holds {n} blocks, counter says {}", self.num_free));
        }
        let zero = self.ref_count.iter().filter(|&&r| r == 0).count();
        if zero != n {
            return Err(format!("{zero} blocks have ref count 0 but {n} are on the free list"));
        }
        for (&h, &b) in &self.cached {
            if self.hash[b as usize] != h {
                return Err(format!("cache key of block {b} does not match its hash"));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BS: usize = 4;

    /// A sequence as the scheduler keeps it: tokens, the blocks holding their KV (all of them
    /// computed here), and the chained hashes of its full blocks.
    #[derive(Clone, Default)]
    struct Seq {
        tokens: Vec<u32>,
        table: Vec<u32>,
        hashes: Vec<u64>,
    }

    impl Seq {
        fn hash_full_blocks(&mut self) {
            while self.hashes.len() < self.tokens.len() / BS {
                let i = self.hashes.len();
                let parent = if i == 0 { 0 } else { self.hashes[i - 1] };
                self.hashes.push(chain_hash(parent, &self.tokens[i * BS..(i + 1) * BS]));
            }
        }
        fn register(&mut self, bm: &mut BlockManager) {
            self.hash_full_blocks();
            for (j, &h) in self.hashes.iter().enumerate() {
                bm.register(self.table[j], h, &self.tokens[j * BS..(j + 1) * BS]);
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Allocate(Vec<u32>),
        Append(usize, Vec<u32>),
        Fork(usize),
        Free(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        // A 3-token alphabet makes shared prefixes (and so cache hits) common.
        let toks = |max| proptest::collection::vec(0u32..3, 1..max);
        prop_oneof![
            3 => toks(20).prop_map(Op::Allocate),
            3 => (any::<usize>(), toks(8)).prop_map(|(i, t)| Op::Append(i, t)),
            1 => any::<usize>().prop_map(Op::Fork),
            2 => any::<usize>().prop_map(Op::Free),
        ]
    }

    fn check(bm: &BlockManager, seqs: &[Seq]) -> Result<(), TestCaseError> {
        let free = bm.check_free_list().map_err(TestCaseError::fail)?;
        let mut refs = vec![0u32; bm.num_total_blocks()];
        for s in seqs {
            for (j, &b) in s.table.iter().enumerate() {
                refs[b as usize] += 1;
                // A block that carries a cache key holds exactly this sequence's tokens there.
                if bm.block_hash(b) != 0 && (j + 1) * BS <= s.tokens.len() {
                    prop_assert_eq!(bm.block_content(b), &s.tokens[j * BS..(j + 1) * BS]);
                    prop_assert_eq!(bm.block_hash(b), s.hashes[j]);
                }
            }
        }
        for (b, &r) in refs.iter().enumerate() {
            prop_assert_eq!(r, bm.ref_count(b as u32), "block {} owners vs ref count", b);
        }
        let used = refs.iter().filter(|&&r| r > 0).count();
        prop_assert_eq!(used + free, bm.num_total_blocks());
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        #[test]
        fn invariants_hold_under_random_ops(ops in proptest::collection::vec(op(), 1..80)) {
            let mut bm = BlockManager::new(24, BS, true);
            let mut seqs: Vec<Seq> = vec![];
            for op in ops {
                match op {
                    Op::Allocate(tokens) => {
                        let mut s = Seq { tokens, ..Default::default() };
                        s.hash_full_blocks();
                        let mut hits = vec![];
                        for j in 0..(s.tokens.len() - 1) / BS {
                            match bm.lookup(s.hashes[j], &s.tokens[j * BS..(j + 1) * BS]) {
                                Some(b) => hits.push(b),
                                None => break,
                            }
                        }
                        let need = bm.blocks_for(s.tokens.len()) - hits.len() + bm.free_among(&hits);
                        if need > bm.num_free_blocks() {
                            continue;
                        }
                        for &b in &hits {
                            bm.acquire(b);
                            s.table.push(b);
                        }
                        prop_assert!(bm.grow(&mut s.table, bm.blocks_for(s.tokens.len())));
                        s.register(&mut bm);
                        seqs.push(s);
                    }
                    Op::Append(i, tokens) if !seqs.is_empty() => {
                        let i = i % seqs.len();
                        let s = &mut seqs[i];
                        let want = bm.blocks_for(s.tokens.len() + tokens.len());
                        if bm.grow(&mut s.table, want) {
                            s.tokens.extend(tokens);
                            s.register(&mut bm);
                        }
                    }
                    Op::Fork(i) if !seqs.is_empty() => {
                        let p = seqs[i % seqs.len()].clone();
                        let full = p.tokens.len() / BS;
                        let mut c = Seq { tokens: p.tokens.clone(), table: p.table[..full].to_vec(), hashes: p.hashes[..full].to_vec() };
                        for &b in &c.table {
                            bm.share(b);
                        }
                        if bm.grow(&mut c.table, bm.blocks_for(c.tokens.len())) {
                            c.register(&mut bm);
                            seqs.push(c);
                        } else {
                            bm.free(&mut c.table);
                        }
                    }
                    Op::Free(i) if !seqs.is_empty() => {
                        let mut s = seqs.swap_remove(i % seqs.len());
                        bm.free(&mut s.table);
                    }
                    _ => {}
                }
                check(&bm, &seqs)?;
            }
            for s in &mut seqs {
                bm.free(&mut s.table);
            }
            seqs.clear();
            check(&bm, &seqs)?;
            prop_assert_eq!(bm.num_free_blocks(), bm.num_total_blocks());
            prop_assert!((0..bm.num_total_blocks() as u32).all(|b| bm.ref_count(b) == 0));
        }
    }

    #[test]
    fn freed_cached_block_is_revived_and_lru_evicts_oldest() {
        let mut bm = BlockManager::new(4, BS, true);
        let toks: Vec<u32> = vec![5, 1, 7, 2];
        let h = chain_hash(0, &toks);
        let mut a = vec![];
        assert!(bm.grow(&mut a, 1));
        bm.register(a[0], h, &toks);
        let kept = a[0];
        bm.free(&mut a);
        assert_eq!(bm.num_free_blocks(), 4);
        // Three allocations take the never-cached blocks first; the cached one survives.
        let mut b = vec![];
        assert!(bm.grow(&mut b, 3));
        assert!(!b.contains(&kept));
        assert_eq!(bm.lookup(h, &toks), Some(kept));
        bm.acquire(kept);
        assert_eq!(bm.ref_count(kept), 1);
        assert_eq!(bm.num_free_blocks(), 0);
        assert_eq!(bm.lookup(h, &[5, 1, 7, 3]), None, "content is compared, not just the hash");
        let mut t = vec![kept];
        bm.free(&mut t);
        bm.free(&mut b);
        // Now every block is free; allocating all four evicts the cached one last.
        let mut c = vec![];
        assert!(bm.grow(&mut c, 3));
        assert_eq!(bm.lookup(h, &toks), Some(kept));
        assert!(bm.grow(&mut c, 4));
        assert_eq!(bm.lookup(h, &toks), None);
        assert!(!bm.grow(&mut c, 5));
        bm.check_free_list().unwrap();
    }

    /// A prompt sharing two full blocks with a computed, since freed sequence: the match
    /// stops at the first differing block, counts the hits on free blocks, honours
    /// `max_blocks`, and taking the hit revives those blocks off the free list.
    #[test]
    fn match_prefix_returns_the_cached_run() {
        let mut bm = BlockManager::new(8, BS, true);
        let mut a = Seq { tokens: (0..12).collect(), ..Default::default() };
        assert!(bm.grow(&mut a.table, 3));
        a.register(&mut bm);
        let a_blocks = a.table.clone();
        bm.free(&mut a.table);
        let prompt: Vec<u32> = (0..8).chain([99, 98, 97, 96, 95]).collect();
        let mut hashes = vec![];
        let hit = bm.match_prefix(&prompt, &mut hashes, 3);
        assert_eq!(hit, PrefixHit { blocks: a_blocks[..2].to_vec(), num_cached_tokens: 2 * BS, num_free: 2 });
        assert_eq!(hashes.len(), 3, "the probe hashed through the first miss");
        assert_eq!(bm.match_prefix(&prompt, &mut hashes, 1).blocks, a_blocks[..1].to_vec());
        let free = bm.num_free_blocks();
        let mut table = vec![];
        bm.acquire_prefix(&hit, &mut table);
        assert_eq!((table, bm.num_free_blocks()), (a_blocks[..2].to_vec(), free - 2));
        assert_eq!(bm.match_prefix(&prompt, &mut hashes, 3).num_free, 0, "held blocks are not free");
    }
}
