//! `omni-image build`: recipe in, bootable disk image out.
//!
//! The steps run in this order, each named and timed:
//! 1. `sources`: archives verified, repository keys pinned, artifacts fetched and checked
//!    (see [`crate::sources`]), before anything is installed;
//! 2. `bootstrap`: mmdebstrap makes the root tree from distribution packages;
//! 3. `overlays`: files and templates laid over it, then the recipe's artifacts;
//! 4. `firstboot`: the first-boot agent installed, the recipe's services enabled;
//! 5. `finalize`: the tree made clone-ready;
//! 6. `disk`: GPT, ESP and root filesystem written into a raw disk file;
//! 7. `output`: qcow2, checksum and manifest, published under their final names last.

mod agent;
mod boot_files;
pub mod bootstrap;
mod finalize;
pub mod manifest;
pub mod overlay;
pub mod scratch;
mod steps;
mod validate;

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::disk::{self, Ids, Layout};
use crate::exec::Cmd;
use crate::recipe::{Format, Recipe};
use crate::size::human;
use scratch::{Pending, Scratch};
use steps::Steps;

pub use agent::APPLIANCE_FILE;

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// The recipe (TOML), e.g. recipes/tsidp.toml.
    pub recipe: PathBuf,
    /// Folder for the image, its checksum and its manifest.
    #[arg(short, long, default_value = "out")]
    pub output: PathBuf,
    /// Where downloaded packages are kept between builds
    /// [default: $XDG_CACHE_HOME/omni-image or ~/.cache/omni-image].
    #[arg(long, env = "OMNI_IMAGE_CACHE")]
    pub cache_dir: Option<PathBuf>,
    /// Folder for the build's scratch tree [default: the output folder].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// The omni-firstboot binary to install [default: the one next to omni-image].
    #[arg(long, value_name = "PATH")]
    pub firstboot: Option<PathBuf>,
    /// Keep the scratch tree after the build (for debugging).
    #[arg(long)]
    pub keep_work: bool,
    /// Install missing host packages with apt-get first (as root), for every command.
    #[arg(long)]
    pub install_tools: bool,
    /// Bootstrap afresh: neither use nor fill the cache of base trees.
    #[arg(long, conflicts_with = "offline")]
    pub no_cache: bool,
    /// Use the network for nothing: only what earlier builds left in the cache (the
    /// archives' Release files, keys, artifacts and the base tree).
    #[arg(long)]
    pub offline: bool,
    /// Print the mmdebstrap command that bootstraps the recipe's packages into DIR, without
    /// the package cache, and exit (to reproduce or benchmark the bootstrap by hand).
    #[arg(long, value_name = "DIR")]
    pub print_bootstrap: Option<PathBuf>,
}

pub fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("omni-image");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache".into());
    home.join(".cache/omni-image")
}

/// What a finished build produced.
#[derive(Debug)]
pub struct Built {
    pub qcow2: Option<PathBuf>,
    pub raw: Option<PathBuf>,
    pub manifest: PathBuf,
    pub downloaded: usize,
}

pub fn run(args: &BuildArgs) -> Result<()> {
    if let Some(dir) = &args.print_bootstrap {
        let recipe = Recipe::load(&args.recipe)?;
        // The build's own default: the date of the suite's InRelease.
        let epoch = match epoch_from_env()? {
            Some(epoch) => epoch,
            None => bootstrap::release_date(&bootstrap::fetch_inrelease(&recipe)?)
                .map(|(_, epoch)| epoch)
                .context("the suite's InRelease has no Date; set SOURCE_DATE_EPOCH")?,
        };
        println!(
            "{}",
            bootstrap::command(&recipe, dir, None, epoch).display()
        );
        return Ok(());
    }
    // Without root the build runs again inside a user namespace in which it is root; this
    // happens before anything starts a thread.
    crate::userns::enter_if_started_inside()?;
    if !crate::hosttools::is_root() {
        if args.install_tools {
            crate::hosttools::setup(None, true)?;
        }
        crate::hosttools::check(crate::hosttools::Purpose::Build)?;
        std::process::exit(crate::userns::rerun_inside()?);
    }
    // An output folder this build created is removed again if the build fails before
    // putting anything in it.
    let new_output = !args.output.exists();
    let built = build(args).map_err(explain_disk_full).inspect_err(|_| {
        if new_output {
            let _ = std::fs::remove_dir(&args.output);
        }
    })?;
    for p in [
        built.qcow2.as_ref(),
        built.raw.as_ref(),
        Some(&built.manifest),
    ]
    .into_iter()
    .flatten()
    {
        println!("{}", p.display());
    }
    Ok(())
}

