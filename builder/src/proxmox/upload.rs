//! `omni-image upload`: image to template, in the time the bytes take.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::TryStreamExt;
use serde_json::Value;

use super::api::{Api, is_transport};
use super::image::Image;
use super::{Target, UploadArgs, enc};

/// The upload is retried from the start this many times after a connection failure.
const UPLOAD_ATTEMPTS: u32 = 3;

/// Privileges the whole upload needs, by path.
const STORAGE_PRIVS: &[&str] = &[
    "Datastore.AllocateTemplate",
    "Datastore.AllocateSpace",
    "Datastore.Allocate",
    "Datastore.Audit",
];
const VM_PRIVS: &[&str] = &[
    "VM.Allocate",
    "VM.Config.Disk",
    "VM.Config.CDROM",
    "VM.Config.CPU",
    "VM.Config.Memory",
    "VM.Config.Network",
    "VM.Config.HWType",
    "VM.Config.Options",
    "VM.Config.Cloudinit",
];

pub fn tag_for(sha256: &str) -> String {
    format!("sha256-{}", &sha256[..16])
}

pub async fn run(args: &UploadArgs, api: &Api, target: &Target) -> anyhow::Result<()> {
    let started = Instant::now();
    let image = Image::open(&args.image)?;
    let name = args.name.clone().unwrap_or_else(|| image.name.clone());
    super::conn::check_dns_name("--name", &name)?;
    let node = target.node.as_str();
    let storage = target.storage.as_str();

    // Preflight: everything that can be known before sending gigabytes.
    super::check_version(api).await?;
    super::check_node(api, node).await?;
    let status = super::storage_status(api, node, storage).await?;
    let content = status["content"].as_str().unwrap_or("").to_string();
    let kinds: Vec<&str> = content.split(',').collect();
    for needed in ["import", "images"] {
        if !kinds.contains(&needed) {
            bail!(
                "storage {storage} on {node} does not hold '{needed}' content (it has: {content}); \
                 enable it on the node with: pvesm set {storage} --content {content},{needed}"
            );
        }
    }
    // The upload lands as a file, then is imported as the VM's disk: about twice its size.
    let avail = status["avail"].as_u64().unwrap_or(u64::MAX);
    if avail < image.size.saturating_mul(2) {
        bail!(
            "storage {storage} has {} free, the upload and its import need about {}: free space \
             or pass another --storage",
            human(avail),
            human(image.size * 2)
        );
    }
    super::check_privileges(
        api,
        &[
            (format!("/storage/{storage}"), STORAGE_PRIVS),
            ("/vms".into(), VM_PRIVS),
        ],
    )
    .await?;

    // Idempotency: the template's tag carries the image's checksum.
    let tag = tag_for(&image.sha256);
    let vms = api.get("/cluster/resources", &[("type", "vm")]).await?;
    let same_name: Vec<&Value> = vms
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["name"] == name.as_str())
        .collect();
    let mut replaced = None;
    for vm in &same_name {
        let vmid = vm["vmid"].as_u64().unwrap_or(0);
        let tags = vm["tags"].as_str().unwrap_or("");
        let is_template = vm["template"].as_u64() == Some(1);
        if is_template && tags.split([';', ',', ' ']).any(|t| t == tag) {
            let vnode = vm["node"].as_str().unwrap_or(node);
            let config = api
                .get(&format!("/nodes/{vnode}/qemu/{vmid}/config"), &[])
                .await?;
            if config["description"]
                .as_str()
                .is_some_and(|d| d.contains(&image.sha256))
            {
                eprintln!("template {name} (VMID {vmid}) already holds this image; nothing to do");
                println!("{vmid}");
                return Ok(());
            }
        }
        if !args.replace {
            bail!(
                "a {} named {name} already exists (VMID {vmid}) with another image: pass \
                 --replace to swap it for this one, or --name for another name",
                if is_template { "template" } else { "VM" }
            );
        }
        if !is_template {
            bail!("--replace: {name} (VMID {vmid}) is a VM, not a template; refusing to remove it");
        }
        replaced = Some((vmid, vm["node"].as_str().unwrap_or(node).to_string()));
    }

    let vmid = match args.vmid {
        Some(id) => {
            if let Some(vm) = vms
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["vmid"] == id)
            {
                bail!(
                    "--vmid {id} is taken by {} on {}: pick another or leave --vmid out",
                    vm["name"].as_str().unwrap_or("a VM"),
                    vm["node"].as_str().unwrap_or("?")
                );
            }
            id
        }
        None => super::next_vmid(api).await?,
    };

    // Upload under a name unique to this image, so two uploads never overwrite each other.
    let file_name = format!("{name}-{}.qcow2", &image.sha256[..12]);
    let volid = format!("{storage}:import/{file_name}");
    eprintln!(
        "uploading {} ({}) to {storage} on {node}",
        image.path.display(),
        human(image.size)
    );
    let upload_started = Instant::now();
    let upid = upload_with_retries(
        api,
        node,
        storage,
        "import",
        &image.path,
        &file_name,
        Some(&image.sha256),
    )
    .await?;
    api.wait_task(
        node,
        &upid,
        "importing the upload (checksum, qemu-img info)",
    )
    .await?;
    let secs = upload_started.elapsed().as_secs_f64();
    eprintln!(
        "uploaded in {secs:.1}s ({:.0} MiB/s)",
        image.size as f64 / secs / (1 << 20) as f64
    );

    // From here on, a failure removes what was made: no half-made template stays behind.
    let result = make_template(api, args, target, &image, &name, vmid, &volid, &tag).await;
    let cleanup = api
        .delete(&format!(
            "/nodes/{node}/storage/{storage}/content/{}",
            enc(&volid)
        ))
        .await;
    match cleanup {
        Ok(upid) => {
            if let Some(upid) = upid.as_str() {
                api.wait_task(node, upid, "removing the uploaded file")
                    .await?;
            }
        }
        Err(e) => tracing::warn!("removing {volid}: {e:#}"),
    }
    if let Err(e) = result {
        let _ = destroy(api, node, vmid).await;
        return Err(e);
    }

    if let Some((old, old_node)) = replaced {
        api.run_task(
            &old_node,
            api.delete(&format!("/nodes/{old_node}/qemu/{old}")),
            &format!("removing the replaced template {old}"),
        )
        .await?;
        eprintln!("replaced template VMID {old}");
    }
    eprintln!(
        "template {name} is VMID {vmid} ({:.1}s)",
        started.elapsed().as_secs_f64()
    );
    println!("{vmid}");
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn make_template(
    api: &Api,
    args: &UploadArgs,
    target: &Target,
    image: &Image,
    name: &str,
    vmid: u32,
    volid: &str,
    tag: &str,
) -> anyhow::Result<()> {
    let node = target.node.as_str();
    let st = args.disk_storage.as_deref().unwrap_or(&target.storage);
    let vm = &image.manifest.recipe.vm;
    let mut tags = vec!["omni-image".to_string(), tag.to_string()];
    for t in vm.tags.iter().filter(|t| valid_tag(t)) {
        if !tags.contains(t) {
            tags.push(t.clone());
        }
    }
    let params: Vec<(&str, String)> = vec![
        ("vmid", vmid.to_string()),
        ("name", name.to_string()),
        ("machine", "q35".into()),
        ("bios", "ovmf".into()),
        ("efidisk0", format!("{st}:1,efitype=4m,pre-enrolled-keys=0")),
        ("scsihw", "virtio-scsi-single".into()),
        (
            "scsi0",
            format!("{st}:0,import-from={volid},discard=on,iothread=1"),
        ),
        ("ide2", format!("{st}:cloudinit")),
        ("serial0", "socket".into()),
        ("vga", "serial0".into()),
        ("agent", "1".into()),
        ("boot", "order=scsi0".into()),
        ("ostype", "l26".into()),
        ("net0", format!("virtio,bridge={}", target.bridge)),
        ("memory", vm.memory.unwrap_or(1024).to_string()),
        ("cores", vm.cores.unwrap_or(1).to_string()),
        ("tags", tags.join(";")),
        ("description", image.description()),
    ];
    api.run_task(
        node,
        api.post(&format!("/nodes/{node}/qemu"), &params),
        &format!("creating VM {vmid}"),
    )
    .await?;
    api.run_task(
        node,
        api.post(&format!("/nodes/{node}/qemu/{vmid}/template"), &[]),
        &format!("converting VM {vmid} to a template"),
    )
    .await
}

