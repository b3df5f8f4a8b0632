//! Placement: which provider and which host get a VM.
//!
//! A candidate provider is registered in the requested zone (any zone when
//! none is given), healthy, and has every capability the request needs. Its
//! hosts are those it reports (a provider that reports none counts as one
//! host of unknown size). A candidate host is UP, not drained by HCP, has
//! room for the VM (its capacity times the zone's overcommit ratios, less
//! what HCP placed there) and keeps the VM's placement group's rule.
//! Candidates are ranked by the group's preference (soft groups), then by
//! the zone's policy (`spread`: the least-loaded host first; `pack`: the
//! fullest first), then by provider load and name.
//!
//! The outcome is decided before any job exists: no candidate with the
//! capability is FEATURE_NOT_SUPPORTED naming it; no healthy provider or no
//! host in service is PROVIDER_UNAVAILABLE; no host with room, or none a
//! strict group allows, is CONFLICT saying which. A strict group's rule is
//! checked again inside the accepting transaction (`store::check_group!`),
//! so concurrent creates cannot break it; the caller tries the next
//! candidate when that check refuses one.

use std::collections::HashMap;

use hcp_proto::error::{ApiError, ErrorCode};
use hcp_proto::ids::{ProviderId, VmId};

use crate::error::from_store;
use crate::lifecycle::Capability;
use crate::model::{
    Drain, GroupPolicy, Host, HostLoad, HostState, PlacementGroup, PlacementPolicy, Provider, ZonePlacement,
};
use crate::store::{CapacityGuard, Catalog, GroupGuard, Member, Store};

/// What a VM needs from placement.
#[derive(Debug, Clone, Default)]
pub struct Request<'a> {
    /// The requested zone.
    pub zone: Option<&'a str>,
    /// Zones allowed when none is requested (those with the VM's networks).
    pub zones: Option<&'a [String]>,
    /// Capability flags.
    pub needs: &'a [Capability],
    /// The VM's size.
    pub vcpus: u32,
    /// The VM's memory.
    pub memory_mib: u32,
    /// Its placement group, with where the group's members are.
    pub group: Option<(&'a PlacementGroup, &'a [Member])>,
    /// A move: stay on this provider.
    pub provider: Option<ProviderId>,
    /// A move: the VM that moves (not counted as a member) and its host.
    pub moving: Option<(VmId, &'a str)>,
    /// Only this host (an operator named the target).
    pub host: Option<&'a str>,
}

/// A place for a VM.
#[derive(Debug, Clone)]
pub struct Choice {
    /// The provider.
    pub provider: Provider,
    /// The host; empty for a provider that reports none.
    pub host: String,
    /// The host's room, which the accepting transaction checks again under
    /// the host's lock; `None` for a provider that reports no hosts.
    pub capacity: Option<CapacityGuard>,
}

impl Request<'_> {
    /// The rule the accepting transaction checks again, for a strict group.
    pub fn guard(&self) -> Option<GroupGuard> {
        self.group.filter(|(g, _)| g.strict).map(|(g, _)| GroupGuard { group_id: g.id, policy: g.policy })
    }
}

/// Picks a provider for a VM (the first candidate).
pub async fn choose(
    store: &Store,
    zone: Option<&str>,
    zones: Option<&[String]>,
    needs: &[Capability],
) -> Result<Provider, ApiError> {
    let req = Request { zone, zones, needs, ..Request::default() };
    Ok(candidates(store, &req).await?.remove(0).provider)
}

/// The room of the host `vm` is on, for a resize that grows it; `None`
/// when its provider reports no such host (a host of unknown size).
pub async fn room_of(store: &Store, vm: &crate::model::Vm) -> Result<Option<CapacityGuard>, ApiError> {
    let catalog = store.catalog().await.map_err(|e| from_store(e, "hosts"))?;
    let Some(host) = catalog.hosts.iter().find(|h| h.provider_id == vm.provider_id && h.name == vm.host)
    else {
        return Ok(None);
    };
    let settings =
        catalog.placement.get(&vm.zone).cloned().unwrap_or_else(|| ZonePlacement::defaults(&vm.zone));
    Ok(Some(CapacityGuard {
        provider_id: host.provider_id,
        host: host.name.clone(),
        room: settings.room_of(host),
    }))
}

