//! The simulator's WS-Management surface with raw envelopes: transport and
//! authentication, the fault shapes for bad classes, selectors, parameters
//! and headers, enumeration contexts, and that each contract breach is
//! recorded as a violation while ordinary "not found" answers are not.

mod common;

use common::*;

#[tokio::test]
async fn bad_credentials_get_401_after_one_request() {
    let (sim, mut c) = start().await;
    c.password = "wrong".into();
    let a = c
        .get("Msvm_ComputerSystem", &[("CreationClassName", "Msvm_ComputerSystem"), ("Name", "HVSIM01")])
        .await;
    assert_eq!(a.status, 401);
    // The schemes the simulated WinRM has enabled.
    let schemes: Vec<&str> =
        a.headers.get_all("www-authenticate").iter().map(|v| v.to_str().unwrap()).collect();
    assert_eq!(schemes, ["Negotiate", "Basic realm=\"WSMAN\""]);
    let stats = sim.sim.stats();
    assert_eq!((stats.requests, stats.unauthorized), (1, 1));
    let no_auth = c
        .raw("POST", "/wsman", &[("content-type", "application/soap+xml;charset=UTF-8".into())], "<x/>")
        .await;
    assert_eq!(no_auth.status, 401);
    assert!(sim.sim.violations().is_empty(), "a 401 is not a contract breach");
}

#[tokio::test]
async fn transport_refuses_other_paths_methods_and_content_types() {
    let (sim, c) = start().await;
    let auth = {
        use base64::Engine;
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("hcp:s3cret"))
    };
    let env = envelope(GET, &format!("{V2}Msvm_ComputerSystem"), &[], "", &new_id());
    let a = c
        .raw("POST", "/wsman", &[("authorization", auth.clone()), ("content-type", "text/xml".into())], &env)
        .await;
    assert_eq!(a.status, 415);
    let a = c.raw("POST", "/other", &[("authorization", auth.clone())], &env).await;
    assert_eq!(a.status, 404);
    let a = c.raw("GET", "/wsman", &[("authorization", auth)], "").await;
    assert_eq!(a.status, 405);
    assert_eq!(sim.sim.violations().len(), 3, "{:?}", sim.sim.violations());
}

#[tokio::test]
async fn get_echoes_the_message_id_and_renders_the_host() {
    let (sim, c) = start().await;
    let id = "uuid:11111111-2222-3333-4444-555555555555";
    let a = c
        .post(&envelope(
            GET,
            &format!("{V2}Msvm_ComputerSystem"),
            &[("CreationClassName", "Msvm_ComputerSystem"), ("Name", "HVSIM01")],
            "",
            id,
        ))
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.headers.get("content-type").unwrap(), "application/soap+xml;charset=UTF-8");
    assert_eq!(a.first("RelatesTo").as_deref(), Some(id));
    assert_eq!(a.first("Action").as_deref(), Some(format!("{GET}Response").as_str()));
    assert_eq!(a.first("Caption").as_deref(), Some("Hosting Computer System"));
    let doc = a.xml();
    let inst = doc
        .descendants()
        .find(|n| n.has_tag_name((format!("{V2}Msvm_ComputerSystem").as_str(), "Msvm_ComputerSystem")))
        .unwrap();
    assert_eq!(
        inst.attribute(("http://www.w3.org/2001/XMLSchema-instance", "type")),
        Some("p:Msvm_ComputerSystem_Type")
    );
    let nil = inst.children().find(|n| n.tag_name().name() == "InstallDate").unwrap();
    assert_eq!(nil.attribute(("http://www.w3.org/2001/XMLSchema-instance", "nil")), Some("true"));
    assert!(sim.sim.violations().is_empty());
}

#[tokio::test]
async fn unknown_class_is_destination_unreachable() {
    let (sim, c) = start().await;
    let a = c.get("Msvm_NoSuchClass", &[("InstanceID", "x")]).await;
    assert_eq!(a.status, 500);
    assert_eq!(a.subcode().as_deref(), Some("a:DestinationUnreachable"));
    assert_eq!(a.wsman_code(), Some(2150858752));
    assert_eq!(a.first("RelatesTo").as_deref(), Some("uuid:0A1B2C3D-0000-0000-0000-000000000001"));
    assert_eq!(a.first("Action").as_deref(), Some("http://schemas.xmlsoap.org/ws/2004/08/addressing/fault"));
    assert_eq!(sim.sim.violations().len(), 1);
}

