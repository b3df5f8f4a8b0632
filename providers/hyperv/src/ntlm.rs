//! NTLM for WinRM's `Negotiate` scheme over HTTPS, through Devolutions'
//! `sspi` (a maintained, pure-Rust SSPI implementation; no hand-written
//! NTLM here). NTLM authenticates a connection: the provider negotiates on
//! a connection of its own and sends its requests on it while it lasts.

use sspi::ntlm::NtlmConfig;
use sspi::{
    AuthIdentity, BufferType, ClientRequestFlags, CredentialUse, DataRepresentation, Ntlm, Secret,
    SecurityBuffer, Sspi, SspiImpl, Username,
};

/// A client handshake in progress.
pub struct Handshake {
    ntlm: Ntlm,
    creds: <Ntlm as SspiImpl>::CredentialsHandle,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake").finish_non_exhaustive()
    }
}

impl Handshake {
    /// Starts one for `username` (`user`, `DOMAIN\user` or `user@domain`);
    /// the first token (NEGOTIATE_MESSAGE).
    pub fn start(username: &str, password: &str) -> Result<(Self, Vec<u8>), String> {
        let identity = AuthIdentity {
            username: Username::parse(username).map_err(|e| format!("username: {e}"))?,
            password: Secret::from(password.to_owned()),
        };
        let mut ntlm = Ntlm::with_config(NtlmConfig { client_computer_name: None });
        let acquired = ntlm
            .acquire_credentials_handle()
            .with_credential_use(CredentialUse::Outbound)
            .with_auth_data(&identity)
            .execute(&mut ntlm)
            .map_err(|e| e.to_string())?;
        let mut me = Self { ntlm, creds: acquired.credentials_handle };
        let token = me.step(&[])?;
        Ok((me, token))
    }

    /// Answers the server's CHALLENGE_MESSAGE with the
    /// AUTHENTICATE_MESSAGE.
    pub fn answer(&mut self, challenge: &[u8]) -> Result<Vec<u8>, String> {
        self.step(challenge)
    }

    fn step(&mut self, input: &[u8]) -> Result<Vec<u8>, String> {
        let mut input = [SecurityBuffer::new(input.to_vec(), BufferType::Token)];
        let mut output = [SecurityBuffer::new(Vec::new(), BufferType::Token)];
        let mut builder = self
            .ntlm
            .initialize_security_context()
            .with_credentials_handle(&mut self.creds)
            .with_context_requirements(ClientRequestFlags::ALLOCATE_MEMORY)
            .with_target_data_representation(DataRepresentation::Native)
            .with_input(&mut input)
            .with_output(&mut output);
        self.ntlm
            .initialize_security_context_impl(&mut builder)
            .map_err(|e| e.to_string())?
            .resolve_to_result()
            .map_err(|e| e.to_string())?;
        Ok(std::mem::take(&mut output[0].buffer))
    }
}