/// Every place the VM may go, best first (never empty). Ranked on the
/// in-memory catalog and host loads; a refusal is only given after the same
/// question was asked of the database, so a provider or host registered a
/// moment ago in another process is never missed, nor the room a VM
/// deleted a moment ago left.
pub async fn candidates(store: &Store, req: &Request<'_>) -> Result<Vec<Choice>, ApiError> {
    let catalog = store.catalog().await.map_err(|e| from_store(e, "providers"))?;
    let loads = store.placed_loads().await.map_err(|e| from_store(e, "hosts"))?;
    match candidates_in(&catalog, &loads, req) {
        Err(_) => {
            let fresh = if store.catalog_cached() {
                std::sync::Arc::new(store.catalog_uncached().await.map_err(|e| from_store(e, "providers"))?)
            } else {
                catalog
            };
            let loads = store.placed_loads_now().await.map_err(|e| from_store(e, "hosts"))?;
            candidates_in(&fresh, &loads, req)
        }
        r => r,
    }
}

fn candidates_in(
    catalog: &Catalog,
    loads: &crate::store::Loads,
    req: &Request<'_>,
) -> Result<Vec<Choice>, ApiError> {
    let in_zone: Vec<&Provider> = catalog
        .providers
        .iter()
        .filter(|p| req.zone.is_none_or(|z| p.zone == z))
        .filter(|p| req.zones.is_none_or(|zs| zs.contains(&p.zone)))
        .filter(|p| req.provider.is_none_or(|id| p.id == id))
        .collect();
    let healthy: Vec<&Provider> = in_zone.iter().copied().filter(|p| p.healthy).collect();
    if healthy.is_empty() {
        let where_ = req.zone.map(|z| format!("zone {z}")).unwrap_or_else(|| "any zone".to_owned());
        return Err(ApiError::new(
            ErrorCode::ProviderUnavailable,
            format!("no healthy provider in {where_}; retry later"),
        ));
    }
    let mut capable = healthy.clone();
    for &need in req.needs {
        capable.retain(|p| need.of(&p.capabilities));
        if capable.is_empty() {
            return Err(ApiError::feature_not_supported(
                need.flag(),
                format!("no provider for this request supports {need}"),
            ));
        }
    }
    let hosts = &catalog.hosts;
    let mut settings: HashMap<String, ZonePlacement> = HashMap::new();
    for p in &capable {
        if !settings.contains_key(&p.zone) {
            let s =
                catalog.placement.get(&p.zone).cloned().unwrap_or_else(|| ZonePlacement::defaults(&p.zone));
            settings.insert(p.zone.clone(), s);
        }
    }
    let mut slots = Vec::new();
    for p in capable {
        let mut own: Vec<&Host> = hosts.iter().filter(|h| h.provider_id == p.id).collect();
        let provider_load: u32 = loads.iter().filter(|((id, _), _)| *id == p.id).map(|(_, l)| l.vms).sum();
        if own.is_empty() {
            slots.push(Slot {
                provider: p,
                host: None,
                load: loads.get(&(p.id, String::new())).copied().unwrap_or_default(),
                provider_load,
                settings: &settings[&p.zone],
            });
            continue;
        }
        own.sort_by(|a, b| a.name.cmp(&b.name));
        for h in own {
            slots.push(Slot {
                provider: p,
                host: Some(h),
                load: loads.get(&(p.id, h.name.clone())).copied().unwrap_or_default(),
                provider_load,
                settings: &settings[&p.zone],
            });
        }
    }
    rank(slots, req)
}

/// One host of a capable provider, with what is placed on it.
#[derive(Debug, Clone)]
struct Slot<'a> {
    provider: &'a Provider,
    /// `None`: the provider reports no hosts.
    host: Option<&'a Host>,
    load: HostLoad,
    provider_load: u32,
    settings: &'a ZonePlacement,
}

