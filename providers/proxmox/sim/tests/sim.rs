//! The simulator itself against the real 9.1.3 schema: it refuses what PVE
//! refuses (unknown or mistyped parameters) with PVE's shapes.

use hcp_proxmox_sim::{SimConfig, schema};

#[test]
fn the_real_schema_refuses_unknown_and_mistyped_parameters() {
    if !schema::present_or_skip("the_real_schema_refuses_unknown_and_mistyped_parameters") {
        return;
    }
    let s = schema::Schema::load(&schema::default_path()).expect("schema beside the repository");
    assert!(s.len() > 400, "{} paths", s.len());
    let r = s.route("/nodes/pve1/qemu/100/status/stop").expect("route");
    assert_eq!(r.template, "/nodes/{node}/qemu/{vmid}/status/stop");
    let mut p = r.vars.clone();
    assert!(s.validate(&r.template, "POST", &p).is_ok());
    p.insert("overrule".into(), "1".into());
    p.insert("timeout".into(), "soon".into());
    let errors = s.validate(&r.template, "POST", &p).unwrap_err();
    assert_eq!(errors.keys().collect::<Vec<_>>(), ["overrule", "timeout"]);
    assert!(errors["overrule"].contains("not defined in schema"));
    let cfg = s.route("/nodes/pve1/qemu/100/config").unwrap();
    let mut p = cfg.vars.clone();
    p.insert("net0".into(), "virtio=AA:BB:CC:DD:EE:FF,bridge=vmbr0".into());
    p.insert("memory".into(), "1024".into());
    p.insert("sshkeys".into(), "ssh-ed25519%20AAAA".into());
    assert!(s.validate(&cfg.template, "PUT", &p).is_ok());
    p.insert("sshkeys".into(), "ssh-ed25519 AAAA".into());
    assert!(s.validate(&cfg.template, "PUT", &p).unwrap_err().contains_key("sshkeys"));
    assert!(s.validate(&cfg.template, "PATCH", &p).is_err());
}

#[tokio::test]
async fn the_simulator_starts_empty_but_for_the_template() {
    if !schema::present_or_skip("the_simulator_starts_empty_but_for_the_template") {
        return;
    }
    let sim = hcp_proxmox_sim::start(SimConfig::default()).await.unwrap();
    assert_eq!(sim.fingerprint.len(), 95);
    assert!(sim.sim.requests().is_empty());
    assert_eq!(sim.sim.vms().len(), 1, "the template");
}

#[test]
fn the_storage_and_drive_parameters_volumes_use_are_checked() {
    if !schema::present_or_skip("the_storage_and_drive_parameters_volumes_use_are_checked") {
        return;
    }
    let s = schema::Schema::load(&schema::default_path()).expect("schema beside the repository");
    let alloc = s.route("/nodes/pve1/storage/local-lvm/content").unwrap();
    let mut p = alloc.vars.clone();
    for (k, v) in
        [("filename", "vm-999999999-hcp-x"), ("size", "4G"), ("vmid", "999999999"), ("format", "raw")]
    {
        p.insert(k.into(), v.into());
    }
    assert!(s.validate(&alloc.template, "POST", &p).is_ok());
    p.insert("size".into(), "4GB".into());
    p.insert("format".into(), "img".into());
    p.insert("notes".into(), "hcp".into());
    let errors = s.validate(&alloc.template, "POST", &p).unwrap_err();
    assert_eq!(errors.keys().collect::<Vec<_>>(), ["format", "notes", "size"]);

    let cfg = s.route("/nodes/pve1/qemu/100/config").unwrap();
    let mut p = cfg.vars.clone();
    p.insert("scsi30".into(), "local-lvm:vm-999999999-hcp-x".into());
    p.insert("delete".into(), "scsi1,unused0".into());
    assert!(s.validate(&cfg.template, "PUT", &p).is_ok());
    p.insert("scsi31".into(), "local-lvm:vm-1-disk-0".into());
    p.insert("scsi2".into(), "vm-1-disk-0,size=4GiB".into());
    let errors = s.validate(&cfg.template, "PUT", &p).unwrap_err();
    assert_eq!(errors.keys().collect::<Vec<_>>(), ["scsi2", "scsi31"], "{errors:?}");

    let resize = s.route("/nodes/pve1/qemu/100/resize").unwrap();
    let mut p = resize.vars.clone();
    p.insert("disk".into(), "scsi31".into());
    p.insert("size".into(), "8G".into());
    assert!(s.validate(&resize.template, "PUT", &p).unwrap_err().contains_key("disk"));
    let free = s.route("/nodes/pve1/storage/local-lvm/content/local-lvm%3Avm-1-disk-0").unwrap();
    assert_eq!(free.vars["volume"], "local-lvm:vm-1-disk-0");
    assert!(s.validate(&free.template, "DELETE", &free.vars).is_ok());
    // The boot volume's copy: `target` and `target_node` pass; `format`
    // and a `target_node` that is no node name do not.
    let mut p = free.vars.clone();
    p.insert("target".into(), "local-lvm:vm-999999999-hcp-x".into());
    p.insert("target_node".into(), "pve1".into());
    assert!(s.validate(&free.template, "POST", &p).is_ok());
    p.insert("format".into(), "raw".into());
    p.insert("target_node".into(), "pve 1".into());
    let errors = s.validate(&free.template, "POST", &p).unwrap_err();
    assert_eq!(errors.keys().collect::<Vec<_>>(), ["format", "target_node"], "{errors:?}");
}
