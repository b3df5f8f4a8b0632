//! What the kit found: one [`Outcome`] per check, in order, printable as
//! the command prints it.

use std::fmt;

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The provider behaved as the contract says.
    Pass,
    /// It did not; the message says how.
    Fail(String),
    /// Not applicable; the message says why.
    Skip(String),
}

/// All checks, in order.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// (check name, outcome).
    pub checks: Vec<(String, Outcome)>,
}

impl Report {
    /// Number of checks with this kind of outcome.
    pub fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.checks.iter().filter(|(_, o)| f(o)).count()
    }

    /// True when no check failed.
    pub fn passed(&self) -> bool {
        self.count(|o| matches!(o, Outcome::Fail(_))) == 0
    }

    /// The failures, as `(check, message)`.
    pub fn failures(&self) -> Vec<(&str, &str)> {
        self.checks
            .iter()
            .filter_map(|(n, o)| match o {
                Outcome::Fail(m) => Some((n.as_str(), m.as_str())),
                _ => None,
            })
            .collect()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, outcome) in &self.checks {
            match outcome {
                Outcome::Pass => writeln!(f, "PASS {name}")?,
                Outcome::Fail(m) => writeln!(f, "FAIL {name}: {m}")?,
                Outcome::Skip(m) => writeln!(f, "SKIP {name}: {m}")?,
            }
        }
        write!(
            f,
            "conformance: {} passed, {} failed, {} skipped",
            self.count(|o| *o == Outcome::Pass),
            self.count(|o| matches!(o, Outcome::Fail(_))),
            self.count(|o| matches!(o, Outcome::Skip(_))),
        )
    }
}
