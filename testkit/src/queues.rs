//! The production queue backends as a test matrix: a test written once
//! against [`Queue`] runs on NATS JetStream and on RabbitMQ
//! ([`crate::each_queue!`]), each a broker of the test's own that the test
//! can stop and start again.

use crate::stack::{StackOptions, TestStack};

/// A production queue backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    /// NATS JetStream.
    Nats,
    /// RabbitMQ.
    RabbitMq,
}

impl std::fmt::Display for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Queue::Nats => "nats",
            Queue::RabbitMq => "rabbitmq",
        })
    }
}

impl StackOptions {
    /// These options with `queue` as the stack's broker (a server of the
    /// test's own).
    pub fn with_queue(mut self, queue: Queue) -> Self {
        self.nats = queue == Queue::Nats;
        self.rabbitmq = queue == Queue::RabbitMq;
        self
    }
}

impl TestStack {
    /// Kills the stack's broker (SIGKILL), as in a crash.
    pub async fn stop_broker(&mut self) -> anyhow::Result<()> {
        match (&mut self.nats, &mut self.rabbitmq) {
            (Some(nats), _) => nats.stop().await,
            (None, Some(rabbit)) => rabbit.stop().await,
            (None, None) => anyhow::bail!("the stack has no broker of its own"),
        }
        Ok(())
    }

    /// Starts the stack's broker again (same port and storage) and waits
    /// until it serves.
    pub async fn resume_broker(&mut self) -> anyhow::Result<()> {
        match (&mut self.nats, &mut self.rabbitmq) {
            (Some(nats), _) => nats.resume().await,
            (None, Some(rabbit)) => rabbit.resume().await,
            (None, None) => anyhow::bail!("the stack has no broker of its own"),
        }
    }
}

/// Runs each named test body (an `async fn(Queue)`) once per queue
/// backend: `each_queue!(a_test)` makes the tests `a_test::nats` and
/// `a_test::rabbitmq`; `each_queue!(flavor = "multi_thread"; a_test)` runs
/// them on tokio's multi-threaded runtime.
#[macro_export]
macro_rules! each_queue {
    (flavor = $flavor:literal; $($body:ident),+ $(,)?) => {
        $(
            mod $body {
                #[tokio::test(flavor = $flavor)]
                async fn nats() {
                    super::$body($crate::queues::Queue::Nats).await
                }

                #[tokio::test(flavor = $flavor)]
                async fn rabbitmq() {
                    super::$body($crate::queues::Queue::RabbitMq).await
                }
            }
        )+
    };
    ($($body:ident),+ $(,)?) => {
        $(
            mod $body {
                #[tokio::test]
                async fn nats() {
                    super::$body($crate::queues::Queue::Nats).await
                }

                #[tokio::test]
                async fn rabbitmq() {
                    super::$body($crate::queues::Queue::RabbitMq).await
                }
            }
        )+
    };
}
