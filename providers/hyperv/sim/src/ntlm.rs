//! The server side of NTLM under WinRM's `Negotiate` scheme (raw NTLM
//! tokens, base64, in `Authorization` / `WWW-Authenticate`), through
//! Devolutions' `sspi`, as a host does it: the NEGOTIATE_MESSAGE is
//! answered 401 with a CHALLENGE_MESSAGE, the AUTHENTICATE_MESSAGE is
//! checked, and the connection stays authenticated after that. The
//! simulated host has one NTLM account: the first configured user.

use std::sync::{Arc, Mutex};

use sspi::ntlm::NtlmConfig;
use sspi::{
    AuthIdentity, BufferType, CredentialUse, DataRepresentation, Ntlm, Secret, SecurityBuffer,
    SecurityStatus, ServerRequestFlags, Sspi, SspiImpl, Username,
};

/// What one connection has proved.
#[derive(Clone, Default)]
pub(crate) struct ConnAuth(Arc<Mutex<ConnState>>);

#[derive(Default)]
struct ConnState {
    authenticated: bool,
    handshake: Option<Server>,
}

struct Server {
    ntlm: Ntlm,
    creds: <Ntlm as SspiImpl>::CredentialsHandle,
}

/// The outcome of one NTLM token.
pub(crate) enum Step {
    /// Answer 401 with this challenge.
    Challenge(Vec<u8>),
    /// The connection is authenticated.
    Done,
    /// Refused (bad token, wrong password).
    Denied(String),
}

impl ConnAuth {
    /// True once an NTLM handshake succeeded on this connection.
    pub(crate) fn authenticated(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).authenticated
    }

    /// Takes one client token for `user`/`password`.
    pub(crate) fn step(&self, token: &[u8], user: &str, password: &str) -> Step {
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let result = (|| -> Result<Step, String> {
            if state.handshake.is_none() {
                let identity = AuthIdentity {
                    username: Username::parse(user).map_err(|e| e.to_string())?,
                    password: Secret::from(password.to_owned()),
                };
                let mut ntlm = Ntlm::with_config(NtlmConfig { client_computer_name: None });
                let acquired = ntlm
                    .acquire_credentials_handle()
                    .with_credential_use(CredentialUse::Inbound)
                    .with_auth_data(&identity)
                    .execute(&mut ntlm)
                    .map_err(|e| e.to_string())?;
                state.handshake = Some(Server { ntlm, creds: acquired.credentials_handle });
            }
            let server = state.handshake.as_mut().ok_or("no handshake")?;
            let mut input = [SecurityBuffer::new(token.to_vec(), BufferType::Token)];
            let mut output = [SecurityBuffer::new(Vec::new(), BufferType::Token)];
            let builder = server
                .ntlm
                .accept_security_context()
                .with_credentials_handle(&mut server.creds)
                .with_context_requirements(ServerRequestFlags::ALLOCATE_MEMORY)
                .with_target_data_representation(DataRepresentation::Native)
                .with_input(&mut input)
                .with_output(&mut output);
            let result = server
                .ntlm
                .accept_security_context_impl(builder)
                .map_err(|e| e.to_string())?
                .resolve_to_result()
                .map_err(|e| e.to_string())?;
            Ok(match result.status {
                SecurityStatus::ContinueNeeded => Step::Challenge(std::mem::take(&mut output[0].buffer)),
                // The AUTHENTICATE_MESSAGE is checked (the NTLMv2 proof
                // against the account's password) when the token is
                // completed.
                SecurityStatus::CompleteNeeded | SecurityStatus::CompleteAndContinue => {
                    server.ntlm.complete_auth_token(&mut output).map_err(|e| e.to_string())?;
                    Step::Done
                }
                other => Step::Denied(format!("NTLM status {other:?}")),
            })
        })();
        match result {
            Ok(Step::Done) => {
                state.handshake = None;
                state.authenticated = true;
                Step::Done
            }
            Ok(step @ Step::Challenge(_)) => step,
            Ok(denied) => {
                state.handshake = None;
                denied
            }
            Err(e) => {
                state.handshake = None;
                Step::Denied(e)
            }
        }
    }
}