fn valid_tag(t: &str) -> bool {
    let mut chars = t.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || "_-+.".contains(c))
}

pub async fn destroy(api: &Api, node: &str, vmid: u32) -> anyhow::Result<()> {
    let exists = api
        .get(&format!("/nodes/{node}/qemu/{vmid}/config"), &[])
        .await
        .is_ok();
    if exists {
        api.run_task(
            node,
            api.delete(&format!("/nodes/{node}/qemu/{vmid}")),
            &format!("removing the unfinished VM {vmid}"),
        )
        .await?;
    }
    Ok(())
}

/// Uploads a file, retrying from the start after a connection failure. Returns the UPID.
pub async fn upload_with_retries(
    api: &Api,
    node: &str,
    storage: &str,
    content: &str,
    path: &std::path::Path,
    file_name: &str,
    sha256: Option<&str>,
) -> anyhow::Result<String> {
    let mut attempt = 1;
    loop {
        match upload_once(api, node, storage, content, path, file_name, sha256).await {
            Ok(upid) => return Ok(upid),
            Err(e) if attempt < UPLOAD_ATTEMPTS && is_transport(&e) => {
                let reason = e.chain().last().map(|c| c.to_string()).unwrap_or_default();
                eprintln!(
                    "upload interrupted ({reason}); retrying from the start (attempt {} of \
                     {UPLOAD_ATTEMPTS})",
                    attempt + 1
                );
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(attempt as u64)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "uploading {} to {storage} (attempt {attempt})",
                        path.display()
                    )
                });
            }
        }
    }
}

