//! The series a kind of request or connection counts in, found with one lookup by the addresses of its label
//! texts: its labels are built, and hashed by each metric family (SipHash over a dozen texts, per family), only
//! the first time. The entry holds the texts its key is the address of, so they cannot be freed and their
//! addresses given to other texts while it lasts.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, PoisonError, RwLock},
};

/// How many entries a cache keeps before it starts again (each reload makes new texts).
const LIMIT: usize = 4096;

/// Series by key (`K`: the addresses of texts, and what else tells series apart), each with the texts it holds
/// (`T`).
pub struct RecentSeries<K, S, T> {
    entries: RwLock<HashMap<K, (Arc<S>, T), foldhash::fast::RandomState>>,
}

impl<K, S, T> Default for RecentSeries<K, S, T> {
    fn default() -> Self {
        RecentSeries { entries: RwLock::default() }
    }
}

impl<K: Eq + Hash, S, T> RecentSeries<K, S, T> {
    /// The series under `key`; made by `make` (with the texts to hold) the first time.
    pub fn find_or_make(&self, key: K, make: impl FnOnce() -> (Arc<S>, T)) -> Arc<S> {
        if let Some((series, _)) = self.entries.read().unwrap_or_else(PoisonError::into_inner).get(&key) {
            return series.clone();
        }
        let (series, texts) = make();
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= LIMIT {
            entries.clear();
        }
        entries.insert(key, (series.clone(), texts));
        series
    }

    /// Forgets every entry: the series some held may have been dropped from their families.
    pub fn clear(&self) {
        self.entries.write().unwrap_or_else(PoisonError::into_inner).clear();
    }
}

/// A text's address and length, for a key: an empty text may share its address with another.
pub fn address(text: &str) -> (usize, usize) {
    (text.as_ptr() as usize, text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_series_is_made_once_per_key_and_again_after_a_clear() {
        let recent = RecentSeries::<(usize, usize), u32, Arc<str>>::default();
        let text: Arc<str> = "api.example.com".into();
        let mut made = 0;
        let mut make = || {
            made += 1;
            (Arc::new(made), text.clone())
        };
        let first = recent.find_or_make(address(&text), &mut make);
        let again = recent.find_or_make(address(&text), &mut make);
        assert!(Arc::ptr_eq(&first, &again));
        let other: Arc<str> = "other.example.com".into();
        assert_eq!(*recent.find_or_make(address(&other), &mut make), 2);
        recent.clear();
        assert_eq!(*recent.find_or_make(address(&text), &mut make), 3);
    }
}
