//! Volumes through raw WS-Management, as WIRE.md's "Volumes" section has
//! the provider drive them: a dynamic VHDX made, read back
//! (GetVirtualHardDiskSettingData) and listed (`CIM_DataFile` in
//! root/cimv2), hot-added to a running VM's SCSI controller at a chosen
//! location, grown online, refused deletion while open, removed, deleted.

mod common;

use std::time::Duration;

use common::*;

const CS: &str = "Msvm_ComputerSystem";
const VOL: &str = "C:\\Hyper-V\\hcp\\volumes\\hcp-vol-1.vhdx";
const GIB: u64 = 1 << 30;

async fn define(c: &Client, name: &str) -> String {
    let settings = embedded(
        "Msvm_VirtualSystemSettingData",
        &[
            P::S("ElementName", "string", name),
            P::S("VirtualSystemSubType", "string", "Microsoft:Hyper-V:SubType:2"),
        ],
    );
    let a = c
        .expect_done(
            c.service(VSMS, "DefineSystem", &format!("<p:SystemSettings>{settings}</p:SystemSettings>"))
                .await,
        )
        .await;
    a.out_selector("ResultingSystem", "Name").expect("ResultingSystem")
}

async fn add(c: &Client, guid: &str, settings: String) -> Answer {
    let params = format!(
        "<p:AffectedConfiguration>{}</p:AffectedConfiguration><p:ResourceSettings>{settings}</p:ResourceSettings>",
        epr("Msvm_VirtualSystemSettingData", &[("InstanceID", &format!("Microsoft:{guid}"))])
    );
    c.service(VSMS, "AddResourceSettings", &params).await
}

async fn create_vhd(c: &Client, path: &str, format: &str, size: u64) -> Answer {
    let vd = embedded(
        "Msvm_VirtualHardDiskSettingData",
        &[
            P::S("Path", "string", path),
            P::S("Type", "uint16", "3"),
            P::S("Format", "uint16", format),
            P::S("MaxInternalSize", "uint64", &size.to_string()),
        ],
    );
    c.service(
        IMS,
        "CreateVirtualHardDisk",
        &format!("<p:VirtualDiskSettingData>{vd}</p:VirtualDiskSettingData>"),
    )
    .await
}

async fn resize(c: &Client, path: &str, size: u64) -> Answer {
    c.service(
        IMS,
        "ResizeVirtualHardDisk",
        &format!("<p:Path>{}</p:Path><p:MaxInternalSize>{size}</p:MaxInternalSize>", esc(path)),
    )
    .await
}

/// GetVirtualHardDiskSettingData: (ReturnValue, the embedded instance's
/// `MaxInternalSize`, `Type`, `Format`).
async fn vhd_data(c: &Client, path: &str) -> (u32, Option<(u64, u16, u16)>) {
    let a = c.service(IMS, "GetVirtualHardDiskSettingData", &format!("<p:Path>{}</p:Path>", esc(path))).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let rv = a.return_value();
    let data = a.first("SettingData").filter(|t| !t.is_empty()).map(|text| {
        let doc = roxmltree::Document::parse(&text).expect("CIM-XML");
        assert_eq!(doc.root_element().attribute("CLASSNAME"), Some("Msvm_VirtualHardDiskSettingData"));
        let prop = |name: &str| -> String {
            doc.descendants()
                .find(|n| n.has_tag_name("PROPERTY") && n.attribute("NAME") == Some(name))
                .and_then(|n| n.children().find(|v| v.has_tag_name("VALUE")))
                .and_then(|v| v.text())
                .unwrap_or_default()
                .to_owned()
        };
        (
            prop("MaxInternalSize").parse().unwrap_or(0),
            prop("Type").parse().unwrap_or(0),
            prop("Format").parse().unwrap_or(0),
        )
    });
    (rv, data)
}

async fn files(c: &Client) -> Vec<String> {
    c.query_in(
        CIMV2,
        "SELECT * FROM CIM_DataFile WHERE Drive = 'C:' AND Path = '\\\\hyper-v\\\\hcp\\\\volumes\\\\' AND Extension = 'vhdx'",
    )
    .await
    .iter()
    .flat_map(|a| a.all("Name"))
    .collect()
}

async fn delete_file(c: &Client, name: &str) -> Answer {
    c.invoke_in(CIMV2, "CIM_DataFile", &[("Name", name)], "Delete", "").await
}

