//! The libvirt → HCP error mapping against errors libvirt itself raises, on
//! its in-process test driver (`test:///default`).

use hcp_provider_libvirt::errors::{classify, connection_lost};
use hcp_provider_sdk::ErrorKind;
use virt::connect::Connect;

fn kind_of(e: &virt::error::Error) -> ErrorKind {
    classify(e, "vm x").kind
}

#[test]
fn libvirt_errors_map_to_the_provider_taxonomy() {
    virt::error::clear_error_callback();
    let conn = Connect::open(Some("test:///default")).expect("the test driver needs no daemon");

    let missing = conn.lookup_domain_by_uuid_string("0190b3c6-0000-7000-8000-00000000dead").unwrap_err();
    assert_eq!(kind_of(&missing), ErrorKind::NotFound, "{missing}");
    assert_eq!(classify(&missing, "vm x").message, "vm x not found");
    assert!(!connection_lost(&missing));

    let bad_xml = conn.define_domain_xml("<domain type='test'><name>").unwrap_err();
    assert_eq!(kind_of(&bad_xml), ErrorKind::InvalidArgument, "{bad_xml}");

    let xml = "<domain type='test'><name>hcp-errors</name><memory unit='MiB'>64</memory>\
               <os><type>hvm</type></os></domain>";
    let dom = conn.define_domain_xml(xml).unwrap();
    // Destroying a domain that is not running is not possible in its state.
    let inactive = dom.destroy().unwrap_err();
    assert_eq!(kind_of(&inactive), ErrorKind::InvalidState, "{inactive}");
    assert!(classify(&inactive, "vm x").message.starts_with("vm x: "), "libvirt's words follow the subject");
    dom.undefine().unwrap();
}
