//! HCP network names to what they are on the hypervisor (a bridge, a port
//! group, a virtual switch, a libvirt NIC): the provider's own table, a
//! default, and the operator's `backing` from HCP's network catalog, which
//! wins when given.

use std::collections::BTreeMap;

use crate::pb;

/// A provider's network table with its default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backings<T> {
    table: BTreeMap<String, T>,
    default: Option<T>,
    unknown_take_default: bool,
}

/// An attachment has no backing on this provider.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackingError {
    /// The HCP network is not in the table (and there is no fallback).
    #[error("network {network:?} has no backing on this provider")]
    UnknownNetwork {
        /// Position in the request's `networks`.
        index: usize,
        /// The HCP network name.
        network: String,
    },
    /// The operator's backing is not one this provider has.
    #[error("backing {backing:?} is not available on this provider")]
    UnknownBacking {
        /// Position in the request's `networks`.
        index: usize,
        /// The operator's backing.
        backing: String,
    },
}

impl<T: Clone> Backings<T> {
    /// A table whose unknown names are refused; `default` is the backing
    /// of a VM created without networks (None: no NIC at all).
    pub fn new(table: BTreeMap<String, T>, default: Option<T>) -> Self {
        Self { table, default, unknown_take_default: false }
    }

    /// Names missing from the table take the default instead of being
    /// refused.
    pub fn unknown_take_default(mut self) -> Self {
        self.unknown_take_default = true;
        self
    }

    /// The table's entry for `name`.
    pub fn get(&self, name: &str) -> Option<&T> {
        self.table.get(name)
    }

    /// One backing per attachment, in order. An attachment with the
    /// operator's `backing` gets `from_backing(backing)` (None refuses
    /// it); otherwise its HCP `network` is looked up in the table, then
    /// falls back as configured. No attachments: the default alone, or
    /// nothing when there is no default.
    pub fn resolve(
        &self,
        networks: &[pb::NetworkAttachment],
        from_backing: impl Fn(&str) -> Option<T>,
    ) -> Result<Vec<T>, BackingError> {
        if networks.is_empty() {
            return Ok(self.default.iter().cloned().collect());
        }
        networks
            .iter()
            .enumerate()
            .map(|(index, n)| {
                if !n.backing.is_empty() {
                    return from_backing(&n.backing)
                        .ok_or_else(|| BackingError::UnknownBacking { index, backing: n.backing.clone() });
                }
                let fallback = self.default.as_ref().filter(|_| self.unknown_take_default);
                self.table
                    .get(&n.network)
                    .or(fallback)
                    .cloned()
                    .ok_or_else(|| BackingError::UnknownNetwork { index, network: n.network.clone() })
            })
            .collect()
    }
}

impl Backings<String> {
    /// [`Backings::resolve`] where the operator's backing is the
    /// hypervisor's own name (a bridge, a port group, a switch).
    pub fn resolve_names(&self, networks: &[pb::NetworkAttachment]) -> Result<Vec<String>, BackingError> {
        self.resolve(networks, |backing| Some(backing.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attach(network: &str, backing: &str) -> pb::NetworkAttachment {
        pb::NetworkAttachment { network: network.into(), backing: backing.into() }
    }

    fn table() -> BTreeMap<String, String> {
        [("lan".to_owned(), "vmbr1".to_owned())].into()
    }

    #[test]
    fn networks_resolve_through_backing_then_table_then_default() {
        let strict = Backings::new(table(), Some("vmbr0".to_owned()));
        let lenient = strict.clone().unknown_take_default();
        let unknown =
            |index, network: &str| Err(BackingError::UnknownNetwork { index, network: network.into() });
        type Case<'a> = (&'a Backings<String>, Vec<pb::NetworkAttachment>, Result<Vec<String>, BackingError>);
        let cases: Vec<Case<'_>> = vec![
            (&strict, vec![], Ok(vec!["vmbr0".into()])),
            (&strict, vec![attach("lan", "")], Ok(vec!["vmbr1".into()])),
            (&strict, vec![attach("lan", "pg-9")], Ok(vec!["pg-9".into()])),
            (&strict, vec![attach("lan", ""), attach("wan", "")], unknown(1, "wan")),
            (&lenient, vec![attach("lan", ""), attach("wan", "")], Ok(vec!["vmbr1".into(), "vmbr0".into()])),
        ];
        for (backings, networks, want) in cases {
            assert_eq!(backings.resolve_names(&networks), want, "{networks:?}");
        }
    }

    #[test]
    fn backings_can_be_keys_of_the_table_and_no_default_means_no_nic() {
        let keyed = Backings::new(table(), None);
        let by_key = |b: &str| keyed.get(b).cloned();
        assert_eq!(keyed.resolve(&[], by_key), Ok(vec![]));
        assert_eq!(keyed.resolve(&[attach("x", "lan")], by_key), Ok(vec!["vmbr1".into()]));
        assert_eq!(
            keyed.resolve(&[attach("x", "nope")], by_key),
            Err(BackingError::UnknownBacking { index: 0, backing: "nope".into() })
        );
    }
}