impl Slot<'_> {
    fn name(&self) -> &str {
        self.host.map(|h| h.name.as_str()).unwrap_or("")
    }

    /// Whether the host has room for the VM; a host of unknown size has.
    fn has_room(&self, vcpus: u32, memory_mib: u32) -> bool {
        self.host.is_none_or(|h| {
            self.settings.room_of(h).admits(
                (self.load.vcpus, self.load.memory_mib),
                u64::from(vcpus),
                u64::from(memory_mib),
            )
        })
    }

    fn choice(&self) -> Choice {
        Choice {
            provider: self.provider.clone(),
            host: self.name().to_owned(),
            capacity: self.host.map(|h| CapacityGuard {
                provider_id: h.provider_id,
                host: h.name.clone(),
                room: self.settings.room_of(h),
            }),
        }
    }

    /// How full the host would be with the VM (the larger of the vCPU and
    /// memory fractions); 0 for a host of unknown size.
    fn fill(&self, vcpus: u32, memory_mib: u32) -> f64 {
        let Some(h) = self.host else { return 0.0 };
        let cpu = (self.load.vcpus + u64::from(vcpus)) as f64
            / (f64::from(h.vcpus) * self.settings.cpu_overcommit).max(1.0);
        let mem = (self.load.memory_mib + u64::from(memory_mib)) as f64
            / (h.memory_mib as f64 * self.settings.memory_overcommit).max(1.0);
        cpu.max(mem)
    }
}

