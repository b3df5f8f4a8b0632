//! A stand-in for Hyper-V's VMConnect listener (TCP 2179): the host end of
//! a VM console. It checks what a client must send before RDP proper and
//! answers RDP's first exchange as VMConnect does; it draws no screen.
//!
//! - The preconnection PDU ([MS-RDPBCGR] 2.2.1.1), version 2, whose string
//!   is the GUID of a VM on this host (`Msvm_ComputerSystem.Name`, compared
//!   without case). Anything else (no PDU, a PDU of the wrong size or
//!   version, a GUID of no VM) is a contract violation: the connection is
//!   closed and the violation recorded.
//! - The X.224 Connection Request that follows: answered with a Connection
//!   Confirm selecting CredSSP (`PROTOCOL_HYBRID`) when the client offers
//!   it, which VMConnect requires, or with the negotiation failure
//!   `HYBRID_REQUIRED_BY_SERVER` when it does not. Then it reads and counts
//!   whatever comes until the client closes.
//!
//! Every connection is recorded ([`crate::Sim::vmconnect_sessions`]). PDUs
//! are decoded and encoded with IronRDP's `ironrdp-pdu`.

use std::time::Duration;

use ironrdp_pdu::nego::{ConnectionConfirm, ConnectionRequest, FailureCode, ResponseFlags, SecurityProtocol};
use ironrdp_pdu::pcb::{PcbVersion, PreconnectionBlob};
use ironrdp_pdu::x224::X224;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::Sim;

/// How long a client may take over each step.
const STEP: Duration = Duration::from_secs(10);

/// One connection to the VMConnect stand-in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmConnectSession {
    /// The preconnection PDU's string (the VM GUID a client asked for).
    pub blob: String,
    /// The VM's `ElementName`, when the GUID named one.
    pub vm_name: Option<String>,
    /// The security protocols the client's Connection Request offered
    /// (`RDP_NEG_REQ.requestedProtocols`).
    pub requested_protocols: u32,
    /// `confirmed CredSSP`, `refused: ...`, or the violation.
    pub outcome: String,
    /// Bytes read after the Connection Confirm.
    pub bytes_after: u64,
}

/// Serves connections until the task is dropped.
pub(crate) async fn serve(listener: TcpListener, sim: Sim) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let sim = sim.clone();
        tokio::spawn(async move {
            let mut record = VmConnectSession {
                blob: String::new(),
                vm_name: None,
                requested_protocols: 0,
                outcome: String::new(),
                bytes_after: 0,
            };
            let index = {
                let mut s = sim.lock();
                s.vmconnect.push(record.clone());
                s.vmconnect.len() - 1
            };
            let outcome = session(&sim, tcp, &mut record, index).await;
            let mut s = sim.lock();
            record.outcome = match outcome {
                Ok(o) => o,
                Err(violation) => {
                    let violation = hcp_telemetry::error_chain(&violation);
                    s.violations.push(format!("vmconnect: {violation}"));
                    violation
                }
            };
            if let Some(r) = s.vmconnect.get_mut(index) {
                r.clone_from(&record);
            }
        });
    }
}