pub fn build(args: &BuildArgs) -> Result<Built> {
    // Inside the user namespace the outer process has done this already.
    if args.install_tools && !crate::userns::inside() {
        crate::hosttools::setup(None, true)?;
    }
    crate::hosttools::check(crate::hosttools::Purpose::Build)?;
    if !crate::hosttools::is_root() {
        bail!(
            "building needs root, or the user namespace `omni-image build` enters by itself: \
             run `omni-image build ...` (not the library's build() directly), or use sudo"
        );
    }
    crate::interrupt::install();
    let recipe = Recipe::load(&args.recipe)?;
    overlay::check_templates(&recipe.overlays, &crate::recipe::template_context(&recipe))?;
    let recipe_hash = recipe.hash();
    let agent_bin = agent::locate(args.firstboot.as_deref())?;
    ensure_writable(&args.output)?;
    let cache = args.cache_dir.clone().unwrap_or_else(default_cache_dir);
    fs_err::create_dir_all(&cache).with_context(|| {
        format!(
            "--cache-dir: cannot create {}; choose another folder",
            cache.display()
        )
    })?;

    crate::sources::fetch::configure(&cache, args.offline);

    let work_parent = args.work_dir.as_deref().unwrap_or(&args.output);
    let mut scratch = Scratch::create_in(work_parent, &format!(".omni-image-{}-", recipe.name))?;
    if args.keep_work {
        scratch.keep();
    }
    let tree = scratch.path().join("root");
    let mut steps = Steps::new();

    let step = steps.start(
        "sources",
        &format!(
            "verifying the base archive and {} repositories, fetching {} artifacts",
            recipe.repositories.len(),
            recipe.artifacts.len()
        ),
    );
    let sources = crate::sources::prepare(&recipe, scratch.path(), &cache)?;
    step.done(&format!(
        "{} archives verified, {} of {} artifacts downloaded",
        1 + sources.repositories.len(),
        sources.artifacts.iter().filter(|a| a.downloaded).count(),
        sources.artifacts.len()
    ));
    let epoch = match epoch_from_env()? {
        Some(epoch) => epoch,
        None => sources
            .base
            .inrelease_epoch
            .context("the suite's InRelease has no Date")?,
    };

    // The bootstrapped tree is cached under a key of everything that decides it; a hit skips
    // mmdebstrap entirely and the later steps start from a copy of the cached tree.
    let base_cache = crate::cache::BaseCache::new(&cache);
    let base_key = base_key(&recipe, &sources, epoch)?;
    let step = steps.start(
        "bootstrap",
        &format!(
            "{} {} from {}",
            recipe.base.distribution,
            recipe.base.suite,
            recipe.mirror()
        ),
    );
    let _key_lock = if args.no_cache {
        None
    } else {
        Some(base_cache.lock(&base_key)?)
    };
    let hit = !args.no_cache && base_cache.restore(&base_key, &tree)?;
    if !hit && args.offline {
        bail!(
            "--offline: the base tree for this recipe ({} {}, key {}) is not in the cache; \
             build once without --offline",
            recipe.base.distribution,
            recipe.base.suite,
            crate::cache::short(&base_key)
        );
    }
    let outcome = if hit {
        step.done(&format!(
            "base tree {} from the cache",
            crate::cache::short(&base_key)
        ));
        bootstrap::Outcome {
            cache_hit: true,
            ..Default::default()
        }
    } else {
        let outcome = bootstrap::run(&recipe, &tree, &cache, epoch, &step, &sources.repositories)?;
        if !args.no_cache {
            step.note("storing the base tree in the cache");
            let label = format!(
                "{} {} ({} packages, {})",
                recipe.base.distribution,
                recipe.base.suite,
                bootstrap::packages(&recipe).len(),
                recipe.name
            );
            base_cache.store(&base_key, &tree, &label)?;
        }
        step.done(&format!(
            "{} packages downloaded, {} from the cache",
            outcome.downloaded.len(),
            outcome.cached
        ));
        outcome
    };
    drop(_key_lock);
    crate::interrupt::check()?;

    let step = steps.start("overlays", &format!("{} overlays", recipe.overlays.len()));
    let applied = overlay::apply(
        &tree,
        &recipe.overlays,
        &crate::recipe::template_context(&recipe),
        epoch,
    )?;
    let artifacts = crate::sources::artifact::install(&tree, &sources.artifacts, epoch)?;
    validate::run(&tree, &recipe)?;
    step.done(&format!(
        "{} files, {} rendered from templates, {} artifacts",
        applied.files,
        applied.rendered,
        artifacts.len()
    ));
    crate::interrupt::check()?;

    let step = steps.start(
        "firstboot",
        "installing omni-firstboot and enabling services",
    );
    agent::install(&tree, &agent_bin, &recipe, epoch)?;
    agent::services(&tree, &recipe)?;
    step.done(&format!("agent from {}", agent_bin.display()));
    crate::interrupt::check()?;

    let layout = Layout::new(
        recipe.disk.size.bytes(),
        recipe.disk.esp_size.bytes(),
        Ids::derive(&recipe_hash),
    )?;
    let step = steps.start("finalize", "making the tree clone-ready");
    finalize::run(&tree, &recipe, &layout)?;
    finalize::clamp_times(&tree, epoch)?;
    let packages = manifest::installed_packages(&tree)?;
    let files = manifest::file_list(&tree)?;
    step.done(&format!(
        "{} packages installed, {} paths",
        packages.len(),
        files.len()
    ));
    crate::interrupt::check()?;

    let step = steps.start(
        "disk",
        &format!("GPT, ESP and ext4 in a {} disk", recipe.disk.size),
    );
    let cmdline = finalize::kernel_cmdline(&recipe, &layout);
    let title = if recipe.description.is_empty() {
        recipe.name.clone()
    } else {
        recipe.description.clone()
    };
    let esp = boot_files::contents(&tree, &recipe.name, &title, &cmdline)?;
    let kernel = boot_files::kernel(&tree)?.0;
    let tree_bytes = disk::ext4::estimate(&tree)?;
    let raw_dest = args.output.join(format!("{}.raw", recipe.name));
    let raw_pending = Pending::new(raw_dest);
    let raw_path = scratch.path().join("disk.raw");
    disk::assemble(&raw_path, &layout, &esp, &tree, epoch)?;
    let raw_allocated = allocated(&raw_path)?;
    step.done(&format!(
        "{} allocated of {}",
        human(raw_allocated),
        human(layout.disk_size)
    ));
    crate::interrupt::check()?;

    let step = steps.start("output", "writing qcow2, checksum and manifest");
    let mut outputs = Vec::new();
    let mut pendings = Vec::new();
    let mut qcow2_bytes = None;
    let mut qcow2_final = None;
    if recipe.output.formats.contains(&Format::Qcow2) {
        let dest = args.output.join(format!("{}.qcow2", recipe.name));
        let pending = Pending::new(dest.clone());
        step.note("converting to qcow2");
        let mut cmd = Cmd::new("qemu-img").args(["convert", "-q", "-f", "raw", "-O", "qcow2"]);
        if recipe.output.compress {
            cmd = cmd.args(["-c", "-o", "compression_type=zstd"]);
        }
        cmd.arg(&raw_path)
            .arg(pending.tmp())
            .output()
            .context("converting the disk to qcow2")?;
        let (sha, bytes) = sha256_file(pending.tmp())?;
        qcow2_bytes = Some(bytes);
        let sums = Pending::new(args.output.join(format!("{}.qcow2.sha256", recipe.name)));
        fs_err::write(sums.tmp(), format!("{sha}  {}.qcow2\n", recipe.name))?;
        outputs.push(manifest::OutputFile {
            format: "qcow2".into(),
            file: file_name(&dest),
            sha256: sha,
            bytes,
        });
        qcow2_final = Some(dest);
        pendings.push(pending);
        pendings.push(sums);
    }
    let mut raw_final = None;
    if recipe.output.formats.contains(&Format::Raw) {
        let (sha, bytes) = sha256_file(&raw_path)?;
        fs_err::rename(&raw_path, raw_pending.tmp())?;
        outputs.push(manifest::OutputFile {
            format: "raw".into(),
            file: file_name(raw_pending.dest()),
            sha256: sha,
            bytes,
        });
        raw_final = Some(raw_pending.dest().to_path_buf());
        pendings.push(raw_pending);
    }
    step.done(&format!(
        "{} qcow2",
        qcow2_bytes.map(human).unwrap_or_else(|| "no".into())
    ));

    // The manifest is written last, with every step's time, and published last: its presence
    // says the outputs beside it are complete.
    let man_pending = Pending::new(args.output.join(format!("{}.manifest.json", recipe.name)));
    let m = manifest::Manifest {
        name: &recipe.name,
        builder: format!("omni-image {}", env!("CARGO_PKG_VERSION")),
        recipe: &recipe,
        recipe_hash: recipe_hash.clone(),
        recipe_files: recipe
            .files
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        source_date_epoch: epoch,
        archive: (&sources.base).into(),
        repositories: sources
            .repositories
            .iter()
            .map(|r| (&r.archive).into())
            .collect(),
        artifacts,
        kernel,
        kernel_cmdline: cmdline,
        packages,
        files,
        base_tree: manifest::BaseTree {
            key: base_key.clone(),
            cache_hit: outcome.cache_hit,
        },
        downloaded_packages: outcome.downloaded.len(),
        cached_packages: outcome.cached,
        sizes: manifest::Sizes {
            tree_bytes,
            disk_bytes: layout.disk_size,
            esp_bytes: layout.esp_size,
            root_bytes: layout.root_size,
            raw_allocated_bytes: raw_allocated,
            qcow2_bytes,
        },
        outputs,
        timings: steps.timings.clone(),
        total_seconds: steps::round(steps.total().as_secs_f64()),
    };
    fs_err::write(man_pending.tmp(), serde_json::to_string_pretty(&m)? + "\n")?;
    let man_path = man_pending.dest().to_path_buf();

    for p in pendings {
        p.commit()?;
    }
    man_pending.commit()?;
    tracing::info!(
        "built {} in {:.1}s ({} packages downloaded)",
        recipe.name,
        steps.total().as_secs_f64(),
        outcome.downloaded.len()
    );
    Ok(Built {
        qcow2: qcow2_final,
        raw: raw_final,
        manifest: man_path,
        downloaded: outcome.downloaded.len(),
    })
}

