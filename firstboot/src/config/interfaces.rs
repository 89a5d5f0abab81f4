//! The `/etc/network/interfaces` syntax Proxmox writes into configdrive2 drives.

use super::network::{Interface, Network, prefix_len};

pub fn parse(text: &str) -> anyhow::Result<Network> {
    let mut net = Network::default();
    // The family (`inet`/`inet6`) of the last `iface` line, and its interface index.
    let mut current: Option<(usize, bool)> = None;
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["iface", "lo", ..] => current = None,
            ["iface", name, family, method] => {
                let idx = match net.interfaces.iter().position(|i| i.name == *name) {
                    Some(idx) => idx,
                    None => {
                        net.interfaces.push(Interface {
                            name: name.to_string(),
                            ..Default::default()
                        });
                        net.interfaces.len() - 1
                    }
                };
                let v6 = *family == "inet6";
                let iface = &mut net.interfaces[idx];
                match (*method, v6) {
                    ("dhcp", false) => iface.dhcp4 = true,
                    ("dhcp", true) => iface.dhcp6 = true,
                    ("auto", true) => iface.accept_ra = Some(true),
                    _ => {}
                }
                current = Some((idx, v6));
            }
            [key, values @ ..] => {
                let value = values.join(" ");
                match (*key, current) {
                    ("dns_nameservers" | "dns-nameservers", None) => {
                        net.dns.extend(values.iter().map(|s| s.to_string()))
                    }
                    ("dns_search" | "dns-search", None) => {
                        net.search.extend(values.iter().map(|s| s.to_string()))
                    }
                    (_, Some((idx, v6))) => {
                        let iface = &mut net.interfaces[idx];
                        match *key {
                            "address" => iface.addresses.push(value),
                            "netmask" => {
                                if let Some(last) = iface.addresses.last_mut()
                                    && !last.contains('/')
                                {
                                    let len = if v6 {
                                        value.parse()?
                                    } else {
                                        prefix_len(&value)?
                                    };
                                    *last = format!("{last}/{len}");
                                }
                            }
                            "gateway" if v6 => iface.gateway6 = Some(value),
                            "gateway" => iface.gateway4 = Some(value),
                            "dns_nameservers" | "dns-nameservers" => {
                                iface.dns.extend(values.iter().map(|s| s.to_string()))
                            }
                            "dns_search" | "dns-search" => {
                                iface.search.extend(values.iter().map(|s| s.to_string()))
                            }
                            "hwaddress" => iface.mac = values.last().map(|m| m.to_lowercase()),
                            _ => {}
                        }
                    }
                    _ => {}
                }
            }
            [] => {}
        }
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    #[test]
    fn proxmox_configdrive_interfaces_are_read() {
        let text = include_str!("../../tests/fixtures/configdrive/openstack/content/0000");
        let net = super::parse(text).unwrap();
        assert_eq!(net.dns, vec!["192.168.10.1"]);
        assert_eq!(net.search, vec!["lab.example"]);
        assert_eq!(net.interfaces[0].name, "eth0");
        assert_eq!(
            net.interfaces[0].addresses,
            vec!["192.168.10.60/24", "fd00:10::60/64"]
        );
        assert_eq!(net.interfaces[0].gateway4.as_deref(), Some("192.168.10.1"));
        assert!(net.interfaces[1].dhcp4);
    }
}
