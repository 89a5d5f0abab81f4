//! `omni-image deploy`: clone a template, hand the clone its seed, start it and wait until
//! the appliance says it is ready.
//!
//! The API cannot upload snippets, so secrets travel on a NoCloud seed ISO uploaded as `iso`
//! content and attached as a CD-ROM; it is ejected and deleted as soon as the appliance is
//! ready, and on every failure after it was uploaded.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use super::api::{Api, ApiError};
use super::{DeployArgs, Target, enc};

/// Reads `--seed` and checks it as `omni-image seed` does, before anything is sent.
fn read_seed(path: &std::path::Path) -> anyhow::Result<String> {
    let bytes = fs_err::read(path).context("--seed")?;
    let Ok(text) = String::from_utf8(bytes) else {
        anyhow::bail!(
            "--seed: {} is not text: deploy takes the cloud-config (user-data) YAML and writes \
             the seed ISO itself",
            path.display()
        );
    };
    let origin = path.display().to_string();
    let check = omni_firstboot::check_user_data(text.as_bytes(), &origin);
    for w in &check.warnings {
        tracing::warn!("{w}");
    }
    if !check.errors.is_empty() {
        anyhow::bail!(
            "--seed: {origin} cannot be used:\n  {}",
            check.errors.join("\n  ")
        );
    }
    Ok(text)
}

/// The CD-ROM slot of the seed ISO (`ide2` is Proxmox's own cloud-init drive).
const SEED_SLOT: &str = "ide3";

pub async fn run(args: &DeployArgs, api: &Api, target: &Target) -> anyhow::Result<()> {
    let started = Instant::now();
    let node = target.node.as_str();
    let storage = target.storage.as_str();
    if let Some(size) = &args.disk {
        check_size(size)?;
    }
    let ipconfig = args.ip.as_deref().map(ipconfig).transpose()?;
    let seed_text = match &args.seed {
        Some(path) => Some(read_seed(path)?),
        None => None,
    };

    super::check_node(api, node).await?;
    if seed_text.is_some() {
        let status = super::storage_status(api, node, storage).await?;
        let content = status["content"].as_str().unwrap_or("");
        if !content.split(',').any(|c| c == "iso") {
            bail!(
                "storage {storage} does not hold 'iso' content (it has: {content}), needed for \
                 the seed: pvesm set {storage} --content {content},iso"
            );
        }
    }
    let (template, template_node) = find_template(api, &args.template).await?;
    let vms = api.get("/cluster/resources", &[("type", "vm")]).await?;
    if let Some(vm) = vms
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == args.name.as_str())
    {
        bail!(
            "--name {}: a VM of that name exists already (VMID {})",
            args.name,
            vm["vmid"]
        );
    }
    let vmid = match args.vmid {
        Some(id) => {
            if vms
                .as_array()
                .into_iter()
                .flatten()
                .any(|v| v["vmid"] == id)
            {
                bail!("--vmid {id} is taken: pick another or leave --vmid out");
            }
            id
        }
        None => super::next_vmid(api).await?,
    };

    eprintln!("cloning template {template} to VM {vmid} ({})", args.name);
    let clone: Vec<(&str, String)> = vec![
        ("newid", vmid.to_string()),
        ("name", args.name.clone()),
        ("full", "1".into()),
        ("target", node.to_string()),
    ];
    api.run_task(
        &template_node,
        api.post(
            &format!("/nodes/{template_node}/qemu/{template}/clone"),
            &clone,
        ),
        &format!("cloning template {template}"),
    )
    .await?;

    if let Some(size) = &args.disk {
        let form = [("disk", "scsi0".to_string()), ("size", size.clone())];
        api.run_task(
            node,
            api.put(&format!("/nodes/{node}/qemu/{vmid}/resize"), &form),
            &format!("resizing the disk of VM {vmid} to {size}"),
        )
        .await?;
    }
    // One NoCloud source only: with a seed, the seed carries hostname and network too and
    // Proxmox's own cloud-init drive is dropped; without one, the Cloud-Init keys carry them.
    let seed = match &seed_text {
        Some(text) => {
            let config = api
                .get(&format!("/nodes/{node}/qemu/{vmid}/config"), &[])
                .await?;
            let network =
                network_config(config["net0"].as_str().unwrap_or(""), args.ip.as_deref())?;
            Some(attach_seed(api, node, storage, vmid, &args.name, text, &network).await?)
        }
        None => {
            if let Some(ip) = ipconfig {
                api.put(
                    &format!("/nodes/{node}/qemu/{vmid}/config"),
                    &[("ipconfig0", ip)],
                )
                .await?;
            }
            None
        }
    };
    let result = start_and_wait(api, node, vmid, args).await;
    // Whatever happened, the secret-bearing ISO goes.
    if let Some(volid) = &seed
        && let Err(e) = remove_seed(api, node, storage, vmid, volid).await
    {
        eprintln!("warning: could not remove the seed ISO {volid}: {e:#}; delete it by hand");
    }
    result?;
    eprintln!(
        "{} (VMID {vmid}) is ready, {:.1}s after deploy started",
        args.name,
        started.elapsed().as_secs_f64()
    );
    println!("{vmid}");
    Ok(())
}

