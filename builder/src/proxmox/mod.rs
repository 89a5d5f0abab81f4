//! Publishing to Proxmox VE over its HTTP API: `upload` makes a template of a built image,
//! `deploy` clones it, hands it its seed and waits until the appliance reports ready.

mod api;
pub mod conn;
mod deploy;
pub mod image;
pub mod tls;
mod upload;

use std::path::PathBuf;

use anyhow::{Context, bail};
use serde_json::Value;

use api::Api;
pub use api::ApiError;
use conn::ConnectArgs;

#[derive(Debug, clap::Args)]
pub struct UploadArgs {
    /// The image, NAME.qcow2 (NAME.qcow2.sha256 and NAME.manifest.json are read beside it).
    pub image: PathBuf,
    /// The node to upload to (or `node` in the profile).
    #[arg(long)]
    pub node: Option<String>,
    /// The storage for the upload; it needs the `import` and `images` content types (or
    /// `storage` in the profile).
    #[arg(long)]
    pub storage: Option<String>,
    /// Storage for the template's disks, if not --storage.
    #[arg(long, value_name = "STORAGE")]
    pub disk_storage: Option<String>,
    /// The template's VMID; the next free one by default.
    #[arg(long)]
    pub vmid: Option<u32>,
    /// The template's name; the manifest's `name` by default.
    #[arg(long)]
    pub name: Option<String>,
    /// Swap an existing template of the same name for this image (the old one is removed
    /// only once the new one is complete).
    #[arg(long)]
    pub replace: bool,
    /// The bridge of the template's network device.
    #[arg(long)]
    pub bridge: Option<String>,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// The template, by name or VMID.
    pub template: String,
    /// The new VM's name (a DNS name; it becomes the hostname).
    #[arg(long)]
    pub name: String,
    /// The appliance's cloud-config with its secrets; delivered on a NoCloud seed ISO that is
    /// removed again once the VM is ready.
    #[arg(long, value_name = "SECRETS.yaml")]
    pub seed: Option<PathBuf>,
    /// A static address for the first NIC, CIDR[,gw=GATEWAY]; DHCP by default.
    #[arg(long, value_name = "CIDR,gw=G")]
    pub ip: Option<String>,
    /// The root disk's size, e.g. 20G, or +10G to grow it by that much.
    #[arg(long, value_name = "SIZE")]
    pub disk: Option<String>,
    /// The new VM's VMID; the next free one by default.
    #[arg(long)]
    pub vmid: Option<u32>,
    /// The node (or `node` in the profile).
    #[arg(long)]
    pub node: Option<String>,
    /// Storage for the seed ISO; it needs the `iso` content type (or `storage` in the profile).
    #[arg(long)]
    pub storage: Option<String>,
    /// Give up waiting for the appliance to report ready after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 900)]
    pub ready_timeout: u64,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// Where on the cluster a command works.
pub struct Target {
    pub node: String,
    pub storage: String,
    pub bridge: String,
}

fn target(
    node: &Option<String>,
    storage: &Option<String>,
    bridge: Option<&String>,
    profile: &conn::Profile,
) -> anyhow::Result<Target> {
    let node = node
        .clone()
        .or(profile.node.clone())
        .context("no node: pass --node NODE")?;
    let storage = storage
        .clone()
        .or(profile.storage.clone())
        .context("no storage: pass --storage STORAGE")?;
    let bridge = bridge
        .cloned()
        .or(profile.bridge.clone())
        .unwrap_or_else(|| "vmbr0".into());
    Ok(Target {
        node,
        storage,
        bridge,
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn run_upload(args: &UploadArgs) -> anyhow::Result<()> {
    if !args.image.exists() {
        bail!(
            "image {} does not exist: build it with `omni-image build RECIPE`",
            args.image.display()
        );
    }
    let (connection, profile) = args.connect.resolve()?;
    let target = target(&args.node, &args.storage, args.bridge.as_ref(), &profile)?;
    if let Some(id) = args.vmid
        && id < 100
    {
        bail!("--vmid {id}: VMIDs start at 100");
    }
    runtime()?.block_on(async {
        let api = Api::connect(connection).await?;
        upload::run(args, &api, &target).await
    })
}

pub fn run_deploy(args: &DeployArgs) -> anyhow::Result<()> {
    conn::check_dns_name("--name", &args.name)?;
    let (connection, profile) = args.connect.resolve()?;
    let target = target(&args.node, &args.storage, None, &profile)?;
    runtime()?.block_on(async {
        let api = Api::connect(connection).await?;
        deploy::run(args, &api, &target).await
    })
}

/// Percent-encodes one path segment (a volume id, a UPID).
pub(crate) fn enc(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Import content needs PVE 8.4 or later.
async fn check_version(api: &Api) -> anyhow::Result<()> {
    let v = api.get("/version", &[]).await?;
    let version = v["version"].as_str().unwrap_or("0");
    let mut parts = version
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (8, 4) {
        bail!(
            "{} runs Proxmox VE {version}; uploading disk images (`import` content) needs 8.4 or \
             later",
            api.host()
        );
    }
    Ok(())
}

async fn check_node(api: &Api, node: &str) -> anyhow::Result<()> {
    let nodes = api.get("/nodes", &[]).await?;
    let names: Vec<&str> = nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["node"].as_str())
        .collect();
    if !names.contains(&node) {
        bail!(
            "--node {node}: no such node in this cluster (nodes: {})",
            names.join(", ")
        );
    }
    Ok(())
}

async fn storage_status(api: &Api, node: &str, storage: &str) -> anyhow::Result<Value> {
    let status = api
        .get(&format!("/nodes/{node}/storage/{storage}/status"), &[])
        .await;
    match status {
        Ok(s) => Ok(s),
        Err(e) => {
            let missing = e.downcast_ref::<ApiError>().is_some_and(|a| {
                matches!(a, ApiError::Other { message, .. } if message.contains("does not exist"))
            });
            if missing {
                let list = api.get(&format!("/nodes/{node}/storage"), &[]).await.ok();
                let names: Vec<String> = list
                    .as_ref()
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s["storage"].as_str().map(String::from))
                    .collect();
                let known = if names.is_empty() {
                    String::new()
                } else {
                    format!(" (storages: {})", names.join(", "))
                };
                bail!("--storage {storage}: no such storage on node {node}{known}");
            }
            Err(e)
        }
    }
}

/// Checks privileges before doing anything, from `GET /access/permissions`. A path's
/// privileges are those of the deepest listed path above it.
async fn check_privileges(api: &Api, needs: &[(String, &[&str])]) -> anyhow::Result<()> {
    let perms = api.get("/access/permissions", &[]).await?;
    let map = perms.as_object().cloned().unwrap_or_default();
    for (path, privs) in needs {
        let mut best: Option<&Value> = None;
        let mut probe = path.clone();
        loop {
            if let Some(v) = map.get(&probe) {
                best = Some(v);
                break;
            }
            if probe == "/" {
                break;
            }
            probe = match probe.rfind('/') {
                Some(0) | None => "/".into(),
                Some(i) => probe[..i].to_string(),
            };
        }
        for p in *privs {
            let has = best.is_some_and(|v| {
                v.get(*p)
                    .is_some_and(|x| x.as_u64() == Some(1) || x == true)
            });
            if !has {
                bail!(
                    "the API token lacks {p} on {path}: grant it, e.g. `pveum acl modify {path} \
                     --tokens TOKENID --roles PVEAdmin` (privilege-separated tokens need their \
                     own ACL entry)"
                );
            }
        }
    }
    Ok(())
}

async fn next_vmid(api: &Api) -> anyhow::Result<u32> {
    let v = api.get("/cluster/nextid", &[]).await?;
    // The server answers a string; accept a number too.
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .map(|n| n as u32)
        .with_context(|| format!("GET /cluster/nextid answered {v}, not a VMID"))
}
