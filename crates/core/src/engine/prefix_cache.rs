//! Reuse of the KV cache of recently seen prompt prefixes (OpenClaw resends the same
//! 5–15 K-token system prompt and tools on every turn), bounded by a memory budget (LRU).
//! Entries are keyed by (adapter version, token ids): keys and values computed with one
//! version's weights are never reused by another.

use clawrl_model::KvCache;

struct Entry {
    version: i64,
    /// Computed for background work (the judge): evicted before any user prompt.
    background: bool,
    ids: Vec<u32>,
    cache: KvCache,
    last_used: u64,
}

pub(crate) struct PrefixCache {
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
    pub fn insert(&mut self, version: i64, ids: &[u32], cache: &KvCache, background: bool) {
        if ids.len() < self.min_tokens || cache.len() != ids.len() {
            return;
        }
        // Shared, not copied: the request goes on writing its reply into segments of its own.
        let cache = cache.truncated(cache.len());
        if cache.bytes() > self.budget_bytes {
            return;
        }
        // An entry that is a prefix of this one is superseded by it.
        self.entries.retain(|e| {
            !(e.version == version && e.ids.len() <= ids.len() && ids.starts_with(&e.ids))
        });
        self.clock += 1;
        self.entries.push(Entry {
            version,
            background,
            ids: ids.to_vec(),
            cache,
            last_used: self.clock,
        });
        while self.used_bytes() > self.budget_bytes {
            let oldest = self
                .entries
                .iter()
                .enumerate()
                // Background prompts (a judge prompt is reused by its own votes, then rarely
                // again) go first; then the least recently used.
                .min_by_key(|(_, e)| (!e.background, e.last_used))
                .map(|(i, _)| i)
                .expect("non-empty");
            self.entries.remove(oldest);
        }
    }

    /// Drops every entry computed with `version` (its adapter is gone).
    pub(crate) fn forget_version(&mut self, version: i64) {
        self.entries.retain(|e| e.version != version);
    }

    /// Memory the entries hold, each allocation counted once: a conversation's later turns
    /// share the earlier turns' keys and values.
    pub(crate) fn used_bytes(&self) -> usize {
        let mut seen = std::collections::HashSet::new();
        self.entries
            .iter()
            .flat_map(|e| e.cache.allocations())
            .filter(|(id, _)| id.is_none_or(|id| seen.insert(id)))
            .map(|(_, bytes)| bytes)
            .sum()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{DType, Device};
    use clawrl_model::weights::WeightFile;
    use clawrl_model::{Transformer, WeightMode, scoring};

    fn tiny() -> Transformer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/tiny-qwen3");
        let (file, cfg) = WeightFile::open(&dir).unwrap();
        Transformer::load(&file, cfg, &Device::flex(), DType::F32, WeightMode::Dense).unwrap()
    }

    fn cache_of(model: &Transformer, ids: &[u32]) -> KvCache {
        let mut cache = model.new_cache();
        scoring::extend(model, ids, &mut cache, None, 64);
        cache
    }

    #[test]
    fn entries_are_reused_only_by_their_version() {
        let model = tiny();
        let mut pc = PrefixCache::new(1 << 30, 2);
        let ids = [1, 2, 3, 4, 5, 6];
        pc.insert(0, &ids, &cache_of(&model, &ids), false);
        assert_eq!(pc.lookup(0, &[1, 2, 3, 4, 9]).map(|c| c.len()), Some(4));
        assert!(
            pc.lookup(1, &[1, 2, 3, 4, 9]).is_none(),
            "v1 never reuses v0's keys"
        );
        pc.insert(1, &ids, &cache_of(&model, &ids), false);
        assert_eq!(pc.len(), 2, "one entry per version");
        pc.forget_version(1);
        assert!(pc.lookup(1, &ids).is_none());
        assert!(pc.lookup(0, &ids).is_some());
    }

    #[test]
    fn a_prompt_continuing_a_cached_one_shares_its_memory() {
        clawrl_model::kv_cache::share_prefixes_from(4);
        let model = tiny();
        let mut pc = PrefixCache::new(1 << 30, 2);
        let first = [1, 2, 3, 4, 5, 6];
        let first_cache = cache_of(&model, &first);
        pc.insert(0, &first, &first_cache, false);
        // A second turn: the first four tokens are found, the rest computed after them.
        let second = [1, 2, 3, 4, 9, 10, 11];
        let mut cache = pc.lookup(0, &second).expect("a shared prefix");
        assert_eq!(cache.len(), 4);
        // One token at a time: the test model's 16-wide heads take the backend's attention for
        // prompts (on one contiguous copy); decoding steps write where they share nothing.
        scoring::extend(&model, &second[4..], &mut cache, None, 1);
        pc.insert(0, &second, &cache, false);
        assert_eq!(pc.len(), 2);
        // Its keys and values are the first prompt's allocations plus its own new ones.
        assert!(cache.bytes() > first_cache.bytes());
        assert_eq!(pc.used_bytes(), cache.bytes());
        // And they are what computing it from scratch gives.
        let fresh = cache_of(&model, &second);
        let next = |c: &KvCache| {
            let token = scoring::ids_tensor(&model, &[7]);
            model.forward(token, &mut c.clone(), None).into_data()
        };
        let (a, b) = (next(&cache), next(&fresh));
        a.assert_approx_eq::<f32>(&b, burn::tensor::Tolerance::absolute(1e-5));
    }

    #[test]
    fn background_prompts_are_evicted_before_user_prompts() {
        let model = tiny();
        // Entries hold the caches they are given (shared, spare capacity included).
        let one = cache_of(&model, &[1, 2, 3, 4]).bytes();
        let mut pc = PrefixCache::new(2 * one, 2);
        pc.insert(0, &[1, 2, 3, 4], &cache_of(&model, &[1, 2, 3, 4]), false);
        pc.insert(0, &[5, 6, 7, 8], &cache_of(&model, &[5, 6, 7, 8]), true);
        // A third entry: the judge's prompt goes, although the user's is older.
        pc.insert(
            0,
            &[9, 10, 11, 12],
            &cache_of(&model, &[9, 10, 11, 12]),
            false,
        );
        assert!(pc.lookup(0, &[1, 2, 3, 4, 0]).is_some());
        assert!(pc.lookup(0, &[5, 6, 7, 8, 0]).is_none());
        assert!(pc.lookup(0, &[9, 10, 11, 12, 0]).is_some());
        assert!(pc.used_bytes() <= 2 * one);
    }
}
