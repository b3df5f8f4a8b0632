//! The checks, grouped by area. Each is a [`crate::kit::Kit`] method that
//! returns a [`crate::kit::CheckResult`] for the runner to record, or
//! records several outcomes itself; [`crate::run`] calls them in order.

mod cleanup;
mod features;
mod hosts;
mod identity;
mod images;
mod lifecycle;
mod refusals;
mod volumes;
