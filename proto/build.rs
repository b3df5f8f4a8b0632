//! Compiles `proto/` with protox (no system protoc) into Rust types and a
//! descriptor set. The descriptor set is written with
//! `encode_file_descriptor_set`, which keeps custom options such as
//! `google.api.http`; the gateway and gRPC reflection read it at run time.

use std::path::PathBuf;

const FILES: &[&str] = &[
    "hcp/common/v1/common.proto",
    "hcp/tenant/v1/tenant.proto",
    "hcp/tenant/v1/webhooks.proto",
    "hcp/ops/v1/ops.proto",
    "hcp/provider/v1/provider.proto",
    "hcp/sim/v1/sim.proto",
    "hcp/console/v1/console.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut compiler = protox::Compiler::new([".", "third_party"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(FILES)?;
    std::fs::write(out_dir.join("hcp_descriptor.bin"), compiler.encode_file_descriptor_set())?;
    for file in compiler.files() {
        if let Some(path) = file.path() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    tonic_prost_build::configure()
        // Messages that carry secrets get a hand-written, redacting Debug.
        .skip_debug([
            "hcp.ops.v1.RegisterProviderRequest",
            "hcp.ops.v1.ProviderTls",
            "hcp.provider.v1.ConfigureRequest",
            "hcp.provider.v1.ConsoleEndpoint",
            "hcp.console.v1.RedeemConsoleRequest",
            "hcp.tenant.v1.CreateWebhookResponse",
        ])
        .build_server(true)
        .build_client(true)
        // `prost::Name` on every message, so `rules::check` finds a
        // request's descriptor by its full name.
        .compile_fds_with_config(compiler.file_descriptor_set(), {
            let mut config = tonic_prost_build::Config::new();
            config.enable_type_names();
            config
        })?;
    Ok(())
}