async fn session(
    sim: &Sim,
    mut tcp: TcpStream,
    record: &mut VmConnectSession,
    index: usize,
) -> Result<String, Violation> {
    // The preconnection PDU: cbSize first, then the rest.
    let mut size = [0u8; 4];
    timed(tcp.read_exact(&mut size)).await.map_err(Violation::NoPreconnection)?;
    let cb_size = u32::from_le_bytes(size) as usize;
    if !(PreconnectionBlob::FIXED_PART_SIZE..=4096).contains(&cb_size) {
        return Err(Violation::NotPreconnection { cb_size });
    }
    let mut pdu = vec![0u8; cb_size];
    pdu[..4].copy_from_slice(&size);
    timed(tcp.read_exact(&mut pdu[4..])).await.map_err(Violation::PreconnectionCutShort)?;
    let pcb: PreconnectionBlob = ironrdp_pdu::decode(&pdu).map_err(Violation::PreconnectionMalformed)?;
    if pcb.version != PcbVersion::V2 {
        return Err(Violation::PreconnectionVersion { version: pcb.version.0 });
    }
    let blob = pcb.v2_payload.unwrap_or_default();
    record.blob.clone_from(&blob);
    let vm = sim.vm(&blob).filter(|v| v.guid.eq_ignore_ascii_case(&blob));
    let Some(vm) = vm else {
        return Err(Violation::NoSuchVm { blob });
    };
    record.vm_name = Some(vm.name);
    if let Some(r) = sim.lock().vmconnect.get_mut(index) {
        r.clone_from(record);
    }

    // The X.224 Connection Request, in its TPKT.
    let mut tpkt = [0u8; 4];
    timed(tcp.read_exact(&mut tpkt)).await.map_err(Violation::NoConnectionRequest)?;
    let len = usize::from(u16::from_be_bytes([tpkt[2], tpkt[3]]));
    if tpkt[0] != 3 || !(11..=1024).contains(&len) {
        return Err(Violation::NotTpkt { header: tpkt });
    }
    let mut frame = vec![0u8; len];
    frame[..4].copy_from_slice(&tpkt);
    timed(tcp.read_exact(&mut frame[4..])).await.map_err(Violation::ConnectionRequestCutShort)?;
    let X224(request) = ironrdp_pdu::decode::<X224<ConnectionRequest>>(&frame)
        .map_err(Violation::ConnectionRequestMalformed)?;
    record.requested_protocols = request.protocol.bits();
    let (confirm, outcome) = if request.protocol.contains(SecurityProtocol::HYBRID) {
        (
            ConnectionConfirm::Response { flags: ResponseFlags::empty(), protocol: SecurityProtocol::HYBRID },
            "confirmed CredSSP".to_owned(),
        )
    } else {
        (
            ConnectionConfirm::Failure { code: FailureCode::HYBRID_REQUIRED_BY_SERVER },
            "refused: the client does not offer CredSSP, which VMConnect requires".to_owned(),
        )
    };
    let answer = ironrdp_pdu::encode_vec(&X224(confirm)).map_err(Violation::EncodeConfirm)?;
    let _ = tcp.write_all(&answer).await;
    // What a client sends next (TLS, CredSSP) is counted, not spoken.
    let mut buf = [0u8; 4096];
    while let Ok(n) = tcp.read(&mut buf).await {
        if n == 0 {
            break;
        }
        record.bytes_after += n as u64;
    }
    Ok(outcome)
}

/// What a connection did against the contract (recorded with its source
/// chain as the session's outcome and as a violation).
#[derive(Debug, thiserror::Error)]
enum Violation {
    /// The connection ended or stalled before a preconnection PDU.
    #[error("no preconnection PDU")]
    NoPreconnection(#[source] std::io::Error),
    /// The first four bytes are no plausible `cbSize`.
    #[error(
        "the first bytes are not a preconnection PDU (cbSize {cb_size}); VMConnect needs one naming the VM"
    )]
    NotPreconnection {
        /// The size the bytes give.
        cb_size: usize,
    },
    /// The connection ended inside the preconnection PDU.
    #[error("preconnection PDU cut short")]
    PreconnectionCutShort(#[source] std::io::Error),
    /// IronRDP cannot decode the preconnection PDU.
    #[error("preconnection PDU is malformed")]
    PreconnectionMalformed(#[source] ironrdp_pdu::DecodeError),
    /// A preconnection PDU of another version than 2.
    #[error("preconnection PDU version {version} (VMConnect reads the VM GUID of version 2)")]
    PreconnectionVersion {
        /// The version sent.
        version: u32,
    },
    /// The preconnection PDU's string is no VM's GUID.
    #[error("preconnection PDU names {blob:?}, which is no VM's GUID on this host")]
    NoSuchVm {
        /// The string sent.
        blob: String,
    },
    /// The connection ended or stalled before the X.224 Connection Request.
    #[error("no X.224 Connection Request")]
    NoConnectionRequest(#[source] std::io::Error),
    /// The bytes after the preconnection PDU are no TPKT header.
    #[error("after the preconnection PDU, {header:02x?} is not a TPKT header")]
    NotTpkt {
        /// The four bytes read.
        header: [u8; 4],
    },
    /// The connection ended inside the Connection Request.
    #[error("X.224 Connection Request cut short")]
    ConnectionRequestCutShort(#[source] std::io::Error),
    /// IronRDP cannot decode the Connection Request.
    #[error("X.224 Connection Request is malformed")]
    ConnectionRequestMalformed(#[source] ironrdp_pdu::DecodeError),
    /// IronRDP cannot encode the answer (a simulator bug).
    #[error("cannot encode the confirm")]
    EncodeConfirm(#[source] ironrdp_pdu::EncodeError),
}

async fn timed<T>(f: impl Future<Output = std::io::Result<T>>) -> std::io::Result<T> {
    tokio::time::timeout(STEP, f).await.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}
