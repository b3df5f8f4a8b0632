//! Images through raw WS-Management: a share the host sees
//! (`SimConfig::shares`), a file put there by someone else read as what it
//! is (GetVirtualHardDiskSettingData), and ConvertVirtualHardDisk's
//! refusals, job and result.

mod common;

use common::*;

const SHARE: &str = "\\\\files\\images";
const GIB: u64 = 1 << 30;

/// A simulator with the share `\\files\images` on a fresh directory,
/// removed at the end.
struct Share(std::path::PathBuf);

impl Drop for Share {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn start_with_share() -> (hcp_hyperv_sim::Running, Client, Share) {
    let dir = std::env::temp_dir().join(format!("hcp-hv-sim-share-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let config =
        hcp_hyperv_sim::SimConfig { shares: vec![(SHARE.into(), dir.clone())], ..Default::default() };
    let (sim, c) = start_with(config).await;
    (sim, c, Share(dir))
}

async fn setting_data(c: &Client, path: &str) -> u32 {
    let a = c.service(IMS, "GetVirtualHardDiskSettingData", &format!("<p:Path>{}</p:Path>", esc(path))).await;
    assert_eq!(a.status, 200, "{}", a.body);
    a.return_value()
}

async fn convert(c: &Client, source: &str, path: &str, kind: &str, format: &str) -> Answer {
    let vd = embedded(
        "Msvm_VirtualHardDiskSettingData",
        &[P::S("Path", "string", path), P::S("Type", "uint16", kind), P::S("Format", "uint16", format)],
    );
    c.service(
        IMS,
        "ConvertVirtualHardDisk",
        &format!(
            "<p:SourcePath>{}</p:SourcePath><p:VirtualDiskSettingData>{vd}</p:VirtualDiskSettingData>",
            esc(source)
        ),
    )
    .await
}

#[tokio::test]
async fn files_on_a_share_are_read_as_what_they_are() {
    let (sim, c, share) = start_with_share().await;
    let mut vhdx = b"vhdxfile".to_vec();
    vhdx.resize(4096, 0);
    std::fs::write(share.0.join("good.vhdx"), &vhdx).unwrap();
    std::fs::write(share.0.join("junk.vhdx"), vec![1u8; 4096]).unwrap();
    assert_eq!(setting_data(&c, &format!("{SHARE}\\good.vhdx")).await, 0);
    assert_eq!(setting_data(&c, &format!("{SHARE}\\junk.vhdx")).await, 32768, "not a virtual disk");
    assert_eq!(setting_data(&c, &format!("{SHARE}\\gone.vhdx")).await, 32779);
    std::fs::remove_file(share.0.join("good.vhdx")).unwrap();
    assert_eq!(setting_data(&c, &format!("{SHARE}\\good.vhdx")).await, 32779, "removed by its owner");
    assert!(sim.sim.violations().is_empty(), "{:#?}", sim.sim.violations());
}

#[tokio::test]
async fn convert_virtual_hard_disk_copies_a_disk_onto_the_share_in_a_job() {
    let (sim, c, share) = start_with_share().await;
    let base = "C:\\Hyper-V\\hcp\\base.vhdx";
    let vd = embedded(
        "Msvm_VirtualHardDiskSettingData",
        &[
            P::S("Path", "string", base),
            P::S("Type", "uint16", "3"),
            P::S("Format", "uint16", "3"),
            P::S("MaxInternalSize", "uint64", &GIB.to_string()),
        ],
    );
    c.expect_done(
        c.service(
            IMS,
            "CreateVirtualHardDisk",
            &format!("<p:VirtualDiskSettingData>{vd}</p:VirtualDiskSettingData>"),
        )
        .await,
    )
    .await;
    let target = format!("{SHARE}\\copy.vhdx");

    // Refused at once: a source that is not there, a differencing target
    // type, a path whose extension is not the format's.
    assert_eq!(convert(&c, "C:\\Hyper-V\\hcp\\nope.vhdx", &target, "3", "3").await.return_value(), 32779);
    assert_eq!(convert(&c, base, &target, "4", "3").await.return_value(), 32773);
    assert_eq!(convert(&c, base, &format!("{SHARE}\\copy.vhd"), "3", "3").await.return_value(), 32773);
    assert!(!share.0.join("copy.vhdx").exists());

    // A job makes a standalone dynamic VHDX of the source's size.
    c.expect_done(convert(&c, base, &target, "3", "3").await).await;
    assert_eq!(setting_data(&c, &target).await, 0);
    let made = std::fs::read_to_string(share.0.join("copy.vhdx")).unwrap();
    assert!(made.contains(&format!("\"size\":{GIB}")) && made.contains("\"parent\":null"), "{made}");
    // Again onto the same file: the job fails, the file stays.
    let again = convert(&c, base, &target, "3", "3").await;
    let (state, code, _) = c.wait_job(&again.out_instance_ids("Job").pop().unwrap()).await;
    assert_eq!((state, code), (10, 32768));
    assert_eq!(std::fs::read_to_string(share.0.join("copy.vhdx")).unwrap(), made);
    // Only the deliberately malformed calls were recorded as violations.
    assert_eq!(sim.sim.violations().len(), 1, "{:#?}", sim.sim.violations());
}