/// One streaming multipart upload. The fields go in the order the server's parser requires
/// (`content`, `checksum-algorithm`, `checksum`, then the file part `filename`), and every
/// part has a known length so the body goes out with a `Content-Length`, never chunked.
async fn upload_once(
    api: &Api,
    node: &str,
    storage: &str,
    content: &str,
    path: &std::path::Path,
    file_name: &str,
    sha256: Option<&str>,
) -> anyhow::Result<String> {
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata().await?.len();
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let stream =
        tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).inspect_ok(move |chunk| {
            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        });
    let part =
        reqwest::multipart::Part::stream_with_length(reqwest::Body::wrap_stream(stream), size)
            .file_name(file_name.to_string())
            .mime_str("application/octet-stream")?;
    let mut form = reqwest::multipart::Form::new().text("content", content.to_string());
    if let Some(sum) = sha256 {
        form = form
            .text("checksum-algorithm", "sha256")
            .text("checksum", sum.to_string());
    }
    let form = form.part("filename", part);

    let progress = Progress::start(size, sent);
    let what = format!("POST /nodes/{node}/storage/{storage}/upload");
    let resp = api
        .request(
            reqwest::Method::POST,
            &format!("/nodes/{node}/storage/{storage}/upload"),
        )
        .multipart(form)
        .send()
        .await;
    progress.finish();
    let resp = api.sent(resp)?;
    let data = super::api::envelope(resp, &what).await?;
    data.as_str()
        .map(String::from)
        .context("the upload answer holds no task id")
}

/// A progress bar on a terminal, a line every 10 s otherwise.
struct Progress {
    handle: tokio::task::JoinHandle<()>,
}

impl Progress {
    fn start(total: u64, sent: Arc<AtomicU64>) -> Progress {
        let tty = std::io::stderr().is_terminal();
        let handle = tokio::spawn(async move {
            let bar = tty.then(|| {
                let bar = indicatif::ProgressBar::new(total);
                if let Ok(style) = indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                ) {
                    bar.set_style(style);
                }
                bar
            });
            let mut last_line = Instant::now();
            loop {
                let n = sent.load(Ordering::Relaxed);
                match &bar {
                    Some(bar) => bar.set_position(n),
                    None if last_line.elapsed() >= Duration::from_secs(10) => {
                        eprintln!("  sent {} of {}", human(n), human(total));
                        last_line = Instant::now();
                    }
                    None => {}
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Progress { handle }
    }

    fn finish(self) {
        self.handle.abort();
    }
}

pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}
