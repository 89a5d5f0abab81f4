//! cloud-init network config, versions 1 and 2, read into one model that the networkd writer
//! renders.

use anyhow::{Context, Result, bail};
use serde_yaml_ng::Value;

use super::value;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Network {
    pub interfaces: Vec<Interface>,
    /// Name servers and search domains that apply to every interface.
    pub dns: Vec<String>,
    pub search: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interface {
    /// The name in the config (`eth0`); matched only when no MAC address is given.
    pub name: String,
    /// Lowercase MAC address.
    pub mac: Option<String>,
    pub dhcp4: bool,
    pub dhcp6: bool,
    /// Router advertisements (SLAAC).
    pub accept_ra: Option<bool>,
    /// Addresses with prefix length, e.g. `192.0.2.10/24`.
    pub addresses: Vec<String>,
    pub gateway4: Option<String>,
    pub gateway6: Option<String>,
    pub routes: Vec<Route>,
    pub dns: Vec<String>,
    pub search: Vec<String>,
    pub mtu: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub to: String,
    pub via: String,
}

/// Reads a `network-config` document of version 1 or 2 (bare, or under `network:`).
pub fn parse(bytes: &[u8], origin: &str) -> Result<Option<Network>> {
    let text = String::from_utf8_lossy(bytes);
    if text.trim().is_empty() {
        return Ok(None);
    }
    let doc: Value = serde_yaml_ng::from_str(&text).with_context(|| format!("parsing {origin}"))?;
    let doc = match doc.get("network") {
        Some(inner) if inner.get("version").is_some() => inner.clone(),
        _ => doc,
    };
    if doc.get("config").and_then(value::string).as_deref() == Some("disabled") {
        return Ok(None);
    }
    let version = doc
        .get("version")
        .and_then(value::string)
        .unwrap_or_default();
    let net = match version.as_str() {
        "1" => v1(&doc, origin)?,
        "2" => v2(&doc, origin)?,
        "" => bail!("{origin} has no `version`; write `version: 1` or `version: 2`"),
        other => bail!("{origin}: network config version {other} is not known (use 1 or 2)"),
    };
    check(&net, origin)?;
    Ok(Some(net))
}

/// Refuses addresses, gateways, routes and DNS servers that are not IP addresses, so that
/// nothing unusable reaches systemd-networkd (which would skip it silently).
fn check(net: &Network, origin: &str) -> Result<()> {
    use std::net::IpAddr;
    let ip = |v: &str| v.parse::<IpAddr>().ok();
    let cidr = |v: &str| {
        let (a, len) = v.split_once('/')?;
        let a = ip(a)?;
        let len: u8 = len.parse().ok()?;
        (len <= if a.is_ipv4() { 32 } else { 128 }).then_some(a)
    };
    for iface in &net.interfaces {
        let at = format!("{origin}: interface `{}`", iface.name);
        for a in &iface.addresses {
            if cidr(a).is_none() {
                bail!("{at}: `{a}` is not an address with a prefix length, like 192.0.2.10/24");
            }
        }
        for (key, gw, v4) in [
            ("gateway4", &iface.gateway4, true),
            ("gateway6", &iface.gateway6, false),
        ] {
            if let Some(g) = gw
                && ip(g).is_none_or(|a| a.is_ipv4() != v4)
            {
                bail!(
                    "{at}: {key} `{g}` is not an IPv{} address",
                    if v4 { 4 } else { 6 }
                );
            }
        }
        for r in &iface.routes {
            if ip(&r.via).is_none() {
                bail!(
                    "{at}: the route to `{}` goes via `{}`, which is not an IP address",
                    r.to,
                    r.via
                );
            }
            if r.to != "default" && cidr(&r.to).is_none() {
                bail!(
                    "{at}: route `to: {}` is not `default` or an address with a prefix length",
                    r.to
                );
            }
        }
        for d in &iface.dns {
            if ip(d).is_none() {
                bail!("{at}: DNS server `{d}` is not an IP address");
            }
        }
    }
    if let Some(d) = net.dns.iter().find(|d| ip(d).is_none()) {
        bail!("{origin}: DNS server `{d}` is not an IP address");
    }
    Ok(())
}

fn v1(doc: &Value, origin: &str) -> Result<Network> {
    let mut net = Network::default();
    let Some(Value::Sequence(entries)) = doc.get("config") else {
        return Ok(net);
    };
    for (i, entry) in entries.iter().enumerate() {
        let ty = entry
            .get("type")
            .and_then(value::string)
            .unwrap_or_default();
        match ty.as_str() {
            "physical" => {
                let name = entry
                    .get("name")
                    .and_then(value::string)
                    .unwrap_or_default();
                let mut iface = Interface {
                    name,
                    mac: entry
                        .get("mac_address")
                        .and_then(value::string)
                        .map(|m| m.to_lowercase()),
                    mtu: entry
                        .get("mtu")
                        .and_then(value::string)
                        .and_then(|m| m.parse().ok()),
                    ..Default::default()
                };
                if let Some(Value::Sequence(subnets)) = entry.get("subnets") {
                    for subnet in subnets {
                        v1_subnet(&mut iface, subnet)
                            .with_context(|| format!("{origin}: config[{i}] ({})", iface.name))?;
                    }
                }
                net.interfaces.push(iface);
            }
            "nameserver" => {
                net.dns.extend(
                    entry
                        .get("address")
                        .map(value::string_list)
                        .unwrap_or_default(),
                );
                net.search.extend(
                    entry
                        .get("search")
                        .map(value::string_list)
                        .unwrap_or_default(),
                );
            }
            // TODO: bonds, bridges, VLANs and routes entries are not rendered yet; Proxmox
            // writes none of them.
            other => tracing::warn!("{origin}: config[{i}] of type `{other}` is not applied"),
        }
    }
    Ok(net)
}

fn v1_subnet(iface: &mut Interface, subnet: &Value) -> Result<()> {
    let ty = subnet
        .get("type")
        .and_then(value::string)
        .unwrap_or_default();
    let get = |k: &str| subnet.get(k).and_then(value::string);
    match ty.as_str() {
        "dhcp" | "dhcp4" => iface.dhcp4 = true,
        "dhcp6" => {
            iface.dhcp6 = true;
            iface.accept_ra = Some(true);
        }
        "ipv6_slaac" | "ipv6_dhcpv6-stateless" => iface.accept_ra = Some(true),
        "ipv6_dhcpv6-stateful" => iface.dhcp6 = true,
        "static" | "static6" => {
            let address = get("address").context("a static subnet has no `address`")?;
            let address = match (address.contains('/'), get("netmask")) {
                (true, _) => address,
                (false, Some(mask)) => format!("{address}/{}", prefix_len(&mask)?),
                (false, None) if address.contains(':') || ty == "static6" => {
                    format!("{address}/64")
                }
                (false, None) => format!("{address}/24"),
            };
            let v6 = address.contains(':');
            if let Some(gw) = get("gateway") {
                if v6 {
                    iface.gateway6 = Some(gw);
                } else {
                    iface.gateway4 = Some(gw);
                }
            }
            iface.addresses.push(address);
            if v6 && iface.accept_ra.is_none() {
                iface.accept_ra = Some(false);
            }
        }
        "manual" => {}
        other => bail!("subnet type `{other}` is not known"),
    }
    iface.dns.extend(
        subnet
            .get("dns_nameservers")
            .map(value::string_list)
            .unwrap_or_default(),
    );
    iface.search.extend(
        subnet
            .get("dns_search")
            .map(value::string_list)
            .unwrap_or_default(),
    );
    if let Some(Value::Sequence(routes)) = subnet.get("routes") {
        for r in routes {
            let via = r.get("gateway").and_then(value::string);
            let network = r.get("network").and_then(value::string);
            let mask = r.get("netmask").and_then(value::string);
            if let (Some(via), Some(network)) = (via, network) {
                let to = match mask {
                    Some(m) if !network.contains('/') => format!("{network}/{}", prefix_len(&m)?),
                    _ => network,
                };
                iface.routes.push(Route { to, via });
            }
        }
    }
    Ok(())
}

fn v2(doc: &Value, origin: &str) -> Result<Network> {
    let mut net = Network::default();
    let Some(Value::Mapping(ethernets)) = doc.get("ethernets") else {
        return Ok(net);
    };
    for (id, cfg) in ethernets {
        let id = value::string(id).unwrap_or_default();
        let m = cfg.get("match");
        let mac = m.and_then(|m| m.get("macaddress")).and_then(value::string);
        let matched_name = m.and_then(|m| m.get("name")).and_then(value::string);
        let mut iface = Interface {
            name: cfg
                .get("set-name")
                .and_then(value::string)
                .or(matched_name)
                .unwrap_or(id.clone()),
            mac: mac.map(|m| m.to_lowercase()),
            dhcp4: cfg.get("dhcp4").and_then(value::boolean).unwrap_or(false),
            dhcp6: cfg.get("dhcp6").and_then(value::boolean).unwrap_or(false),
            accept_ra: cfg.get("accept-ra").and_then(value::boolean),
            addresses: cfg
                .get("addresses")
                .map(value::string_list)
                .unwrap_or_default(),
            gateway4: cfg.get("gateway4").and_then(value::string),
            gateway6: cfg.get("gateway6").and_then(value::string),
            mtu: cfg
                .get("mtu")
                .and_then(value::string)
                .and_then(|m| m.parse().ok()),
            ..Default::default()
        };
        if let Some(ns) = cfg.get("nameservers") {
            iface.dns = ns
                .get("addresses")
                .map(value::string_list)
                .unwrap_or_default();
            iface.search = ns.get("search").map(value::string_list).unwrap_or_default();
        }
        if let Some(Value::Sequence(routes)) = cfg.get("routes") {
            for r in routes {
                let to = r.get("to").and_then(value::string);
                let via = r.get("via").and_then(value::string);
                match (to.as_deref(), via) {
                    (Some("default" | "0.0.0.0/0"), Some(via)) if !via.contains(':') => {
                        iface.gateway4.get_or_insert(via);
                    }
                    (Some("default" | "::/0"), Some(via)) => {
                        iface.gateway6.get_or_insert(via);
                    }
                    (Some(to), Some(via)) => iface.routes.push(Route {
                        to: to.to_owned(),
                        via,
                    }),
                    _ => tracing::warn!("{origin}: ethernets.{id}: a route lacks `to` or `via`"),
                }
            }
        }
        for address in &iface.addresses {
            if !address.contains('/') {
                bail!("{origin}: ethernets.{id}: address `{address}` needs a prefix length");
            }
        }
        net.interfaces.push(iface);
    }
    // TODO: bonds, bridges and vlans of version 2 are not rendered yet.
    for kind in ["bonds", "bridges", "vlans", "wifis"] {
        if doc.get(kind).is_some() {
            tracing::warn!("{origin}: `{kind}` is not applied");
        }
    }
    Ok(net)
}

/// The prefix length of a dotted netmask (`255.255.255.0` -> 24), or a length as given.
pub fn prefix_len(mask: &str) -> Result<u32> {
    if let Ok(n) = mask.parse::<u32>() {
        return Ok(n);
    }
    let addr: std::net::Ipv4Addr = mask
        .parse()
        .with_context(|| format!("netmask `{mask}` is not an IPv4 mask"))?;
    let bits = u32::from(addr);
    if bits.leading_ones() + bits.trailing_zeros() != 32 {
        bail!("netmask `{mask}` is not contiguous");
    }
    Ok(bits.leading_ones())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxmox_v1_with_two_nics_and_a_nameserver() {
        let text = include_str!("../../tests/fixtures/proxmox/network-config");
        let net = parse(text.as_bytes(), "network-config").unwrap().unwrap();
        assert_eq!(net.interfaces.len(), 2);
        let eth0 = &net.interfaces[0];
        assert_eq!(eth0.mac.as_deref(), Some("bc:24:11:5e:7a:01"));
        assert_eq!(eth0.addresses, vec!["192.168.10.50/24", "fd00:10::50/64"]);
        assert_eq!(eth0.gateway4.as_deref(), Some("192.168.10.1"));
        assert_eq!(eth0.gateway6.as_deref(), Some("fd00:10::1"));
        let eth1 = &net.interfaces[1];
        assert!(eth1.dhcp4 && eth1.accept_ra == Some(true) && !eth1.dhcp6);
        assert_eq!(net.dns, vec!["192.168.10.1", "9.9.9.9"]);
        assert_eq!(net.search, vec!["lab.example"]);
    }

    #[test]
    fn version_2_with_match_routes_and_nameservers() {
        let text = include_str!("../../tests/fixtures/network-v2.yaml");
        let net = parse(text.as_bytes(), "network-config").unwrap().unwrap();
        let lan = &net.interfaces[0];
        assert_eq!(lan.name, "lan0");
        assert_eq!(lan.mac.as_deref(), Some("52:54:00:12:34:56"));
        assert_eq!(lan.addresses, vec!["10.0.0.5/24"]);
        assert_eq!(lan.gateway4.as_deref(), Some("10.0.0.1"));
        assert_eq!(
            lan.routes,
            vec![Route {
                to: "10.1.0.0/16".into(),
                via: "10.0.0.254".into()
            }]
        );
        assert_eq!(lan.dns, vec!["10.0.0.1"]);
        assert!(net.interfaces[1].dhcp4);
    }

    #[test]
    fn bad_versions_and_masks_are_named() {
        let err = parse(b"config: []\n", "network-config").unwrap_err();
        assert!(err.to_string().contains("version"), "{err}");
        assert!(prefix_len("255.0.255.0").is_err());
        assert_eq!(prefix_len("255.255.254.0").unwrap(), 23);
    }

    #[test]
    fn addresses_gateways_and_servers_must_be_ip_addresses() {
        let v2 = |eth: &str| {
            format!(
                "version: 2\nethernets:\n  lan:\n    match: {{macaddress: '52:54:00:00:00:01'}}\n{eth}"
            )
        };
        let cases = [
            (
                "    addresses: [192.168.10.40/33]\n",
                "`192.168.10.40/33` is not an address",
            ),
            (
                "    addresses: [lan.example/24]\n",
                "`lan.example/24` is not an address",
            ),
            (
                "    addresses: [10.0.0.5/24]\n    gateway4: notanip\n",
                "gateway4 `notanip` is not an IPv4",
            ),
            (
                "    addresses: [10.0.0.5/24]\n    gateway4: fd00::1\n",
                "gateway4 `fd00::1` is not an IPv4",
            ),
            (
                "    nameservers: {addresses: [dns.example]}\n",
                "DNS server `dns.example`",
            ),
        ];
        for (eth, expected) in cases {
            let err = format!("{:#}", parse(v2(eth).as_bytes(), "nc.yaml").unwrap_err());
            assert!(err.contains("nc.yaml: interface `lan`"), "{err}");
            assert!(err.contains(expected), "{eth}: {err}");
        }
        let ok = v2(
            "    addresses: [10.0.0.5/24, 'fd00::5/64']\n    gateway4: 10.0.0.1\n    nameservers: {addresses: [10.0.0.1]}\n",
        );
        assert!(parse(ok.as_bytes(), "nc.yaml").unwrap().is_some());
    }
}