/// The key of the base tree: everything that decides what mmdebstrap produces.
fn base_key(recipe: &Recipe, sources: &crate::sources::Sources, epoch: i64) -> Result<String> {
    let base = serde_json::to_vec(&recipe.base)?;
    let kernel = recipe.kernel.package.as_bytes();
    let packages = bootstrap::packages(recipe).join(",");
    let keyring = fs_err::read(&recipe.base.keyring)?;
    let epoch = epoch.to_string();
    let mut inputs: Vec<(String, Vec<u8>)> = vec![
        ("base".into(), base),
        ("kernel".into(), kernel.to_vec()),
        ("packages".into(), packages.into_bytes()),
        ("keyring".into(), keyring),
        (
            "inrelease".into(),
            sources.base.inrelease_sha256.clone().into_bytes(),
        ),
        ("epoch".into(), epoch.into_bytes()),
    ];
    for repo in &sources.repositories {
        let name = &repo.archive.name;
        inputs.push((
            format!("repo:{name}"),
            serde_json::to_vec(&repo.repository)?,
        ));
        inputs.push((format!("repo:{name}:key"), repo.keyring.clone()));
        inputs.push((
            format!("repo:{name}:inrelease"),
            repo.archive.inrelease_sha256.clone().into_bytes(),
        ));
    }
    let borrowed: Vec<(&str, &[u8])> = inputs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    Ok(crate::cache::key(&borrowed))
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Fails early, naming the flag, when the output folder cannot be written.
/// `SOURCE_DATE_EPOCH` from the environment, when it is set and not empty.
fn epoch_from_env() -> Result<Option<i64>> {
    match std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .filter(|v| !v.is_empty())
    {
        Some(v) => Ok(Some(v.parse().with_context(|| {
            format!("SOURCE_DATE_EPOCH=`{v}` is not a number")
        })?)),
        None => Ok(None),
    }
}

fn ensure_writable(dir: &Path) -> Result<()> {
    fs_err::create_dir_all(dir).with_context(|| {
        format!(
            "--output: cannot create {}; choose another folder with --output",
            dir.display()
        )
    })?;
    tempfile::tempfile_in(dir).with_context(|| {
        format!(
            "--output: {} is not writable; choose another folder with --output",
            dir.display()
        )
    })?;
    Ok(())
}

/// Bytes a (sparse) file really occupies.
fn allocated(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(fs_err::metadata(path)?.blocks() * 512)
}

pub fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut f = fs_err::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        crate::interrupt::check()?;
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), total))
}

/// A full disk shows up as "No space left on device" somewhere in the chain: say which
/// folders to free or move.
fn explain_disk_full(err: anyhow::Error) -> anyhow::Error {
    let full = err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::ENOSPC))
            || e.to_string().contains("No space left on device")
    });
    if full {
        err.context(
            "the disk filled up during the build; nothing was published and the scratch tree \
             was removed: free space, or point --output / --work-dir / --cache-dir elsewhere",
        )
    } else {
        err
    }
}