#[tokio::test]
async fn a_missing_instance_is_not_found_and_no_violation() {
    let (sim, c) = start().await;
    let a = c
        .get(
            "Msvm_ComputerSystem",
            &[("CreationClassName", "Msvm_ComputerSystem"), ("Name", "00000000-0000-0000-0000-000000000000")],
        )
        .await;
    assert_eq!(a.status, 500);
    assert_eq!(a.subcode().as_deref(), Some("a:DestinationUnreachable"));
    assert_eq!(
        a.detail().as_deref(),
        Some("http://schemas.dmtf.org/wbem/wsman/1/wsman/faultDetail/InvalidResourceURI")
    );
    assert_eq!(a.wsman_code(), Some(2150858752));
    assert!(sim.sim.violations().is_empty());
}

#[tokio::test]
async fn bad_selectors_are_invalid_selectors() {
    let (sim, c) = start().await;
    let cs = "Msvm_ComputerSystem";
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("Name", "HVSIM01")], "InsufficientSelectors"),
        (&[("CreationClassName", cs), ("Name", "HVSIM01"), ("Bogus", "1")], "UnexpectedSelectors"),
        (&[("CreationClassName", cs), ("Name", "HVSIM01"), ("Name", "HVSIM01")], "DuplicateSelectors"),
        (
            &[("CreationClassName", cs), ("Name", "HVSIM01"), ("__cimnamespace", "root/virtualization/v2")],
            "UnexpectedSelectors",
        ),
        (&[("creationclassname", cs), ("Name", "HVSIM01")], "UnexpectedSelectors"),
    ];
    for (selectors, detail) in cases {
        let a = c.get(cs, selectors).await;
        assert_eq!(a.status, 500, "{selectors:?}");
        assert_eq!(a.subcode().as_deref(), Some("w:InvalidSelectors"), "{selectors:?}");
        assert!(a.detail().unwrap_or_default().ends_with(detail), "{selectors:?}: {:?}", a.detail());
    }
    assert_eq!(sim.sim.violations().len(), cases.len());
    // The services take CreationClassName alone (one instance matches).
    let a = c.get(VSMS, &[("CreationClassName", VSMS)]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.first("Name").as_deref(), Some("vmms"));
    assert_eq!(sim.sim.violations().len(), cases.len());
}

#[tokio::test]
async fn unknown_must_understand_headers_are_refused() {
    let (sim, c) = start().await;
    let env = envelope(GET, &format!("{V2}{VSMS}"), &[("CreationClassName", VSMS)], "", &new_id()).replace(
        "<w:OperationTimeout>",
        "<x:Surprise xmlns:x=\"urn:x\" s:mustUnderstand=\"true\">1</x:Surprise><y:Fine xmlns:y=\"urn:y\">2</y:Fine><w:OperationTimeout>",
    );
    let a = c.post(&env).await;
    assert_eq!(a.status, 500);
    let doc = a.xml();
    let value = doc.descendants().find(|n| n.has_tag_name((S, "Value"))).and_then(|n| n.text()).unwrap();
    assert_eq!(value, "s:MustUnderstand");
    let nu = doc.descendants().find(|n| n.has_tag_name((S, "NotUnderstood"))).unwrap();
    assert_eq!(nu.attribute("qname"), Some("q:Surprise"));
    assert_eq!(sim.sim.violations().len(), 1);
    let missing = envelope(GET, &format!("{V2}{VSMS}"), &[("CreationClassName", VSMS)], "", &new_id())
        .replace("<a:MessageID>", "<a:Nope>")
        .replace("</a:MessageID>", "</a:Nope>");
    let a = c.post(&missing).await;
    assert_eq!(a.subcode().as_deref(), Some("a:MessageInformationHeaderRequired"));
    let soap11 = envelope(GET, &format!("{V2}{VSMS}"), &[], "", &new_id())
        .replace(S, "http://schemas.xmlsoap.org/soap/envelope/");
    let a = c.post(&soap11).await;
    assert_eq!(a.status, 500);
    assert!(a.body.contains("s:VersionMismatch"), "{}", a.body);
}

