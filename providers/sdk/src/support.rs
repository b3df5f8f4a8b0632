//! Small pieces every provider needs and that are easy to get subtly
//! wrong: one call at a time per VM, crash-test failpoints, the shape of
//! an HCP id.

use std::collections::HashMap;
use std::sync::Arc;

/// Serializes calls for one VM (a create, a stop and a delete of the same
/// VM never interleave); calls for different VMs run in parallel.
#[derive(Debug, Default)]
pub struct VmLocks(std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl VmLocks {
    /// No VM locked.
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits for the VM's turn; the turn lasts while the guard lives.
    pub async fn lock(&self, vm_id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.0.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(vm_id.to_owned()).or_default().clone()
        };
        lock.lock_owned().await
    }
}

/// Failpoints for crash tests: names read from an environment variable
/// (comma separated); reaching one aborts the process, as a crash would.
#[derive(Debug, Default, Clone)]
pub struct Failpoints(Vec<String>);

impl Failpoints {
    /// The failpoints named in `var` (none when it is unset).
    pub fn from_env(var: &str) -> Self {
        Self(
            std::env::var(var)
                .map(|v| v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect())
                .unwrap_or_default(),
        )
    }

    /// Aborts the process when `name` is one of them.
    pub fn hit(&self, name: &str) {
        if self.0.iter().any(|f| f == name) {
            tracing::error!(failpoint = name, "failpoint reached: aborting");
            std::process::abort();
        }
    }
}

/// Whether `s` has the shape of a canonical UUID, as HCP's VM and snapshot
/// ids always do (providers recognize their VMs by names built from them).
pub fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices()
            .all(|(i, c)| if matches!(i, 8 | 13 | 18 | 23) { c == '-' } else { c.is_ascii_hexdigit() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_recognized_by_shape() {
        assert!(is_uuid("0190b5f2-0000-7000-8000-000000000001"));
        assert!(!is_uuid("0190b5f2-0000-7000-8000-00000000000"));
        assert!(!is_uuid("hcp-pending"));
        assert!(!is_uuid("0190b5f2x0000-7000-8000-000000000001"));
    }

    #[tokio::test]
    async fn calls_for_one_vm_take_turns() {
        let locks = VmLocks::new();
        let first = locks.lock("a").await;
        // Another VM is free; the same VM waits.
        let _other = locks.lock("b").await;
        assert!(tokio::time::timeout(std::time::Duration::from_millis(50), locks.lock("a")).await.is_err());
        drop(first);
        let _again = locks.lock("a").await;
    }
}
