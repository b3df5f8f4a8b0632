//! `hcp audit verify`: asks core to check the audit trail's hash chain and
//! prints the result; exits non-zero when the chain is broken, so it can
//! run from cron or a pipeline. `--against SEQ:HASH` also checks the chain
//! against a head recorded outside HCP (an `audit_head` line).

use hcp_proto::ops::VerifyAuditChainRequest;
use hcp_proto::ops::audit_service_client::AuditServiceClient;

/// `hcp audit …`.
#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(clap::Subcommand, Debug)]
enum AuditCommand {
    /// Check that no sealed audit event was edited, deleted, reordered or
    /// inserted.
    Verify {
        /// Core's gRPC endpoint.
        #[arg(long, default_value = "http://127.0.0.1:50051", env = "HCP_CORE")]
        core: String,
        /// An operator token (ops.viewer or ops.admin).
        #[arg(long, env = "HCP_TOKEN", hide_env_values = true)]
        token: String,
        /// A head recorded earlier, `SEQ:HASH` (from an `audit_head` log or
        /// anchor-file line): the chain must still hold exactly this hash at
        /// this sequence number.
        #[arg(long, value_name = "SEQ:HASH")]
        against: Option<String>,
    },
}

/// Runs `hcp audit`. Returns whether the chain is intact.
pub fn run(args: AuditArgs) -> anyhow::Result<bool> {
    let AuditCommand::Verify { core, token, against } = args.command;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(core.clone())?.connect().await?;
        let mut client = AuditServiceClient::new(channel);
        let request = VerifyAuditChainRequest { against: against.clone().unwrap_or_default() };
        let mut req = tonic::Request::new(request);
        req.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
        let r = client
            .verify_audit_chain(req)
            .await
            .map_err(|s| anyhow::anyhow!("{}", hcp_proto::error::ApiError::from_status(&s)))?
            .into_inner();
        println!(
            "audit chain: {} sealed ({} without a key), {} not sealed yet; head {} {} key {}",
            r.sealed, r.unkeyed, r.unsealed, r.head_seq, r.head_hash, r.head_key_id
        );
        for p in &r.problems {
            let event = if p.event_id.is_empty() { String::new() } else { format!("event {}: ", p.event_id) };
            println!("BROKEN at {}: {event}{}", p.seq, p.problem);
        }
        if let (Some(anchor), true) = (&against, r.intact) {
            println!("anchor {anchor} holds");
        }
        println!("{}", if r.intact { "intact" } else { "BROKEN" });
        Ok(r.intact)
    })
}