#[tokio::test]
async fn unknown_and_mistyped_parameters_are_faults() {
    let (sim, c) = start().await;
    let a = c.service(VSMS, "DefineSystem", "<p:systemSettings>x</p:systemSettings>").await;
    assert_eq!(a.status, 500, "{}", a.body);
    assert_eq!(a.wsman_code(), Some(0x8033_8055));
    let a = c
        .invoke(
            "Msvm_ComputerSystem",
            &[("CreationClassName", "Msvm_ComputerSystem"), ("Name", "HVSIM01")],
            "RequestStateChange",
            "<p:RequestedState>two</p:RequestedState>",
        )
        .await;
    assert_eq!(a.status, 500, "{}", a.body);
    assert_eq!(a.wsman_code(), Some(0x8033_8054));
    let a = c.service(VSMS, "NoSuchMethod", "").await;
    assert_eq!(a.subcode().as_deref(), Some("a:ActionNotSupported"));
    // The body root must be <Method>_INPUT in the class namespace.
    let uri = format!("{V2}{VSMS}");
    let env = envelope(
        &format!("{uri}/DefineSystem"),
        &uri,
        &[("CreationClassName", VSMS)],
        "<p:DefineSystem_INPUT xmlns:p=\"urn:wrong\"/>",
        &new_id(),
    );
    let a = c.post(&env).await;
    assert_eq!(a.subcode().as_deref(), Some("w:SchemaValidationError"));
    // A WS-CIM element tree where CIM-XML text belongs.
    let a = c
        .service(
            VSMS,
            "DefineSystem",
            &format!("<p:SystemSettings><v:Msvm_VirtualSystemSettingData xmlns:v=\"{V2}Msvm_VirtualSystemSettingData\"><v:ElementName>x</v:ElementName></v:Msvm_VirtualSystemSettingData></p:SystemSettings>"),
        )
        .await;
    assert_eq!(a.subcode().as_deref(), Some("w:SchemaValidationError"), "{}", a.body);
    // Missing required input: Invalid Parameter, recorded.
    let a = c.service(VSMS, "DefineSystem", "").await;
    assert_eq!((a.status, a.return_value()), (200, 4));
    // An unknown embedded property: Invalid Parameter, recorded.
    let settings = embedded("Msvm_VirtualSystemSettingData", &[P::S("Colour", "string", "blue")]);
    let a =
        c.service(VSMS, "DefineSystem", &format!("<p:SystemSettings>{settings}</p:SystemSettings>")).await;
    assert_eq!(a.return_value(), 4);
    assert!(sim.sim.vms().is_empty());
    assert_eq!(sim.sim.violations().len(), 7, "{:#?}", sim.sim.violations());
}