async fn start_and_wait(api: &Api, node: &str, vmid: u32, args: &DeployArgs) -> anyhow::Result<()> {
    api.run_task(
        node,
        api.post(&format!("/nodes/{node}/qemu/{vmid}/status/start"), &[]),
        &format!("starting VM {vmid}"),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(args.ready_timeout);

    eprintln!("waiting for the guest agent of VM {vmid}");
    loop {
        match api
            .post(&format!("/nodes/{node}/qemu/{vmid}/agent/ping"), &[])
            .await
        {
            Ok(_) => break,
            Err(e) if agent_not_up(&e) => {}
            Err(e) => return Err(e).context("pinging the guest agent"),
        }
        if Instant::now() > deadline {
            bail!(
                "VM {vmid}'s guest agent did not answer within {}s: check its console (serial0)",
                args.ready_timeout
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    eprintln!("waiting for omni-firstboot to report ready");
    let mut last;
    loop {
        match firstboot_status(api, node, vmid).await {
            Ok((0, _)) => return Ok(()),
            // 1: a step failed; waiting longer will not help.
            Ok((1, out)) => bail!(
                "omni-firstboot on VM {vmid} reports a failed step:\n{}",
                out.trim()
            ),
            Ok((code, out)) => last = format!("exit code {code}: {}", out.trim()),
            Err(e) if agent_not_up(&e) => last = "guest agent went away".into(),
            Err(e) => return Err(e).context("asking omni-firstboot for its status"),
        }
        if Instant::now() > deadline {
            bail!(
                "VM {vmid} did not report ready within {}s (last status: {last})",
                args.ready_timeout
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Runs `omni-firstboot status` in the guest: exit code 0 means ready, 1 a failed step, 2 not
/// finished yet.
async fn firstboot_status(api: &Api, node: &str, vmid: u32) -> anyhow::Result<(i64, String)> {
    let form = [
        ("command", omni_firstboot::INSTALL_PATH.to_string()),
        ("command", "status".to_string()),
    ];
    let pid = api
        .post(&format!("/nodes/{node}/qemu/{vmid}/agent/exec"), &form)
        .await?;
    let pid = pid["pid"]
        .as_i64()
        .context("agent exec answered no pid")?
        .to_string();
    for _ in 0..30 {
        let st = api
            .get(
                &format!("/nodes/{node}/qemu/{vmid}/agent/exec-status"),
                &[("pid", &pid)],
            )
            .await?;
        if st["exited"] == true || st["exited"] == 1 {
            let out = format!(
                "{}{}",
                st["out-data"].as_str().unwrap_or(""),
                st["err-data"].as_str().unwrap_or("")
            );
            return Ok((st["exitcode"].as_i64().unwrap_or(-1), out));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok((-1, "status command did not finish".into()))
}

fn agent_not_up(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<ApiError>().is_some_and(|a| {
            matches!(a, ApiError::Other { message, .. }
                if message.contains("not running") || message.contains("timeout")
                    || message.contains("got timeout"))
        })
    })
}

async fn find_template(api: &Api, wanted: &str) -> anyhow::Result<(u32, String)> {
    let vms = api.get("/cluster/resources", &[("type", "vm")]).await?;
    let list: Vec<&Value> = vms.as_array().into_iter().flatten().collect();
    let found: Vec<&&Value> = list
        .iter()
        .filter(|v| {
            v["name"] == wanted
                || v["vmid"]
                    .as_u64()
                    .is_some_and(|id| id.to_string() == wanted)
        })
        .collect();
    match found.as_slice() {
        [] => bail!("no template {wanted}: upload one with `omni-image upload IMAGE`"),
        [vm] => {
            if vm["template"].as_u64() != Some(1) {
                bail!("{wanted} (VMID {}) is a VM, not a template", vm["vmid"]);
            }
            let id = vm["vmid"].as_u64().unwrap_or(0) as u32;
            Ok((id, vm["node"].as_str().unwrap_or("").to_string()))
        }
        many => bail!(
            "{wanted} names {} VMs ({}): pass the template's VMID",
            many.len(),
            many.iter()
                .map(|v| v["vmid"].to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

async fn attach_seed(
    api: &Api,
    node: &str,
    storage: &str,
    vmid: u32,
    name: &str,
    text: &str,
    network: &str,
) -> anyhow::Result<String> {
    let dir = tempfile::Builder::new().prefix("omni-seed-").tempdir()?;
    let iso = dir.path().join("seed.iso");
    write_seed_iso(text, network, name, &iso)?;
    let file_name = format!("{name}-{vmid}-seed.iso");
    let upid =
        super::upload::upload_with_retries(api, node, storage, "iso", &iso, &file_name, None)
            .await?;
    api.wait_task(node, &upid, "storing the seed ISO").await?;
    let volid = format!("{storage}:iso/{file_name}");
    let form = [
        (SEED_SLOT, format!("{volid},media=cdrom")),
        ("delete", "ide2".to_string()),
    ];
    if let Err(e) = api
        .put(&format!("/nodes/{node}/qemu/{vmid}/config"), &form)
        .await
    {
        let _ = api
            .delete(&format!(
                "/nodes/{node}/storage/{storage}/content/{}",
                enc(&volid)
            ))
            .await;
        return Err(e).context("attaching the seed ISO");
    }
    Ok(volid)
}

async fn remove_seed(
    api: &Api,
    node: &str,
    storage: &str,
    vmid: u32,
    volid: &str,
) -> anyhow::Result<()> {
    let path = format!("/nodes/{node}/qemu/{vmid}/config");
    // Eject first (applies at once on a running VM), then drop the drive from the config.
    api.put(&path, &[(SEED_SLOT, "none,media=cdrom".to_string())])
        .await?;
    api.put(&path, &[("delete", SEED_SLOT.to_string())]).await?;
    let upid = api
        .delete(&format!(
            "/nodes/{node}/storage/{storage}/content/{}",
            enc(volid)
        ))
        .await?;
    if let Some(upid) = upid.as_str() {
        api.wait_task(node, upid, "deleting the seed ISO").await?;
    }
    Ok(())
}

/// The seed's `network-config` (version 1, as Proxmox writes it) for the first NIC: the
/// `--ip` address, or DHCP.
fn network_config(net0: &str, ip: Option<&str>) -> anyhow::Result<String> {
    let mac = net0
        .split(',')
        .find_map(|kv| {
            kv.split_once('=')
                .map(|(_, v)| v)
                .filter(|v| v.matches(':').count() == 5)
        })
        .map(str::to_lowercase)
        .with_context(|| format!("the clone's net0 ({net0:?}) has no MAC address"))?;
    let mut out = format!(
        "version: 1\nconfig:\n    - type: physical\n      name: eth0\n      mac_address: '{mac}'\n      \
         subnets:\n"
    );
    match ip {
        Some(ip) => {
            let ipconfig = ipconfig(ip)?;
            let mut cidr = "";
            let mut gw = None;
            for kv in ipconfig.split(',') {
                match kv.split_once('=') {
                    Some(("ip", v)) => cidr = v,
                    Some(("gw", v)) => gw = Some(v),
                    _ => {}
                }
            }
            let (addr, len) = cidr.split_once('/').unwrap_or((cidr, "24"));
            let len: u32 = len.parse().unwrap_or(24);
            let mask = std::net::Ipv4Addr::from(u32::MAX.checked_shl(32 - len).unwrap_or(0));
            out.push_str(&format!(
                "      - type: static\n        address: '{addr}'\n        netmask: '{mask}'\n"
            ));
            if let Some(gw) = gw {
                out.push_str(&format!("        gateway: '{gw}'\n"));
            }
        }
        None => out.push_str("      - type: dhcp4\n"),
    }
    Ok(out)
}

/// Writes the clone's NoCloud seed ISO: `user-data` is the given cloud-config,
/// `network-config` the network, `meta-data` names the instance (its id computed as Proxmox
/// computes it) and the host.
pub fn write_seed_iso(
    user_data: &str,
    network: &str,
    hostname: &str,
    out: &Path,
) -> anyhow::Result<()> {
    let id = omni_firstboot::instance_id(user_data.as_bytes(), network.as_bytes());
    crate::seed::write_iso(
        user_data.as_bytes(),
        &format!("instance-id: {id}\nlocal-hostname: {hostname}\n"),
        Some(network.as_bytes()),
        out,
    )
}

fn check_size(size: &str) -> anyhow::Result<()> {
    let s = size.strip_prefix('+').unwrap_or(size);
    let num = s.trim_end_matches(['K', 'M', 'G', 'T']);
    let ok = !num.is_empty() && num.parse::<f64>().is_ok() && s.len() - num.len() <= 1;
    if !ok {
        bail!("--disk {size:?} is not a size: use e.g. 20G (absolute) or +10G (grow by)");
    }
    Ok(())
}

/// `--ip CIDR[,gw=G]` as Proxmox's `ipconfig0`.
fn ipconfig(text: &str) -> anyhow::Result<String> {
    let mut parts = text.split(',');
    let cidr = parts.next().unwrap_or("");
    let valid_cidr = cidr.split_once('/').is_some_and(|(a, l)| {
        a.parse::<std::net::Ipv4Addr>().is_ok() && l.parse::<u8>().is_ok_and(|l| l <= 32)
    });
    if !valid_cidr {
        bail!(
            "--ip {text:?}: expected ADDRESS/PREFIX[,gw=GATEWAY], e.g. 192.0.2.10/24,gw=192.0.2.1"
        );
    }
    let mut out = format!("ip={cidr}");
    for p in parts {
        match p.strip_prefix("gw=") {
            Some(gw) if gw.parse::<std::net::Ipv4Addr>().is_ok() => {
                out.push_str(&format!(",gw={gw}"))
            }
            _ => bail!("--ip {text:?}: {p:?} is not gw=ADDRESS"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_flags_become_ipconfig() {
        assert_eq!(
            ipconfig("192.0.2.10/24,gw=192.0.2.1").unwrap(),
            "ip=192.0.2.10/24,gw=192.0.2.1"
        );
        assert!(ipconfig("192.0.2.10").is_err());
        assert!(ipconfig("192.0.2.10/24,gateway=1.2.3.4").is_err());
    }

    #[test]
    fn disk_sizes_are_checked() {
        assert!(check_size("20G").is_ok());
        assert!(check_size("+10G").is_ok());
        assert!(check_size("big").is_err());
    }
}
