//! Reuse of the KV cache of recently seen prompt prefixes (OpenClaw resends the same
//! 5–15 K-token system prompt and tools on every turn), bounded by a memory budget (LRU).
//! Entries are keyed by (adapter version, token ids): keys and values computed with one
//! version's weights are never reused by another.

use crate::model::KvCache;

struct Entry {
    version: i64,
    ids: Vec<u32>,
    cache: KvCache,
    bytes: usize,
    last_used: u64,
}

pub struct PrefixCache {
    entries: Vec<Entry>,
    budget_bytes: usize,
    /// Shorter shared prefixes are recomputed: not worth the bookkeeping.
    min_tokens: usize,
    clock: u64,
}

impl PrefixCache {
    pub fn new(budget_bytes: usize, min_tokens: usize) -> Self {
        Self {
            entries: Vec::new(),
            budget_bytes,
            min_tokens: min_tokens.max(1),
            clock: 0,
        }
    }

    /// The cache of the longest stored prefix of `prompt`, leaving at least its last token to be
    /// computed (its logits start the generation).
    pub fn lookup(&mut self, version: i64, prompt: &[u32]) -> Option<KvCache> {
        let limit = prompt.len().saturating_sub(1);
        let (best, n) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.version == version)
            .map(|(i, e)| {
                (
                    i,
                    e.ids
                        .iter()
                        .zip(prompt)
                        .take_while(|(a, b)| a == b)
                        .count()
                        .min(limit),
                )
            })
            .max_by_key(|&(_, n)| n)?;
        if n < self.min_tokens {
            return None;
        }
        self.clock += 1;
        self.entries[best].last_used = self.clock;
        Some(self.entries[best].cache.truncated(n))
    }

    /// Stores the cache of a whole prompt, evicting least recently used entries over budget.
    pub fn insert(&mut self, version: i64, ids: &[u32], cache: &KvCache) {
        if ids.len() < self.min_tokens || cache.len() != ids.len() {
            return;
        }
        let bytes = cache.bytes();
        if bytes > self.budget_bytes {
            return;
        }
        // An entry that is a prefix of this one is superseded by it.
        self.entries.retain(|e| {
            !(e.version == version && e.ids.len() <= ids.len() && ids.starts_with(&e.ids))
        });
        self.clock += 1;
        self.entries.push(Entry {
            version,
            ids: ids.to_vec(),
            cache: cache.clone(),
            bytes,
            last_used: self.clock,
        });
        while self.used_bytes() > self.budget_bytes {
            let oldest = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
                .expect("non-empty");
            self.entries.remove(oldest);
        }
    }

    /// Drops every entry computed with `version` (its adapter is gone).
    pub fn forget_version(&mut self, version: i64) {
        self.entries.retain(|e| e.version != version);
    }

    pub fn used_bytes(&self) -> usize {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