#[tokio::test]
async fn enumeration_pages_and_contexts() {
    let (sim, c) = start().await;
    for i in 0..3 {
        let settings =
            embedded("Msvm_VirtualSystemSettingData", &[P::S("ElementName", "string", &format!("hcp-{i}"))]);
        c.expect_done(
            c.service(VSMS, "DefineSystem", &format!("<p:SystemSettings>{settings}</p:SystemSettings>"))
                .await,
        )
        .await;
    }
    let body = "<n:Enumerate><w:OptimizeEnumeration/><w:MaxElements>2</w:MaxElements><w:Filter Dialect=\"http://schemas.microsoft.com/wbem/wsman/1/WQL\">SELECT * FROM Msvm_ComputerSystem WHERE Caption = 'Virtual Machine'</w:Filter></n:Enumerate>";
    let a = c.post(&envelope(ENUMERATE, &format!("{V2}*"), &[], body, &new_id())).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.first("Action").as_deref(), Some(format!("{ENUMERATE}Response").as_str()));
    assert_eq!(a.all("ElementName").len(), 2);
    assert!(a.first("EndOfSequence").is_none());
    let ctx = a.first("EnumerationContext").unwrap();
    // libvirt pulls with the class URI.
    let pull = format!(
        "<n:Pull><n:EnumerationContext>{ctx}</n:EnumerationContext><n:MaxElements>2</n:MaxElements></n:Pull>"
    );
    let p = c.post(&envelope(PULL, &format!("{V2}Msvm_ComputerSystem"), &[], &pull, &new_id())).await;
    assert_eq!(p.status, 200, "{}", p.body);
    assert_eq!(p.all("ElementName").len(), 1);
    assert!(p.first("EndOfSequence").is_some());
    let again = c.post(&envelope(PULL, &format!("{V2}*"), &[], &pull, &new_id())).await;
    assert_eq!(again.status, 500);
    assert_eq!(again.wsman_code(), Some(0x8033_801B));
    // WQL needs .../v2/*; a bad query cannot be processed.
    let on_class =
        c.post(&envelope(ENUMERATE, &format!("{V2}Msvm_ComputerSystem"), &[], body, &new_id())).await;
    assert_eq!(on_class.status, 500);
    let bad = body.replace("Caption =", "Caption ==");
    let a = c.post(&envelope(ENUMERATE, &format!("{V2}*"), &[], &bad, &new_id())).await;
    assert_eq!(a.subcode().as_deref(), Some("w:CannotProcessFilter"));
    assert_eq!(sim.sim.violations().len(), 3, "{:#?}", sim.sim.violations());
}

#[tokio::test]
async fn queries_follow_the_class_hierarchy() {
    let (sim, c) = start().await;
    let settings = embedded(
        "Msvm_VirtualSystemSettingData",
        &[
            P::S("ElementName", "string", "hcp-h"),
            P::S("VirtualSystemSubType", "string", "Microsoft:Hyper-V:SubType:2"),
        ],
    );
    let a = c
        .expect_done(
            c.service(VSMS, "DefineSystem", &format!("<p:SystemSettings>{settings}</p:SystemSettings>"))
                .await,
        )
        .await;
    let guid = a.out_selector("ResultingSystem", "Name").unwrap();
    let vssd = format!("Microsoft:{guid}");
    let assoc = |class: &str| {
        format!(
            "ASSOCIATORS OF {{Msvm_VirtualSystemSettingData.InstanceID='{vssd}'}} WHERE AssocClass = Msvm_VirtualSystemSettingDataComponent ResultClass = {class}"
        )
    };
    assert_eq!(c.query_prop(&assoc("Msvm_ProcessorSettingData"), "VirtualQuantity").await, ["1"]);
    assert_eq!(c.query_prop(&assoc("Msvm_MemorySettingData"), "VirtualQuantity").await, ["512"]);
    assert!(
        c.query_prop(&assoc("Msvm_ResourceAllocationSettingData"), "InstanceID").await.is_empty(),
        "generation 2: no IDE"
    );
    assert_eq!(c.query_prop(&assoc("CIM_ResourceAllocationSettingData"), "InstanceID").await.len(), 2);
    let q = format!(
        "ASSOCIATORS OF {{Msvm_ComputerSystem.CreationClassName='Msvm_ComputerSystem',Name='{guid}'}} WHERE AssocClass = Msvm_SettingsDefineState ResultClass = Msvm_VirtualSystemSettingData"
    );
    assert_eq!(c.query_prop(&q, "InstanceID").await, vec![vssd.clone()]);
    assert!(c.query_prop("SELECT * FROM Msvm_ResourceAllocationSettingData", "InstanceID").await.is_empty());
    assert_eq!(
        c.query_prop(
            "SELECT * FROM Msvm_VirtualEthernetSwitch WHERE ElementName = 'Default Switch'",
            "ElementName"
        )
        .await
        .len(),
        1
    );
    // The association instances themselves, with references as values.
    let a = c.query("SELECT * FROM Msvm_SettingsDefineState").await;
    assert_eq!(a[0].all("ManagedElement").len(), 1, "{}", a[0].body);
    assert!(sim.sim.violations().is_empty(), "{:#?}", sim.sim.violations());
}