async fn wait_running(c: &Client, guid: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let a = c.get(CS, &[("CreationClassName", CS), ("Name", guid)]).await;
        if a.first("EnabledState").as_deref() == Some("2") {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{guid} never ran");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_volume_is_made_listed_hot_added_grown_removed_and_deleted() {
    let (sim, c) = start().await;

    // A dynamic VHDX of 1 GiB; its directory is created.
    c.expect_done(create_vhd(&c, VOL, "3", GIB).await).await;
    assert_eq!(vhd_data(&c, VOL).await, (0, Some((GIB, 3, 3))));
    // Made twice: the job fails, the file is not touched.
    let again = create_vhd(&c, VOL, "3", 2 * GIB).await;
    let (state, code, _) = c.wait_job(&again.out_instance_ids("Job").pop().unwrap()).await;
    assert_eq!((state, code), (10, 32768));
    assert_eq!(vhd_data(&c, VOL).await.1, Some((GIB, 3, 3)));
    // A file that is not there: 32779, no setting data.
    assert_eq!(vhd_data(&c, "C:\\Hyper-V\\hcp\\volumes\\nope.vhdx").await, (32779, None));

    // root/cimv2 lists it as WMI's file provider names files.
    assert_eq!(files(&c).await, vec![VOL.to_ascii_lowercase()]);
    let got = c
        .post(&envelope(
            GET,
            &format!("{CIMV2}CIM_DataFile"),
            &[("Name", &VOL.to_ascii_lowercase())],
            "",
            &new_id(),
        ))
        .await;
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(got.first("FileName").as_deref(), Some("hcp-vol-1"));
    assert_eq!(got.first("Path").as_deref(), Some("\\hyper-v\\hcp\\volumes\\"));

    // A running VM with a SCSI controller (added while off).
    let guid = define(&c, "hcp-vol-vm").await;
    let a = c
        .expect_done(
            add(
                &c,
                &guid,
                embedded(
                    "Msvm_ResourceAllocationSettingData",
                    &[
                        P::S("ResourceType", "uint16", "6"),
                        P::S("ResourceSubType", "string", "Microsoft:Hyper-V:Synthetic SCSI Controller"),
                    ],
                ),
            )
            .await,
        )
        .await;
    let ctrl = a.out_instance_ids("ResultingResourceSettings").pop().unwrap();
    c.expect_done(
        c.invoke(
            CS,
            &[("CreationClassName", CS), ("Name", &guid)],
            "RequestStateChange",
            "<p:RequestedState>2</p:RequestedState>",
        )
        .await,
    )
    .await;
    wait_running(&c, &guid).await;

    // Hot add: a disk drive at location 3, then the VHDX in it.
    let a = c
        .expect_done(
            add(
                &c,
                &guid,
                embedded(
                    "Msvm_ResourceAllocationSettingData",
                    &[
                        P::S("ResourceType", "uint16", "17"),
                        P::S("ResourceSubType", "string", "Microsoft:Hyper-V:Synthetic Disk Drive"),
                        P::S(
                            "Parent",
                            "string",
                            &path("Msvm_ResourceAllocationSettingData", &[("InstanceID", &ctrl)]),
                        ),
                        P::S("AddressOnParent", "string", "3"),
                    ],
                ),
            )
            .await,
        )
        .await;
    let drive = a.out_instance_ids("ResultingResourceSettings").pop().unwrap();
    assert_eq!(drive, format!("{ctrl}\\3\\0\\D"));
    c.expect_done(
        add(
            &c,
            &guid,
            embedded(
                "Msvm_StorageAllocationSettingData",
                &[
                    P::S("ResourceType", "uint16", "31"),
                    P::S("ResourceSubType", "string", "Microsoft:Hyper-V:Virtual Hard Disk"),
                    P::S(
                        "Parent",
                        "string",
                        &path("Msvm_ResourceAllocationSettingData", &[("InstanceID", &drive)]),
                    ),
                    P::A("HostResource", "string", vec![VOL.into()]),
                ],
            ),
        )
        .await,
    )
    .await;
    let attached = c
        .query_prop(
            &format!(
                "ASSOCIATORS OF {{Msvm_VirtualSystemSettingData.InstanceID='Microsoft:{guid}'}} WHERE AssocClass = Msvm_VirtualSystemSettingDataComponent ResultClass = Msvm_StorageAllocationSettingData"
            ),
            "HostResource",
        )
        .await;
    assert_eq!(attached, vec![VOL.to_owned()]);

    // Grown while the VM runs (a VHDX on SCSI); shrinking stays refused.
    c.expect_done(resize(&c, VOL, 3 * GIB).await).await;
    assert_eq!(vhd_data(&c, VOL).await.1, Some((3 * GIB, 3, 3)));
    assert_eq!(resize(&c, VOL, GIB).await.return_value(), 32773);

    // The running VM holds the file open: a sharing violation.
    assert_eq!(delete_file(&c, &VOL.to_ascii_lowercase()).await.return_value(), 15);

    // Hot remove of the drive takes the VHDX out with it; the file stays.
    c.expect_done(
        c.service(
            VSMS,
            "RemoveResourceSettings",
            &format!(
                "<p:ResourceSettings>{}</p:ResourceSettings>",
                epr("Msvm_ResourceAllocationSettingData", &[("InstanceID", &drive)])
            ),
        )
        .await,
    )
    .await;
    let attached = c
        .query(&format!(
            "ASSOCIATORS OF {{Msvm_VirtualSystemSettingData.InstanceID='Microsoft:{guid}'}} WHERE AssocClass = Msvm_VirtualSystemSettingDataComponent ResultClass = Msvm_StorageAllocationSettingData"
        ))
        .await;
    assert!(attached.iter().all(|a| a.all("HostResource").is_empty()));
    assert_eq!(files(&c).await.len(), 1);

    // Deleted: gone from the listing, and a second Delete finds nothing.
    let del = delete_file(&c, &VOL.to_ascii_lowercase()).await;
    assert_eq!((del.status, del.return_value()), (200, 0), "{}", del.body);
    assert!(files(&c).await.is_empty());
    assert!(!sim.sim.disk_dir().join("volumes").join("hcp-vol-1.vhdx").exists());
    let gone = delete_file(&c, &VOL.to_ascii_lowercase()).await;
    assert_eq!(gone.status, 500);
    assert_eq!(gone.subcode().as_deref(), Some("a:DestinationUnreachable"));

    assert!(sim.sim.violations().is_empty(), "{:#?}", sim.sim.violations());
}

#[tokio::test]
async fn a_vhd_in_a_running_vm_does_not_resize_and_namespaces_do_not_mix() {
    let (sim, c) = start().await;
    let vhd = "C:\\Hyper-V\\hcp\\volumes\\old.vhd";
    c.expect_done(create_vhd(&c, vhd, "2", GIB).await).await;
    let guid = define(&c, "hcp-vhd-vm").await;
    let a = c
        .expect_done(
            add(
                &c,
                &guid,
                embedded(
                    "Msvm_ResourceAllocationSettingData",
                    &[
                        P::S("ResourceType", "uint16", "6"),
                        P::S("ResourceSubType", "string", "Microsoft:Hyper-V:Synthetic SCSI Controller"),
                    ],
                ),
            )
            .await,
        )
        .await;
    let ctrl = a.out_instance_ids("ResultingResourceSettings").pop().unwrap();
    let a = c
        .expect_done(
            add(
                &c,
                &guid,
                embedded(
                    "Msvm_ResourceAllocationSettingData",
                    &[
                        P::S("ResourceType", "uint16", "17"),
                        P::S("ResourceSubType", "string", "Microsoft:Hyper-V:Synthetic Disk Drive"),
                        P::S(
                            "Parent",
                            "string",
                            &path("Msvm_ResourceAllocationSettingData", &[("InstanceID", &ctrl)]),
                        ),
                        P::S("AddressOnParent", "string", "1"),
                    ],
                ),
            )
            .await,
        )
        .await;
    let drive = a.out_instance_ids("ResultingResourceSettings").pop().unwrap();
    c.expect_done(
        add(
            &c,
            &guid,
            embedded(
                "Msvm_StorageAllocationSettingData",
                &[
                    P::S("ResourceType", "uint16", "31"),
                    P::S("ResourceSubType", "string", "Microsoft:Hyper-V:Virtual Hard Disk"),
                    P::S(
                        "Parent",
                        "string",
                        &path("Msvm_ResourceAllocationSettingData", &[("InstanceID", &drive)]),
                    ),
                    P::A("HostResource", "string", vec![vhd.into()]),
                ],
            ),
        )
        .await,
    )
    .await;
    // Stopped: it grows; running: only a VHDX would (32775).
    c.expect_done(resize(&c, vhd, 2 * GIB).await).await;
    c.expect_done(
        c.invoke(
            CS,
            &[("CreationClassName", CS), ("Name", &guid)],
            "RequestStateChange",
            "<p:RequestedState>2</p:RequestedState>",
        )
        .await,
    )
    .await;
    wait_running(&c, &guid).await;
    assert_eq!(resize(&c, vhd, 3 * GIB).await.return_value(), 32775);
    assert_eq!(vhd_data(&c, vhd).await.1, Some((2 * GIB, 3, 2)));

    // CIM_DataFile is not a root/virtualization/v2 class, and v2 classes
    // are not in root/cimv2: both are refused as violations.
    let bad = c
        .post(&envelope(
            ENUMERATE,
            &format!("{V2}*"),
            &[],
            "<n:Enumerate><w:Filter Dialect=\"http://schemas.microsoft.com/wbem/wsman/1/WQL\">SELECT * FROM CIM_DataFile</w:Filter></n:Enumerate>",
            &new_id(),
        ))
        .await;
    assert_eq!(bad.subcode().as_deref(), Some("w:CannotProcessFilter"));
    let bad = c
        .post(&envelope(GET, &format!("{CIMV2}Msvm_ComputerSystem"), &[("Name", &guid)], "", &new_id()))
        .await;
    assert_eq!(bad.subcode().as_deref(), Some("a:DestinationUnreachable"));
    // A path outside the host's disks: Invalid Parameter and a violation.
    assert_eq!(vhd_data(&c, "D:\\elsewhere.vhdx").await, (32773, None));
    assert_eq!(sim.sim.violations().len(), 3, "{:#?}", sim.sim.violations());
}
