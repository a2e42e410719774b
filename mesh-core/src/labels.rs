//! Workload labels and label selectors.
//!
//! A `BTreeMap` rather than a hash map: label sets are small, iteration order is stable
//! (which keeps `/config_dump` and metric label rendering deterministic), and equality is
//! structural.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Labels of a workload or endpoint (`app: reviews`, `version: v2`), also used as a selector.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.0.insert(key.into(), value.into());
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when every pair of `selector` is present here, as Kubernetes `matchLabels`.
    /// An empty selector matches everything.
    pub fn matches(&self, selector: &Labels) -> bool {
        selector
            .0
            .iter()
            .all(|(k, v)| self.0.get(k).is_some_and(|mine| mine == v))
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Labels {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Labels(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_matches_subset_of_labels() {
        let labels: Labels = [("app", "reviews"), ("version", "v2")]
            .into_iter()
            .collect();
        let v2: Labels = [("version", "v2")].into_iter().collect();
        let v1: Labels = [("version", "v1")].into_iter().collect();
        let other_key: Labels = [("tier", "v2")].into_iter().collect();
        assert!(labels.matches(&v2));
        assert!(labels.matches(&Labels::new()));
        assert!(!labels.matches(&v1));
        assert!(!labels.matches(&other_key));
        assert!(!Labels::new().matches(&v2));
    }
}
