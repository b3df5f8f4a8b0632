//! A VM's life through raw WS-Management, as WIRE.md's provider drives it:
//! define, disks and a NIC, start, guest shutdown, destroy; checkpoints;
//! and the injected faults.

mod common;

use std::time::Duration;

use common::*;
use hcp_hyperv_sim::{Faults, SimConfig};

const CS: &str = "Msvm_ComputerSystem";

fn cs(guid: &str) -> [(&'static str, String); 2] {
    [("CreationClassName", CS.to_owned()), ("Name", guid.to_owned())]
}

async fn define(c: &Client, name: &str) -> String {
    let settings = embedded(
        "Msvm_VirtualSystemSettingData",
        &[
            P::S("ElementName", "string", name),
            P::A("Notes", "string", vec![format!("hcp-vm-id={name}"), "tenant".into()]),
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

async fn state_change(c: &Client, guid: &str, state: u16) -> Answer {
    let sel = cs(guid);
    let sel: Vec<(&str, &str)> = sel.iter().map(|(k, v)| (*k, v.as_str())).collect();
    c.invoke(CS, &sel, "RequestStateChange", &format!("<p:RequestedState>{state}</p:RequestedState>")).await
}

async fn enabled_state(c: &Client, guid: &str) -> u16 {
    let sel = cs(guid);
    let sel: Vec<(&str, &str)> = sel.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = c.get(CS, &sel).await;
    a.first("EnabledState").and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{}", a.body))
}

async fn wait_state(c: &Client, guid: &str, want: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while enabled_state(c, guid).await != want {
        assert!(tokio::time::Instant::now() < deadline, "{guid} never reached {want}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn create_vhd(c: &Client, path: &str, parent: Option<&str>) {
    let mut props = vec![P::S("Path", "string", path), P::S("Format", "uint16", "3")];
    match parent {
        Some(p) => {
            props.push(P::S("Type", "uint16", "4"));
            props.push(P::S("ParentPath", "string", p));
        }
        None => {
            props.push(P::S("Type", "uint16", "3"));
            props.push(P::S("MaxInternalSize", "uint64", "1073741824"));
        }
    }
    let vd = embedded("Msvm_VirtualHardDiskSettingData", &props);
    c.expect_done(
        c.service(
            IMS,
            "CreateVirtualHardDisk",
            &format!("<p:VirtualDiskSettingData>{vd}</p:VirtualDiskSettingData>"),
        )
        .await,
    )
    .await;
}

#[tokio::test]
async fn define_add_start_shutdown_destroy() {
    let (sim, c) = start().await;
    let guid = define(&c, "hcp-0001").await;
    assert_eq!(guid, guid.to_uppercase());
    let found =
        c.query_prop("SELECT * FROM Msvm_ComputerSystem WHERE ElementName = 'hcp-0001'", "Name").await;
    assert_eq!(found, vec![guid.clone()]);

    // Processor and memory.
    let cpu = format!("Microsoft:{guid}\\b637f346-6a6e-4dec-af52-bd70cb80a21d\\0");
    let ids = c
        .query_prop(
            &format!("ASSOCIATORS OF {{Msvm_VirtualSystemSettingData.InstanceID='Microsoft:{guid}'}} WHERE AssocClass = Msvm_VirtualSystemSettingDataComponent ResultClass = Msvm_ProcessorSettingData"),
            "InstanceID",
        )
        .await;
    assert_eq!(ids, vec![cpu.clone()]);
    let mem = format!("Microsoft:{guid}\\4764334d-e001-4176-82ee-5594ec9b530e");
    let settings = [
        embedded(
            "Msvm_ProcessorSettingData",
            &[P::S("InstanceID", "string", &cpu), P::S("VirtualQuantity", "uint64", "2")],
        ),
        embedded(
            "Msvm_MemorySettingData",
            &[P::S("InstanceID", "string", &mem), P::S("VirtualQuantity", "uint64", "2048")],
        ),
    ];
    let params: String =
        settings.iter().map(|s| format!("<p:ResourceSettings>{s}</p:ResourceSettings>")).collect();
    c.expect_done(c.service(VSMS, "ModifyResourceSettings", &params).await).await;

    // A differencing disk on a base image the test placed.
    std::fs::write(sim.sim.disk_dir().join("base.vhdx"), vec![0u8; 4096]).unwrap();
    create_vhd(&c, "C:\\Hyper-V\\hcp\\hcp-0001.vhdx", Some("C:\\Hyper-V\\hcp\\base.vhdx")).await;
    let rs = c
        .service(
            IMS,
            "ResizeVirtualHardDisk",
            "<p:Path>C:\\Hyper-V\\hcp\\hcp-0001.vhdx</p:Path><p:MaxInternalSize>10737418240</p:MaxInternalSize>",
        )
        .await;
    c.expect_done(rs).await;
    let shrink = c
        .service(
            IMS,
            "ResizeVirtualHardDisk",
            "<p:Path>C:\\Hyper-V\\hcp\\hcp-0001.vhdx</p:Path><p:MaxInternalSize>512</p:MaxInternalSize>",
        )
        .await;
    assert_eq!(shrink.return_value(), 32773);

    // SCSI controller, disk drive, VHD.
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
    let ctrl_path = path("Msvm_ResourceAllocationSettingData", &[("InstanceID", &ctrl)]);
    let drive_settings = embedded(
        "Msvm_ResourceAllocationSettingData",
        &[
            P::S("ResourceType", "uint16", "17"),
            P::S("ResourceSubType", "string", "Microsoft:Hyper-V:Synthetic Disk Drive"),
            P::S("Parent", "string", &ctrl_path),
            P::S("AddressOnParent", "string", "0"),
        ],
    );
    let a = c.expect_done(add(&c, &guid, drive_settings.clone()).await).await;
    let drive = a.out_instance_ids("ResultingResourceSettings").pop().unwrap();
    // The slot is taken now: the job fails.
    let again = add(&c, &guid, drive_settings).await;
    assert_eq!(again.return_value(), 4096);
    let (state, code, _) = c.wait_job(&again.out_instance_ids("Job").pop().unwrap()).await;
    assert_eq!((state, code), (10, 32773));
    let vhd = embedded(
        "Msvm_StorageAllocationSettingData",
        &[
            P::S("ResourceType", "uint16", "31"),
            P::S("ResourceSubType", "string", "Microsoft:Hyper-V:Virtual Hard Disk"),
            P::S("Parent", "string", &path("Msvm_ResourceAllocationSettingData", &[("InstanceID", &drive)])),
            P::A("HostResource", "string", vec!["C:\\Hyper-V\\hcp\\hcp-0001.vhdx".into()]),
        ],
    );
    c.expect_done(add(&c, &guid, vhd).await).await;

    // DVD drive with an ISO that is missing, then present.
    let a = c
        .expect_done(
            add(
                &c,
                &guid,
                embedded(
                    "Msvm_ResourceAllocationSettingData",
                    &[
                        P::S("ResourceType", "uint16", "16"),
                        P::S("ResourceSubType", "string", "Microsoft:Hyper-V:Synthetic DVD Drive"),
                        P::S("Parent", "string", &ctrl_path),
                        P::S("AddressOnParent", "string", "1"),
                    ],
                ),
            )
            .await,
        )
        .await;
    let dvd = a.out_instance_ids("ResultingResourceSettings").pop().unwrap();
    let iso = embedded(
        "Msvm_StorageAllocationSettingData",
        &[
            P::S("ResourceType", "uint16", "31"),
            P::S("ResourceSubType", "string", "Microsoft:Hyper-V:Virtual CD/DVD Disk"),
            P::S("Parent", "string", &path("Msvm_ResourceAllocationSettingData", &[("InstanceID", &dvd)])),
            P::A("HostResource", "string", vec!["C:\\Hyper-V\\hcp\\seed.iso".into()]),
        ],
    );
    let missing = add(&c, &guid, iso.clone()).await;
    let (state, code, _) = c.wait_job(&missing.out_instance_ids("Job").pop().unwrap()).await;
    assert_eq!((state, code), (10, 32779));
    std::fs::write(sim.sim.disk_dir().join("seed.iso"), b"iso").unwrap();
    c.expect_done(add(&c, &guid, iso).await).await;

    // NIC and its connection to the switch.
    let a = c
        .expect_done(
            add(
                &c,
                &guid,
                embedded(
                    "Msvm_SyntheticEthernetPortSettingData",
                    &[
                        P::S("ResourceType", "uint16", "10"),
                        P::S("ResourceSubType", "string", "Microsoft:Hyper-V:Synthetic Ethernet Port"),
                        P::S("ElementName", "string", "nic0"),
                        P::A(
                            "VirtualSystemIdentifiers",
                            "string",
                            vec!["{8D8F1C43-5B49-4C4F-9E37-6C34E28A2E71}".into()],
                        ),
                    ],
                ),
            )
            .await,
        )
        .await;
    let port = a.out_instance_ids("ResultingResourceSettings").pop().unwrap();
    let mac = c
        .query_prop(
            &format!("ASSOCIATORS OF {{Msvm_VirtualSystemSettingData.InstanceID='Microsoft:{guid}'}} WHERE AssocClass = Msvm_VirtualSystemSettingDataComponent ResultClass = Msvm_SyntheticEthernetPortSettingData"),
            "Address",
        )
        .await;
    assert!(mac[0].len() == 12 && mac[0].chars().all(|c| c.is_ascii_hexdigit()), "{mac:?}");
    let switch = c
        .query_prop("SELECT * FROM Msvm_VirtualEthernetSwitch WHERE ElementName = 'Default Switch'", "Name")
        .await;
    let conn = embedded(
        "Msvm_EthernetPortAllocationSettingData",
        &[
            P::S("ResourceType", "uint16", "33"),
            P::S("ResourceSubType", "string", "Microsoft:Hyper-V:Ethernet Connection"),
            P::S(
                "Parent",
                "string",
                &path("Msvm_SyntheticEthernetPortSettingData", &[("InstanceID", &port)]),
            ),
            P::A(
                "HostResource",
                "string",
                vec![path(
                    "Msvm_VirtualEthernetSwitch",
                    &[("CreationClassName", "Msvm_VirtualEthernetSwitch"), ("Name", &switch[0])],
                )],
            ),
        ],
    );
    c.expect_done(add(&c, &guid, conn).await).await;

    let vm = sim.sim.vm("hcp-0001").unwrap();
    assert_eq!((vm.cpus, vm.memory_mb, vm.devices.len(), vm.generation), (2, 2048, 7, 2));

    // No shutdown component while off.
    let sd = format!("SELECT * FROM Msvm_ShutdownComponent WHERE SystemName = '{guid}'");
    assert!(c.query_prop(&sd, "DeviceID").await.is_empty());

    // Start: Starting (10) while the job runs, then Running.
    sim.sim.set_job_duration(Duration::from_secs(2));
    let a = state_change(&c, &guid, 2).await;
    assert_eq!(a.return_value(), 4096);
    assert_eq!(enabled_state(&c, &guid).await, 10);
    assert_eq!(state_change(&c, &guid, 3).await.return_value(), 32775, "busy starting");
    c.expect_done(a).await;
    sim.sim.set_job_duration(Duration::from_millis(20));
    assert_eq!(enabled_state(&c, &guid).await, 2);
    assert_eq!(state_change(&c, &guid, 2).await.return_value(), 32775, "already running");
    // NICs go in only while off.
    let late = add(
        &c,
        &guid,
        embedded(
            "Msvm_SyntheticEthernetPortSettingData",
            &[
                P::S("ResourceType", "uint16", "10"),
                P::S("ResourceSubType", "string", "Microsoft:Hyper-V:Synthetic Ethernet Port"),
            ],
        ),
    )
    .await;
    let (state, code, _) = c.wait_job(&late.out_instance_ids("Job").pop().unwrap()).await;
    assert_eq!((state, code), (10, 32775));
    // Running: no destroy.
    let destroy = format!(
        "<p:AffectedSystem>{}</p:AffectedSystem>",
        epr(CS, &[("CreationClassName", CS), ("Name", &guid)])
    );
    assert_eq!(c.service(VSMS, "DestroySystem", &destroy).await.return_value(), 5);

    // Guest addresses through KVP.
    let kvp = c.query(&format!("SELECT * FROM Msvm_KvpExchangeComponent WHERE SystemName = '{guid}'")).await;
    let items = kvp[0].all("GuestIntrinsicExchangeItems");
    let ip = items.iter().find(|i| i.contains("NetworkAddressIPv4")).expect("an IPv4 item");
    assert!(ip.starts_with("<INSTANCE CLASSNAME=\"Msvm_KvpExchangeDataItem\">"), "{ip}");
    assert!(ip.contains(&sim.sim.vm(&guid).unwrap().guest_ip));

    // Guest shutdown through the shutdown component (four keys).
    let sd_ids = c.query_prop(&sd, "DeviceID").await;
    let sel = [
        ("CreationClassName", "Msvm_ShutdownComponent"),
        ("DeviceID", sd_ids[0].as_str()),
        ("SystemCreationClassName", CS),
        ("SystemName", guid.as_str()),
    ];
    let a = c
        .invoke(
            "Msvm_ShutdownComponent",
            &sel,
            "InitiateShutdown",
            "<p:Force>false</p:Force><p:Reason>hcp stop</p:Reason>",
        )
        .await;
    assert_eq!(a.return_value(), 0, "{}", a.body);
    assert!(a.out_instance_ids("Job").is_empty());
    wait_state(&c, &guid, 3).await;
    assert_eq!(sim.sim.vm(&guid).unwrap().counters.shutdowns, 1);

    // Destroy: the VM and its settings go, the VHD stays.
    c.expect_done(c.service(VSMS, "DestroySystem", &destroy).await).await;
    assert!(
        c.query_prop(
            &format!("SELECT * FROM Msvm_VirtualSystemSettingData WHERE VirtualSystemIdentifier = '{guid}'"),
            "InstanceID"
        )
        .await
        .is_empty()
    );
    assert!(sim.sim.vms().is_empty());
    let files: Vec<String> = sim.sim.files().into_iter().map(|f| f.path).collect();
    assert!(files.contains(&"C:\\Hyper-V\\hcp\\hcp-0001.vhdx".to_owned()), "{files:?}");
    let disk = sim.sim.files().into_iter().find(|f| f.path.ends_with("hcp-0001.vhdx")).unwrap();
    assert_eq!((disk.kind, disk.size), (4, 10737418240));
    assert!(sim.sim.violations().is_empty(), "{:#?}", sim.sim.violations());
}

#[tokio::test]
async fn checkpoints_record_and_restore() {
    let (sim, c) = start().await;
    let guid = define(&c, "hcp-snap").await;
    c.expect_done(state_change(&c, &guid, 2).await).await;
    let vm_ref = epr(CS, &[("CreationClassName", CS), ("Name", &guid)]);
    let a = c
        .service(
            VSSS,
            "CreateSnapshot",
            &format!("<p:AffectedSystem>{vm_ref}</p:AffectedSystem><p:SnapshotSettings></p:SnapshotSettings><p:SnapshotType>2</p:SnapshotType>"),
        )
        .await;
    c.expect_done(a).await;
    let q = format!(
        "SELECT * FROM Msvm_VirtualSystemSettingData WHERE VirtualSystemIdentifier = '{guid}' AND VirtualSystemType = 'Microsoft:Hyper-V:Snapshot:Realized'"
    );
    let snaps = c.query_prop(&q, "InstanceID").await;
    assert_eq!(snaps.len(), 1);
    let rename = embedded(
        "Msvm_VirtualSystemSettingData",
        &[P::S("InstanceID", "string", &snaps[0]), P::S("ElementName", "string", "hcp-snap-1")],
    );
    c.expect_done(
        c.service(VSMS, "ModifySystemSettings", &format!("<p:SystemSettings>{rename}</p:SystemSettings>"))
            .await,
    )
    .await;
    assert_eq!(c.query_prop(&q, "ElementName").await, ["hcp-snap-1"]);
    let snap_ref = epr("Msvm_VirtualSystemSettingData", &[("InstanceID", &snaps[0])]);
    // Applying while running: always 4096, the job fails on the state.
    let a = c.service(VSSS, "ApplySnapshot", &format!("<p:Snapshot>{snap_ref}</p:Snapshot>")).await;
    assert_eq!(a.return_value(), 4096);
    let (state, code, _) = c.wait_job(&a.out_instance_ids("Job").pop().unwrap()).await;
    assert_eq!((state, code), (10, 32775));
    c.expect_done(state_change(&c, &guid, 3).await).await;
    // Change the VM, then apply: settings back, and saved (taken running).
    let cpu = format!("Microsoft:{guid}\\b637f346-6a6e-4dec-af52-bd70cb80a21d\\0");
    let s = embedded(
        "Msvm_ProcessorSettingData",
        &[P::S("InstanceID", "string", &cpu), P::S("VirtualQuantity", "uint64", "4")],
    );
    c.expect_done(
        c.service(VSMS, "ModifyResourceSettings", &format!("<p:ResourceSettings>{s}</p:ResourceSettings>"))
            .await,
    )
    .await;
    assert_eq!(sim.sim.vm(&guid).unwrap().cpus, 4);
    c.expect_done(c.service(VSSS, "ApplySnapshot", &format!("<p:Snapshot>{snap_ref}</p:Snapshot>")).await)
        .await;
    let vm = sim.sim.vm(&guid).unwrap();
    assert_eq!((vm.cpus, vm.state), (1, 6));
    c.expect_done(
        c.service(VSSS, "DestroySnapshot", &format!("<p:AffectedSnapshot>{snap_ref}</p:AffectedSnapshot>"))
            .await,
    )
    .await;
    assert!(c.query_prop(&q, "InstanceID").await.is_empty());
    // A checkpoint is no VM: DestroySnapshot of the VM's own settings is refused.
    let own = epr("Msvm_VirtualSystemSettingData", &[("InstanceID", &format!("Microsoft:{guid}"))]);
    assert_eq!(
        c.service(VSSS, "DestroySnapshot", &format!("<p:AffectedSnapshot>{own}</p:AffectedSnapshot>"))
            .await
            .return_value(),
        4
    );
    assert_eq!(sim.sim.violations().len(), 1, "{:#?}", sim.sim.violations());
}

#[tokio::test]
async fn injected_faults() {
    let (sim, c) =
        start_with(SimConfig { job_retention: Duration::from_millis(300), ..Default::default() }).await;
    // The next DefineSystem job fails: the VM is gone again.
    sim.sim.set_faults(Faults {
        job_failures: [("DefineSystem".to_owned(), "The operation failed: disk full".to_owned())].into(),
        in_use: [("RequestStateChange".to_owned(), 2)].into(),
        ..Default::default()
    });
    let settings = embedded("Msvm_VirtualSystemSettingData", &[P::S("ElementName", "string", "hcp-f")]);
    let a =
        c.service(VSMS, "DefineSystem", &format!("<p:SystemSettings>{settings}</p:SystemSettings>")).await;
    let job = a.out_instance_ids("Job").pop().unwrap();
    assert_eq!(c.wait_job(&job).await, (10, 32768, "The operation failed: disk full".to_owned()));
    assert!(sim.sim.vms().is_empty());
    // Jobs vanish after their retention (300 ms here).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let a = c.get("Msvm_ConcreteJob", &[("InstanceID", &job)]).await;
        if a.status == 500 {
            assert_eq!(a.subcode().as_deref(), Some("a:DestinationUnreachable"));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the job never went away");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // In use twice, then it works.
    let guid = define(&c, "hcp-g").await;
    assert_eq!(state_change(&c, &guid, 2).await.return_value(), 32774);
    assert_eq!(state_change(&c, &guid, 2).await.return_value(), 32774);
    c.expect_done(state_change(&c, &guid, 2).await).await;

    // The guest ignores shutdown.
    sim.sim.set_faults(Faults { guest_ignores_shutdown: true, ..Default::default() });
    let sd = c
        .query_prop(&format!("SELECT * FROM Msvm_ShutdownComponent WHERE SystemName = '{guid}'"), "DeviceID")
        .await;
    let sel = [
        ("CreationClassName", "Msvm_ShutdownComponent"),
        ("DeviceID", sd[0].as_str()),
        ("SystemCreationClassName", CS),
        ("SystemName", guid.as_str()),
    ];
    let shutdown = "<p:Force>false</p:Force><p:Reason>hcp</p:Reason>";
    assert_eq!(
        c.invoke("Msvm_ShutdownComponent", &sel, "InitiateShutdown", shutdown).await.return_value(),
        0
    );
    assert_eq!(
        c.invoke("Msvm_ShutdownComponent", &sel, "InitiateShutdown", shutdown).await.return_value(),
        32782
    );
    assert!(sim.sim.settle(Duration::from_secs(5)).await);
    assert_eq!(enabled_state(&c, &guid).await, 2);
    c.expect_done(state_change(&c, &guid, 3).await).await;

    // A VM without integration services has no shutdown component.
    sim.sim.set_faults(Faults { no_shutdown_component: true, ..Default::default() });
    let bare = define(&c, "hcp-bare").await;
    c.expect_done(state_change(&c, &bare, 2).await).await;
    assert!(
        c.query_prop(
            &format!("SELECT * FROM Msvm_ShutdownComponent WHERE SystemName = '{bare}'"),
            "DeviceID"
        )
        .await
        .is_empty()
    );
    let kvp = c.query(&format!("SELECT * FROM Msvm_KvpExchangeComponent WHERE SystemName = '{bare}'")).await;
    assert!(!kvp[0].body.contains("NetworkAddressIPv4"));
    assert!(sim.sim.violations().is_empty(), "{:#?}", sim.sim.violations());
}
