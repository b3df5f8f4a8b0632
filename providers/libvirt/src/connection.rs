//! The libvirt connection: every call runs on the blocking pool, reopening
//! the connection first when the last call lost it; calls for one VM are
//! serialized by a per-VM lock.

use std::sync::Arc;

use hcp_provider_sdk::{ErrorKind, ProviderError};
use virt::connect::Connect;

use crate::{Libvirt, errors};

pub(crate) fn open(uri: &str) -> Result<Connect, virt::error::Error> {
    Connect::open(Some(uri))
}

/// What a call on the blocking pool can fail with: libvirt's own error
/// (mapped by [`errors::classify`]) or one of ours.
pub(crate) enum CallError {
    Virt(virt::error::Error),
    Hcp(ProviderError),
}

impl From<virt::error::Error> for CallError {
    fn from(e: virt::error::Error) -> Self {
        Self::Virt(e)
    }
}

pub(crate) fn not_running() -> CallError {
    CallError::Hcp(ProviderError::new(ErrorKind::InvalidState, "the vm is not running"))
}

impl Libvirt {
    pub(crate) fn failpoint(&self, name: &str) {
        self.inner.failpoints.hit(name);
    }

    /// Runs `f` with the connection on the blocking pool, reconnecting
    /// first when the last call lost it; errors are mapped for `what`.
    pub(crate) async fn call<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(&Connect) -> Result<T, CallError> + Send + 'static,
    ) -> Result<T, ProviderError> {
        let inner = self.inner.clone();
        let result = tokio::task::spawn_blocking(move || {
            let conn = {
                let mut guard = inner.conn.lock().unwrap_or_else(|p| p.into_inner());
                if guard.is_none() {
                    *guard = Some(open(&inner.config.uri).map_err(CallError::Virt)?);
                }
                guard.clone()
            };
            let Some(conn) = conn else { return Err(CallError::Virt(virt::error::Error::last_error())) };
            let r = f(&conn);
            if let Err(CallError::Virt(e)) = &r
                && errors::connection_lost(e)
            {
                tracing::warn!(error = %e.message(), "libvirt connection lost; reconnecting on the next call");
                *inner.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
            r
        })
        .await
        .map_err(|e| ProviderError::new(ErrorKind::Internal, format!("libvirt call panicked: {e}")))?;
        result.map_err(|e| match e {
            CallError::Virt(e) => errors::classify(&e, what),
            CallError::Hcp(e) => e,
        })
    }

    pub(crate) fn lock(&self, vm_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.inner.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(vm_id.to_owned()).or_default().clone()
    }
}
