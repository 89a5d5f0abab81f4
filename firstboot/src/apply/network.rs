//! The network config as systemd-networkd files, matched by MAC address.
//!
//! Files are named `10-omni-firstboot-<n>.network` so they win over the image's own
//! (networkd applies the first file in lexical order that matches). Files of an earlier
//! instance are removed first.

use std::path::PathBuf;

use anyhow::Result;

use crate::config::network::{Interface, Network};
use crate::fsutil::{self, Root};

pub const DIR: &str = "/etc/systemd/network";
const PREFIX: &str = "10-omni-firstboot-";

/// A network interface the kernel has.
#[derive(Debug, Clone)]
pub struct Nic {
    pub name: String,
    pub mac: String,
}

/// Physical interfaces in sysfs (those with a `device` link), sorted by name.
pub fn nics(sysfs: &std::path::Path) -> Vec<Nic> {
    let Ok(entries) = std::fs::read_dir(sysfs.join("class/net")) else {
        return Vec::new();
    };
    let mut nics: Vec<Nic> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("device").exists())
        .filter_map(|e| {
            let mac = std::fs::read_to_string(e.path().join("address")).ok()?;
            Some(Nic {
                name: e.file_name().to_string_lossy().into_owned(),
                mac: mac.trim().to_lowercase(),
            })
        })
        .collect();
    nics.sort_by(|a, b| a.name.cmp(&b.name));
    nics
}

/// Renders one interface.
pub fn render(iface: &Interface, net: &Network, mac: Option<&str>) -> String {
    let mut s = String::from("# Written by omni-firstboot from the seed's network config.\n");
    s.push_str("[Match]\n");
    match mac {
        Some(mac) => s.push_str(&format!("MACAddress={mac}\n")),
        None => s.push_str(&format!("Name={}\n", iface.name)),
    }
    if let Some(mtu) = iface.mtu {
        s.push_str(&format!("\n[Link]\nMTUBytes={mtu}\n"));
    }
    s.push_str("\n[Network]\n");
    let dhcp = match (iface.dhcp4, iface.dhcp6) {
        (true, true) => "yes",
        (true, false) => "ipv4",
        (false, true) => "ipv6",
        (false, false) => "no",
    };
    s.push_str(&format!("DHCP={dhcp}\n"));
    if let Some(ra) = iface.accept_ra {
        s.push_str(&format!("IPv6AcceptRA={}\n", if ra { "yes" } else { "no" }));
    }
    for a in &iface.addresses {
        s.push_str(&format!("Address={a}\n"));
    }
    for gw in iface.gateway4.iter().chain(&iface.gateway6) {
        s.push_str(&format!("Gateway={gw}\n"));
    }
    let mut dns: Vec<&String> = iface.dns.iter().collect();
    dns.extend(net.dns.iter().filter(|d| !iface.dns.contains(d)));
    for d in dns {
        s.push_str(&format!("DNS={d}\n"));
    }
    let mut search: Vec<&String> = iface.search.iter().collect();
    search.extend(net.search.iter().filter(|d| !iface.search.contains(d)));
    if !search.is_empty() {
        let joined: Vec<&str> = search.iter().map(|s| s.as_str()).collect();
        s.push_str(&format!("Domains={}\n", joined.join(" ")));
    }
    for r in &iface.routes {
        s.push_str(&format!(
            "\n[Route]\nDestination={}\nGateway={}\n",
            r.to, r.via
        ));
    }
    s
}

/// Writes the files; interfaces whose MAC no NIC has are skipped with a warning.
/// `nics` is empty when the machine's interfaces cannot be listed (then nothing is skipped).
pub fn apply(
    root: &Root,
    net: &Network,
    nics: &[Nic],
    warnings: &mut Vec<String>,
) -> Result<Vec<PathBuf>> {
    let dir = root.join(DIR);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(PREFIX) {
                fsutil::remove_if_exists(&entry.path())?;
            }
        }
    }
    let mut written = Vec::new();
    for (i, iface) in net.interfaces.iter().enumerate() {
        let mac = match &iface.mac {
            Some(mac) if !nics.is_empty() && !nics.iter().any(|n| &n.mac == mac) => {
                warnings.push(format!(
                    "network-config: no network interface has the MAC address {mac} (given for \
                     {}); its settings are not applied. Interfaces here: {}",
                    iface.name,
                    nics.iter()
                        .map(|n| format!("{} {}", n.name, n.mac))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                continue;
            }
            Some(mac) => Some(mac.clone()),
            // `ethN` without a MAC (configdrive2): the N-th NIC, when no NIC has that name.
            None => match iface
                .name
                .strip_prefix("eth")
                .and_then(|n| n.parse::<usize>().ok())
            {
                Some(n) if !nics.iter().any(|x| x.name == iface.name) => {
                    nics.get(n).map(|nic| nic.mac.clone())
                }
                _ => None,
            },
        };
        let path = dir.join(format!("{PREFIX}{i}-{}.network", sanitize(&iface.name)));
        fsutil::write_atomic(
            &path,
            render(iface, net, mac.as_deref()).as_bytes(),
            0o644,
            None,
        )?;
        written.push(path);
    }
    resolv_conf(root, net)?;
    Ok(written)
}

/// Without systemd-resolved nothing writes `/etc/resolv.conf` from networkd's DNS settings:
/// write it here unless it is a link (resolved's stub, managed elsewhere).
fn resolv_conf(root: &Root, net: &Network) -> Result<()> {
    let path = root.join("/etc/resolv.conf");
    if path.is_symlink() {
        return Ok(());
    }
    let mut dns: Vec<&String> = net.dns.iter().collect();
    let mut search: Vec<&String> = net.search.iter().collect();
    for i in &net.interfaces {
        dns.extend(i.dns.iter().filter(|d| !net.dns.contains(d)));
        search.extend(i.search.iter().filter(|d| !net.search.contains(d)));
    }
    if dns.is_empty() {
        return Ok(());
    }
    let mut text = String::from("# Written by omni-firstboot from the seed's network config.\n");
    if !search.is_empty() {
        let s: Vec<&str> = search.iter().map(|s| s.as_str()).collect();
        text.push_str(&format!("search {}\n", s.join(" ")));
    }
    for d in dns.iter().take(3) {
        text.push_str(&format!("nameserver {d}\n"));
    }
    fsutil::write_atomic(&path, text.as_bytes(), 0o644, None)
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
