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
    Denied(NtlmError),
}

/// Why an NTLM token is refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NtlmError {
    /// The configured user name is not one NTLM can carry.
    #[error("the account name {user} is not valid for NTLM")]
    Username {
        /// The configured user.
        user: String,
        /// sspi's reason (its `UsernameError` is not public).
        #[source]
        source: sspi::Error,
    },
    /// sspi failed at one step of the handshake (a bad token, a wrong
    /// password).
    #[error("{step} failed")]
    Sspi {
        /// The step: acquiring credentials, accepting or completing a token.
        step: &'static str,
        /// sspi's reason.
        #[source]
        source: sspi::Error,
    },
    /// The handshake ended in neither a challenge nor success.
    #[error("NTLM status {0:?}")]
    Status(SecurityStatus),
}

impl Server {
    /// A handshake for the one account, `user`/`password`.
    fn new(user: &str, password: &str) -> Result<Self, NtlmError> {
        let identity = AuthIdentity {
            username: Username::parse(user)
                .map_err(|e| NtlmError::Username { user: user.to_owned(), source: e.into() })?,
            password: Secret::from(password.to_owned()),
        };
        let mut ntlm = Ntlm::with_config(NtlmConfig { client_computer_name: None });
        let acquired = ntlm
            .acquire_credentials_handle()
            .with_credential_use(CredentialUse::Inbound)
            .with_auth_data(&identity)
            .execute(&mut ntlm)
            .map_err(sspi_step("acquiring the server credentials"))?;
        Ok(Self { ntlm, creds: acquired.credentials_handle })
    }
}

/// Wraps an sspi error with the step it happened in.
fn sspi_step(step: &'static str) -> impl Fn(sspi::Error) -> NtlmError {
    move |source| NtlmError::Sspi { step, source }
}

impl ConnAuth {
    /// True once an NTLM handshake succeeded on this connection.
    pub(crate) fn authenticated(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).authenticated
    }

    /// Takes one client token for `user`/`password`.
    pub(crate) fn step(&self, token: &[u8], user: &str, password: &str) -> Step {
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let result = (|| -> Result<Step, NtlmError> {
            let server = match state.handshake.take() {
                Some(server) => server,
                None => Server::new(user, password)?,
            };
            let server = state.handshake.insert(server);
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
                .map_err(sspi_step("accepting the token"))?
                .resolve_to_result()
                .map_err(sspi_step("accepting the token"))?;
            Ok(match result.status {
                SecurityStatus::ContinueNeeded => Step::Challenge(std::mem::take(&mut output[0].buffer)),
                // The AUTHENTICATE_MESSAGE is checked (the NTLMv2 proof
                // against the account's password) when the token is
                // completed.
                SecurityStatus::CompleteNeeded | SecurityStatus::CompleteAndContinue => {
                    server
                        .ntlm
                        .complete_auth_token(&mut output)
                        .map_err(sspi_step("completing the token"))?;
                    Step::Done
                }
                other => return Err(NtlmError::Status(other)),
            })
        })();
        match result {
            Ok(Step::Done) => {
                state.handshake = None;
                state.authenticated = true;
                Step::Done
            }
            Ok(step) => step,
            Err(e) => {
                state.handshake = None;
                Step::Denied(e)
            }
        }
    }
}