/// Filters and orders the slots; the errors say what ruled the last ones out.
fn rank(slots: Vec<Slot<'_>>, req: &Request<'_>) -> Result<Vec<Choice>, ApiError> {
    let (moving_vm, moving_from) = match req.moving {
        Some((vm, host)) => (Some(vm), Some(host)),
        None => (None, None),
    };
    let mut slots: Vec<Slot<'_>> = slots
        .into_iter()
        .filter(|s| req.host.is_none_or(|h| s.name() == h))
        .filter(|s| moving_from.is_none_or(|from| s.name() != from))
        .collect();
    if slots.is_empty() {
        return Err(match (req.host, moving_from) {
            (Some(h), Some(from)) if h == from => {
                ApiError::invalid_field("target_host", format!("the vm is already on host {h}"))
            }
            (Some(h), _) => ApiError::invalid_field("target_host", format!("the provider has no host {h}")),
            (None, _) => {
                ApiError::new(ErrorCode::Conflict, "the provider has no other host to move the vm to")
                    .with_detail("reason", "no_host")
            }
        });
    }
    // A host that is down may come back: retry later (503). Hosts an
    // operator took out of service (drained, in maintenance) are a state
    // of the fleet, not an outage: a conflict saying so.
    let any_down = slots.iter().any(|s| s.host.is_some_and(|h| h.state == HostState::Down));
    slots.retain(|s| s.host.is_none_or(|h| h.state == HostState::Up && h.drain == Drain::InService));
    if slots.is_empty() {
        return Err(if any_down {
            ApiError::new(
                ErrorCode::ProviderUnavailable,
                "no host in service can take the vm (hosts are down); retry later",
            )
            .with_detail(crate::error::DETAIL_RETRY_AFTER, "30")
        } else {
            ApiError::new(
                ErrorCode::Conflict,
                "no host in service can take the vm (its hosts are drained or in maintenance)",
            )
            .with_detail("reason", "no_host_in_service")
        });
    }
    slots.retain(|s| s.has_room(req.vcpus, req.memory_mib));
    if slots.is_empty() {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "no host has room for {} vCPUs and {} MiB (capacity times the zone's overcommit ratios)",
                req.vcpus, req.memory_mib
            ),
        )
        .with_detail("reason", "capacity"));
    }
    // Members on each (provider, host), the moving VM aside.
    let mut members: HashMap<(ProviderId, &str), u32> = HashMap::new();
    if let Some((_, list)) = req.group {
        for m in list.iter().filter(|m| Some(m.vm_id) != moving_vm) {
            *members.entry((m.provider_id, m.host.as_str())).or_default() += 1;
        }
    }
    let here = |s: &Slot<'_>| members.get(&(s.provider.id, s.name())).copied().unwrap_or(0);
    if let Some((g, _)) = req.group.filter(|(g, _)| g.strict) {
        match g.policy {
            GroupPolicy::AntiAffinity => slots.retain(|s| here(s) == 0),
            GroupPolicy::Affinity if !members.is_empty() => slots.retain(|s| here(s) > 0),
            GroupPolicy::Affinity => {}
        }
        if slots.is_empty() {
            let why = match g.policy {
                GroupPolicy::AntiAffinity => "has a member on every host that could take the vm",
                GroupPolicy::Affinity => "has its members on a host that cannot take the vm",
            };
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("placement group {} (strict {}) {why}", g.name, g.policy),
            )
            .with_detail("reason", "placement_group")
            .with_detail("field", "placement_group_id"));
        }
    }
    // Soft groups: fewer members (anti-affinity) or more (affinity) first.
    let preference = |s: &Slot<'_>| -> i64 {
        match req.group {
            Some((g, _)) if g.policy == GroupPolicy::AntiAffinity => i64::from(here(s)),
            Some(_) => -i64::from(here(s)),
            None => 0,
        }
    };
    let mut keyed: Vec<(i64, f64, Slot<'_>)> = slots
        .into_iter()
        .map(|s| {
            let fill = s.fill(req.vcpus, req.memory_mib);
            let fill = if s.settings.policy == PlacementPolicy::Pack { -fill } else { fill };
            (preference(&s), fill, s)
        })
        .collect();
    keyed.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then(a.1.total_cmp(&b.1))
            .then(a.2.provider_load.cmp(&b.2.provider_load))
            .then(a.2.provider.name.cmp(&b.2.provider.name))
            .then(a.2.name().cmp(b.2.name()))
    });
    Ok(keyed.into_iter().map(|(_, _, s)| s.choice()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Capabilities, now};

    fn provider(name: &str) -> Provider {
        Provider {
            id: ProviderId::new(),
            name: name.into(),
            zone: "z".into(),
            endpoint: String::new(),
            plugin_name: String::new(),
            plugin_version: String::new(),
            hypervisor: "sim".into(),
            protocol_version: "1".into(),
            capabilities: Capabilities::default(),
            healthy: true,
            health_message: String::new(),
            last_probe_at: None,
            created_at: now(),
            has_credentials: false,
            tls: Default::default(),
            allow_plaintext: false,
        }
    }

    fn host(p: &Provider, name: &str, vcpus: u32) -> Host {
        Host {
            provider_id: p.id,
            name: name.into(),
            vcpus,
            memory_mib: u64::from(vcpus) * 1024,
            state: HostState::Up,
            drain: Drain::InService,
            drain_started_at: None,
            updated_at: now(),
        }
    }

    fn settings(policy: PlacementPolicy) -> ZonePlacement {
        ZonePlacement { zone: "z".into(), policy, cpu_overcommit: 1.0, memory_overcommit: 1.0 }
    }

    fn slots<'a>(p: &'a Provider, hosts: &'a [Host], used: &[u64], s: &'a ZonePlacement) -> Vec<Slot<'a>> {
        hosts
            .iter()
            .zip(used)
            .map(|(h, &u)| Slot {
                provider: p,
                host: Some(h),
                load: HostLoad { vms: u as u32, vcpus: u, memory_mib: u * 1024 },
                provider_load: 0,
                settings: s,
            })
            .collect()
    }

    fn names(r: Result<Vec<Choice>, ApiError>) -> Vec<String> {
        r.unwrap().into_iter().map(|c| c.host).collect()
    }

    #[test]
    fn spread_and_pack_order_hosts_that_fit() {
        let p = provider("p");
        let hosts = [host(&p, "a", 8), host(&p, "b", 8), host(&p, "c", 8)];
        let req = Request { vcpus: 2, memory_mib: 2048, ..Request::default() };
        let spread = settings(PlacementPolicy::Spread);
        assert_eq!(names(rank(slots(&p, &hosts, &[4, 0, 7], &spread), &req)), ["b", "a"]);
        let pack = settings(PlacementPolicy::Pack);
        assert_eq!(names(rank(slots(&p, &hosts, &[4, 0, 7], &pack), &req)), ["a", "b"]);
        // Nothing fits: a conflict naming capacity.
        let err = rank(slots(&p, &hosts, &[7, 7, 7], &spread), &req).unwrap_err();
        assert_eq!(
            (err.code, err.details.get("reason").map(String::as_str)),
            (ErrorCode::Conflict, Some("capacity"))
        );
        // Overcommit makes room.
        let over = ZonePlacement { cpu_overcommit: 2.0, memory_overcommit: 2.0, ..spread.clone() };
        assert_eq!(names(rank(slots(&p, &hosts, &[7, 7, 7], &over), &req)).len(), 3);
    }

    #[test]
    fn drained_and_down_hosts_take_nothing() {
        let p = provider("p");
        let mut hosts = [host(&p, "a", 8), host(&p, "b", 8), host(&p, "c", 8)];
        hosts[0].drain = Drain::Draining;
        hosts[1].state = HostState::Down;
        let s = settings(PlacementPolicy::Spread);
        let req = Request { vcpus: 1, memory_mib: 1, ..Request::default() };
        assert_eq!(names(rank(slots(&p, &hosts, &[0, 0, 0], &s), &req)), ["c"]);
        hosts[2].drain = Drain::Drained;
        // One host down: it may come back, so retry later.
        let err = rank(slots(&p, &hosts, &[0, 0, 0], &s), &req).unwrap_err();
        assert_eq!(err.code, ErrorCode::ProviderUnavailable);
        assert!(err.details.contains_key(crate::error::DETAIL_RETRY_AFTER), "{err:?}");
        // Every host out of service by an operator's choice: a conflict.
        hosts[1].state = HostState::Maintenance;
        let err = rank(slots(&p, &hosts, &[0, 0, 0], &s), &req).unwrap_err();
        assert_eq!(
            (err.code, err.details.get("reason").map(String::as_str)),
            (ErrorCode::Conflict, Some("no_host_in_service"))
        );
    }

    #[test]
    fn groups_keep_members_apart_or_together() {
        let p = provider("p");
        let hosts = [host(&p, "a", 8), host(&p, "b", 8), host(&p, "c", 8)];
        let s = settings(PlacementPolicy::Spread);
        let member = |h: &str| Member { vm_id: VmId::new(), provider_id: p.id, host: h.into() };
        let members = [member("a"), member("b")];
        let mut g = PlacementGroup {
            id: hcp_proto::ids::PlacementGroupId::new(),
            tenant_id: "t".into(),
            project_id: "p".into(),
            name: "g".into(),
            policy: GroupPolicy::AntiAffinity,
            strict: true,
            created_at: now(),
        };
        fn req<'a>(g: &'a PlacementGroup, members: &'a [Member]) -> Request<'a> {
            Request { vcpus: 1, memory_mib: 1, group: Some((g, members)), ..Request::default() }
        }
        // Strict anti-affinity: only the host without a member, even the fullest.
        assert_eq!(names(rank(slots(&p, &hosts, &[0, 0, 5], &s), &req(&g, &members))), ["c"]);
        let all = [member("a"), member("b"), member("c")];
        let full = Request { group: Some((&g, &all[..])), ..req(&g, &members) };
        let err = rank(slots(&p, &hosts, &[0, 0, 0], &s), &full).unwrap_err();
        assert_eq!(err.details.get("reason").map(String::as_str), Some("placement_group"));
        // Soft anti-affinity: memberless hosts first, then the rest.
        g.strict = false;
        assert_eq!(names(rank(slots(&p, &hosts, &[0, 0, 5], &s), &req(&g, &members))), ["c", "a", "b"]);
        // Strict affinity: where the members are.
        g.strict = true;
        g.policy = GroupPolicy::Affinity;
        let together = [member("b")];
        let r = Request { group: Some((&g, &together[..])), ..req(&g, &members) };
        assert_eq!(names(rank(slots(&p, &hosts, &[0, 3, 0], &s), &r)), ["b"]);
    }

    #[test]
    fn a_move_leaves_its_host_and_names_a_bad_target() {
        let p = provider("p");
        let hosts = [host(&p, "a", 8), host(&p, "b", 8)];
        let s = settings(PlacementPolicy::Spread);
        let vm = VmId::new();
        let req = Request { vcpus: 1, memory_mib: 1, moving: Some((vm, "a")), ..Request::default() };
        assert_eq!(names(rank(slots(&p, &hosts, &[1, 0], &s), &req)), ["b"]);
        let same = Request { host: Some("a"), ..req.clone() };
        let err = rank(slots(&p, &hosts, &[1, 0], &s), &same).unwrap_err();
        assert_eq!(
            (err.code, err.details.get("field").map(String::as_str)),
            (ErrorCode::InvalidArgument, Some("target_host"))
        );
        let unknown = Request { host: Some("zz"), ..req };
        assert!(rank(slots(&p, &hosts, &[1, 0], &s), &unknown).unwrap_err().message.contains("no host zz"));
    }
}
