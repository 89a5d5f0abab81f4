//! Recipes: what an image is made of, in TOML.
//!
//! A recipe file may `extends` another (its path relative to the extending file); the chain
//! is merged from the most general file to the most specific one:
//! - tables (`base`, `disk`, `kernel`, `output`, `vm`) merge key by key, the later file wins;
//! - `packages` accumulate; an entry `-name` removes `name` inherited from an earlier file;
//! - `overlays` accumulate in order, earlier files' overlays first;
//! - `kernel.cmdline` accumulates, earlier files' words first;
//! - `variables` merge key by key, the later file wins;
//! - `services.enable`, `services.disable` and `services.mask` accumulate;
//! - `[[repositories]]` and `[[artifacts]]` are keyed by `name`: an entry whose name an
//!   earlier file already used updates that entry key by key (the later file wins, a
//!   `packages` list replaces the earlier one); a new name is appended. `enabled = false`
//!   switches an entry off and `enabled = true` back on, so a general file can declare a
//!   source that only some recipes use.
//!
//! Unknown keys are errors reported as `file:line:column`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::size::{MIB, Size};

/// How deep `extends` may nest before it is taken for a cycle.
const MAX_EXTENDS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    Debian,
    Ubuntu,
}

impl Distribution {
    pub fn default_mirror(self) -> &'static str {
        match self {
            Distribution::Debian => "http://deb.debian.org/debian",
            Distribution::Ubuntu => "http://archive.ubuntu.com/ubuntu",
        }
    }

    pub fn default_keyring(self) -> &'static str {
        match self {
            Distribution::Debian => "/usr/share/keyrings/debian-archive-keyring.gpg",
            Distribution::Ubuntu => "/usr/share/keyrings/ubuntu-archive-keyring.gpg",
        }
    }

    pub fn default_components(self) -> &'static [&'static str] {
        match self {
            Distribution::Debian => &["main"],
            Distribution::Ubuntu => &["main", "universe"],
        }
    }

    /// The archive as it was at `timestamp` (`YYYYMMDDTHHMMSSZ`), from the distribution's
    /// snapshot service.
    pub fn snapshot_mirror(self, timestamp: &str) -> String {
        match self {
            Distribution::Debian => {
                format!("http://snapshot.debian.org/archive/debian/{timestamp}")
            }
            Distribution::Ubuntu => format!("https://snapshot.ubuntu.com/ubuntu/{timestamp}"),
        }
    }

    /// The kernel meant for virtual machines.
    pub fn default_kernel_package(self) -> &'static str {
        match self {
            Distribution::Debian => "linux-image-cloud-amd64",
            Distribution::Ubuntu => "linux-image-virtual",
        }
    }

    /// The package holding the keyring file, named in the error when the file is missing.
    pub fn keyring_package(self) -> &'static str {
        match self {
            Distribution::Debian => "debian-archive-keyring",
            Distribution::Ubuntu => "ubuntu-keyring",
        }
    }
}

impl fmt::Display for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Distribution::Debian => "debian",
            Distribution::Ubuntu => "ubuntu",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Appliance {
    Tsidp,
    Omni,
}

impl Appliance {
    pub fn as_str(self) -> &'static str {
        match self {
            Appliance::Tsidp => "tsidp",
            Appliance::Omni => "omni",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Qcow2,
    Raw,
}

// One file as written. Every key is optional here; what is required is checked after the
// chain has been merged.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RecipeFile {
    extends: Option<String>,
    name: Option<String>,
    description: Option<String>,
    appliance: Option<Appliance>,
    base: Option<BaseFile>,
    packages: Option<Vec<String>>,
    disk: Option<DiskFile>,
    kernel: Option<KernelFile>,
    overlays: Option<Vec<String>>,
    variables: Option<toml::Table>,
    output: Option<OutputFile>,
    vm: Option<VmFile>,
    services: Option<ServicesFile>,
    repositories: Option<Vec<RepositoryFile>>,
    artifacts: Option<Vec<ArtifactFile>>,
}

/// An extra apt repository, as one file writes it.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RepositoryFile {
    name: String,
    enabled: Option<bool>,
    url: Option<String>,
    suite: Option<String>,
    components: Option<Vec<String>>,
    key_url: Option<String>,
    fingerprint: Option<String>,
    packages: Option<Vec<String>>,
}

/// A file fetched by URL and pinned by sha256, as one file writes it.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ArtifactFile {
    name: String,
    enabled: Option<bool>,
    url: Option<String>,
    sha256: Option<String>,
    member: Option<String>,
    path: Option<String>,
    mode: Option<ModeFile>,
}

/// A file mode, written as an octal string (`"0755"`). A TOML integer is refused: the
/// parser cannot tell `755` (decimal, mode 1363) from `0o755`, and the first is a common slip.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum ModeFile {
    Number(u32),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct BaseFile {
    distribution: Option<Distribution>,
    suite: Option<String>,
    mirror: Option<String>,
    components: Option<Vec<String>>,
    keyring: Option<PathBuf>,
    variant: Option<String>,
    snapshot: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct DiskFile {
    size: Option<Size>,
    esp_size: Option<Size>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct KernelFile {
    package: Option<String>,
    cmdline: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct OutputFile {
    formats: Option<Vec<Format>>,
    compress: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ServicesFile {
    enable: Option<Vec<String>>,
    disable: Option<Vec<String>>,
    mask: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct VmFile {
    memory: Option<u32>,
    cores: Option<u32>,
    tags: Option<Vec<String>>,
}

/// A recipe with its `extends` chain merged and every default filled in.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Recipe {
    pub name: String,
    pub description: String,
    pub appliance: Option<Appliance>,
    pub base: Base,
    pub packages: Vec<String>,
    pub disk: Disk,
    pub kernel: Kernel,
    pub overlays: Vec<Overlay>,
    pub variables: toml::Table,
    pub output: Output,
    pub vm: Vm,
    pub services: Services,
    /// Extra apt repositories that are switched on, in the order they were first named.
    pub repositories: Vec<Repository>,
    /// Files fetched by URL and installed into the image, switched on ones only.
    pub artifacts: Vec<Artifact>,
    /// The files merged, most general first, as given or found.
    #[serde(skip)]
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Base {
    pub distribution: Distribution,
    pub suite: String,
    pub mirror: String,
    pub components: Vec<String>,
    pub keyring: PathBuf,
    pub variant: String,
    /// A dated snapshot of the archive (`20251201T000000Z`) the packages come from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Disk {
    pub size: Size,
    pub esp_size: Size,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Kernel {
    pub package: String,
    pub cmdline: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Output {
    pub formats: Vec<Format>,
    pub compress: bool,
}

/// systemd units to enable, disable or mask in the image (accumulated along `extends`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Services {
    pub enable: Vec<String>,
    pub disable: Vec<String>,
    pub mask: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Vm {
    pub memory: u32,
    pub cores: u32,
    pub tags: Vec<String>,
}

/// An extra apt repository whose key is pinned by fingerprint.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Repository {
    /// Names the keyring (`/usr/share/keyrings/NAME-archive-keyring.gpg`) and the source
    /// file (`/etc/apt/sources.list.d/NAME.sources`) in the image.
    pub name: String,
    /// The archive root, without a trailing slash.
    pub url: String,
    pub suite: String,
    pub components: Vec<String>,
    /// Where the repository's public key (binary or armored) is fetched from.
    pub key_url: String,
    /// The key's primary fingerprint, upper-case hex without spaces.
    pub fingerprint: String,
    /// Packages installed from it (or from anywhere apt finds them).
    pub packages: Vec<String>,
}

/// A file fetched by URL, pinned by sha256, installed at `path` with `mode`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Artifact {
    pub name: String,
    pub url: String,
    /// Lower-case hex.
    pub sha256: String,
    /// A file inside a `.tar.gz` to install instead of the download itself.
    pub member: Option<String>,
    /// Absolute path in the image.
    pub path: String,
    pub mode: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Overlay {
    /// As written in the recipe.
    pub name: String,
    /// Resolved against the folder of the recipe file that names it.
    #[serde(skip)]
    pub path: PathBuf,
}

impl Recipe {
    /// Reads a recipe and the files it extends.
    pub fn load(path: &Path) -> Result<Recipe> {
        let mut chain = Vec::new();
        let mut next = Some(path.to_path_buf());
        while let Some(path) = next.take() {
            if chain
                .iter()
                .any(|(p, _): &(PathBuf, RecipeFile)| same_file(p, &path))
            {
                let names: Vec<String> = chain
                    .iter()
                    .map(|(p, _)| p.display().to_string())
                    .chain(std::iter::once(path.display().to_string()))
                    .collect();
                bail!(
                    "`extends` forms a cycle: {}; one of them must stop extending",
                    names.join(" extends ")
                );
            }
            if chain.len() == MAX_EXTENDS {
                bail!(
                    "{}: `extends` nests deeper than {MAX_EXTENDS} files",
                    path.display()
                );
            }
            let file = match chain.last() {
                Some((child, _)) if !path.exists() => bail!(
                    "{}: `extends` names {}, which does not exist (the path is relative to \
                     the extending file)",
                    child.display(),
                    path.display()
                ),
                _ => read_file(&path)?,
            };
            if let Some(parent) = &file.extends {
                next = Some(relative_to(&path, parent));
            }
            chain.push((path, file));
        }
        chain.reverse();
        merge(chain, path)
    }

    /// A sha256 over the merged recipe, as JSON with sorted keys. Overlay contents are not
    /// part of it.
    pub fn hash(&self) -> String {
        let value = serde_json::to_value(self).expect("recipes serialize");
        hex::encode(Sha256::digest(value.to_string()))
    }

    pub fn mirror(&self) -> &str {
        self.base.mirror.trim_end_matches('/')
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn relative_to(file: &Path, target: &str) -> PathBuf {
    file.parent().unwrap_or(Path::new(".")).join(target)
}

fn read_file(path: &Path) -> Result<RecipeFile> {
    let text = fs_err::read_to_string(path).context("reading recipe")?;
    toml::from_str(&text).map_err(|err| {
        let (line, col) = err
            .span()
            .map(|s| line_col(&text, s.start))
            .unwrap_or((1, 1));
        anyhow::anyhow!("{}:{line}:{col}: {}", path.display(), err.message())
    })
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn merge(chain: Vec<(PathBuf, RecipeFile)>, top: &Path) -> Result<Recipe> {
    let mut name = None;
    let mut description = None;
    let mut appliance = None;
    let mut base = BaseFile::default();
    let mut packages: Vec<String> = Vec::new();
    let mut disk = DiskFile::default();
    let mut kernel_package = None;
    let mut cmdline = Vec::new();
    let mut overlays = Vec::new();
    let mut variables = toml::Table::new();
    let mut output = OutputFile::default();
    let mut vm = VmFile::default();
    let mut services = Services::default();
    let mut repositories: Vec<(PathBuf, RepositoryFile)> = Vec::new();
    let mut artifacts: Vec<(PathBuf, ArtifactFile)> = Vec::new();
    let mut files = Vec::new();

    for (path, file) in chain {
        name = file.name.or(name);
        description = file.description.or(description);
        appliance = file.appliance.or(appliance);
        if let Some(b) = file.base {
            base.distribution = b.distribution.or(base.distribution);
            base.suite = b.suite.or(base.suite);
            base.mirror = b.mirror.or(base.mirror);
            base.components = b.components.or(base.components);
            base.keyring = b
                .keyring
                .map(|k| resolve_keyring(&path, k))
                .or(base.keyring);
            base.variant = b.variant.or(base.variant);
            base.snapshot = b.snapshot.or(base.snapshot);
        }
        for pkg in file.packages.unwrap_or_default() {
            if let Some(removed) = pkg.strip_prefix('-') {
                let before = packages.len();
                packages.retain(|p| p != removed);
                if before == packages.len() {
                    bail!(
                        "{}: packages: `{pkg}` removes `{removed}`, which no recipe it extends \
                         installs",
                        path.display()
                    );
                }
            } else if !packages.contains(&pkg) {
                packages.push(pkg);
            }
        }
        if let Some(d) = file.disk {
            disk.size = d.size.or(disk.size);
            disk.esp_size = d.esp_size.or(disk.esp_size);
        }
        if let Some(k) = file.kernel {
            kernel_package = k.package.or(kernel_package);
            cmdline.extend(k.cmdline.unwrap_or_default());
        }
        for overlay in file.overlays.unwrap_or_default() {
            let resolved = relative_to(&path, &overlay);
            if !resolved.is_dir() {
                bail!(
                    "{}: overlays: folder `{overlay}` does not exist (looked for {}); overlay \
                     paths are relative to the recipe file that names them",
                    path.display(),
                    resolved.display()
                );
            }
            overlays.push(Overlay {
                name: overlay,
                path: resolved,
            });
        }
        for (k, v) in file.variables.unwrap_or_default() {
            variables.insert(k, v);
        }
        if let Some(o) = file.output {
            output.formats = o.formats.or(output.formats);
            output.compress = o.compress.or(output.compress);
        }
        if let Some(v) = file.vm {
            vm.memory = v.memory.or(vm.memory);
            vm.cores = v.cores.or(vm.cores);
            vm.tags = v.tags.or(vm.tags);
        }
        if let Some(sv) = file.services {
            services.enable.extend(sv.enable.unwrap_or_default());
            services.disable.extend(sv.disable.unwrap_or_default());
            services.mask.extend(sv.mask.unwrap_or_default());
        }
        for r in file.repositories.unwrap_or_default() {
            match repositories.iter_mut().find(|(_, e)| e.name == r.name) {
                Some((at, e)) => {
                    *at = path.clone();
                    e.enabled = r.enabled.or(e.enabled);
                    e.url = r.url.or(e.url.take());
                    e.suite = r.suite.or(e.suite.take());
                    e.components = r.components.or(e.components.take());
                    e.key_url = r.key_url.or(e.key_url.take());
                    e.fingerprint = r.fingerprint.or(e.fingerprint.take());
                    e.packages = r.packages.or(e.packages.take());
                }
                None => repositories.push((path.clone(), r)),
            }
        }
        for a in file.artifacts.unwrap_or_default() {
            match artifacts.iter_mut().find(|(_, e)| e.name == a.name) {
                Some((at, e)) => {
                    *at = path.clone();
                    e.enabled = a.enabled.or(e.enabled);
                    e.url = a.url.or(e.url.take());
                    e.sha256 = a.sha256.or(e.sha256.take());
                    e.member = a.member.or(e.member.take());
                    e.path = a.path.or(e.path.take());
                    e.mode = a.mode.or(e.mode.take());
                }
                None => artifacts.push((path.clone(), a)),
            }
        }
        files.push(path);
    }

    let top_name = top.display();
    let distribution = base.distribution.unwrap_or(Distribution::Debian);
    let suite = base
        .suite
        .with_context(|| format!("{top_name}: `base.suite` is not set (e.g. \"trixie\")"))?;
    let name = match name {
        Some(n) => n,
        None => top
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .context("recipe has no `name` and its file name gives none")?,
    };
    check_name(&name).with_context(|| format!("{top_name}: `name`"))?;
    let disk = Disk {
        size: disk.size.unwrap_or(Size(2 << 30)),
        esp_size: disk.esp_size.unwrap_or(Size(128 * MIB)),
    };
    if disk.esp_size.bytes() < 64 * MIB {
        bail!(
            "{top_name}: `disk.esp-size` is {}: a FAT32 ESP needs at least 64M",
            disk.esp_size
        );
    }
    if disk.size.bytes() < disk.esp_size.bytes() + 256 * MIB {
        bail!(
            "{top_name}: `disk.size` ({}) leaves less than 256M for the root filesystem",
            disk.size
        );
    }
    let suite_for_sources = suite.clone();
    let keyring = base
        .keyring
        .unwrap_or_else(|| PathBuf::from(distribution.default_keyring()));
    let recipe = Recipe {
        name,
        description: description.unwrap_or_default(),
        appliance,
        base: Base {
            distribution,
            suite,
            mirror: match (base.mirror, &base.snapshot) {
                (Some(m), _) => {
                    if !["http://", "https://", "file://"]
                        .iter()
                        .any(|s| m.starts_with(s) && m.len() > s.len())
                    {
                        bail!(
                            "{top_name}: `base.mirror` `{m}` needs an http://, https:// or \
                             file:// scheme, like \"{}\"",
                            distribution.default_mirror()
                        );
                    }
                    m
                }
                (None, Some(ts)) => {
                    check_snapshot(ts).with_context(|| format!("{top_name}: `base.snapshot`"))?;
                    distribution.snapshot_mirror(ts)
                }
                (None, None) => distribution.default_mirror().to_owned(),
            },
            components: base.components.unwrap_or_else(|| {
                distribution
                    .default_components()
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
            }),
            keyring,
            variant: base.variant.unwrap_or_else(|| "minbase".to_owned()),
            snapshot: base.snapshot,
        },
        packages,
        disk,
        kernel: Kernel {
            package: kernel_package
                .unwrap_or_else(|| distribution.default_kernel_package().to_owned()),
            cmdline,
        },
        overlays,
        variables,
        output: Output {
            formats: output.formats.unwrap_or_else(|| vec![Format::Qcow2]),
            compress: output.compress.unwrap_or(false),
        },
        vm: Vm {
            memory: vm.memory.unwrap_or(1024),
            cores: vm.cores.unwrap_or(1),
            tags: vm.tags.unwrap_or_default(),
        },
        services,
        repositories: repositories
            .into_iter()
            .filter(|(_, r)| r.enabled.unwrap_or(true))
            .map(|(file, r)| finish_repository(&file, r, &suite_for_sources))
            .collect::<Result<_>>()?,
        artifacts: artifacts
            .into_iter()
            .filter(|(_, a)| a.enabled.unwrap_or(true))
            .map(|(file, a)| finish_artifact(&file, a))
            .collect::<Result<_>>()?,
        files,
    };
    if !matches!(
        recipe.base.variant.as_str(),
        "minbase" | "essential" | "apt" | "required"
    ) {
        bail!(
            "{top_name}: `base.variant` is `{}`: use minbase, required, essential or apt",
            recipe.base.variant
        );
    }
    if recipe.output.formats.is_empty() {
        bail!("{top_name}: `output.formats` is empty: name at least \"qcow2\" or \"raw\"");
    }
    Ok(recipe)
}

/// An enabled repository with every required key present and well-formed. `file` is the
/// last recipe file that wrote to the entry, named in errors.
fn finish_repository(file: &Path, r: RepositoryFile, base_suite: &str) -> Result<Repository> {
    let at = |key: &str| format!("{}: repositories `{}`: {key}", file.display(), r.name);
    check_source_name(&r.name).with_context(|| at("name"))?;
    let url = r
        .url
        .with_context(|| format!("{} is not set", at("url")))?
        .trim_end_matches('/')
        .to_owned();
    check_url(&url, &["http", "https"]).with_context(|| at("url"))?;
    let key_url = r.key_url.with_context(|| {
        format!(
            "{} is not set: name where the repository's signing key is published",
            at("key-url")
        )
    })?;
    check_url(&key_url, &["http", "https", "file"]).with_context(|| at("key-url"))?;
    let fingerprint = r.fingerprint.with_context(|| {
        format!(
            "{} is not set: an unpinned key is refused; pin the primary key's fingerprint as \
             the repository's owner publishes it",
            at("fingerprint")
        )
    })?;
    let fingerprint =
        crate::sources::openpgp::normalize_fingerprint(&fingerprint).with_context(|| {
            format!(
                "{}: `{fingerprint}` is not a fingerprint (40 or 64 hex digits)",
                at("fingerprint")
            )
        })?;
    let components = r.components.unwrap_or_else(|| vec!["main".to_owned()]);
    if components.is_empty() {
        bail!(
            "{} is empty: name at least one, e.g. \"main\"",
            at("components")
        );
    }
    Ok(Repository {
        name: r.name,
        url,
        suite: r.suite.unwrap_or_else(|| base_suite.to_owned()),
        components,
        key_url,
        fingerprint,
        packages: r.packages.unwrap_or_default(),
    })
}

/// An enabled artifact with every required key present and well-formed.
fn finish_artifact(file: &Path, a: ArtifactFile) -> Result<Artifact> {
    let at = |key: &str| format!("{}: artifacts `{}`: {key}", file.display(), a.name);
    check_source_name(&a.name).with_context(|| at("name"))?;
    let url = a.url.with_context(|| format!("{} is not set", at("url")))?;
    check_url(&url, &["http", "https", "file"]).with_context(|| at("url"))?;
    let sha256 = a.sha256.with_context(|| {
        format!(
            "{} is not set: an artifact must be pinned by the sha256 of what `url` serves",
            at("sha256")
        )
    })?;
    let sha256 = sha256.trim().to_ascii_lowercase();
    if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!(
            "{}: `{sha256}` is not a sha256 (64 hex digits)",
            at("sha256")
        );
    }
    let path = a.path.with_context(|| {
        format!(
            "{} is not set (where the file lands in the image)",
            at("path")
        )
    })?;
    if !path.starts_with('/') || path.ends_with('/') || path.split('/').any(|p| p == "..") {
        bail!(
            "{}: `{path}` must be an absolute file path in the image, without `..`",
            at("path")
        );
    }
    if let Some(m) = &a.member
        && (m.is_empty() || m.starts_with('/') || m.split('/').any(|p| p == ".."))
    {
        bail!(
            "{}: `{m}` must be a relative path inside the tarball",
            at("member")
        );
    }
    let mode = match a.mode {
        None => 0o644,
        Some(ModeFile::Number(n)) => bail!(
            "{}: write the mode as an octal string, like \"0755\" (the number {n} would be \
             read as mode {n:o})",
            at("mode")
        ),
        Some(ModeFile::Text(t)) => u32::from_str_radix(t.trim_start_matches("0o"), 8)
            .ok()
            .with_context(|| format!("{}: `{t}` is not an octal mode like \"0755\"", at("mode")))?,
    };
    if mode > 0o7777 {
        bail!("{}: {mode:o} is not a file mode (at most 7777)", at("mode"));
    }
    Ok(Artifact {
        name: a.name,
        url,
        sha256,
        member: a.member,
        path,
        mode,
    })
}

/// Source names become file names in the image.
fn check_source_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
        && !name.starts_with(['-', '.']);
    if !ok {
        bail!("`{name}` is not a valid name: use lowercase letters, digits, `-`, `_` and `.`");
    }
    Ok(())
}

fn check_url(url: &str, schemes: &[&str]) -> Result<()> {
    let scheme = url.split_once("://").map(|(s, _)| s);
    match scheme {
        Some(s) if schemes.contains(&s) => Ok(()),
        _ => bail!(
            "`{url}` is not a URL this builder can fetch: use {}",
            schemes
                .iter()
                .map(|s| format!("{s}://"))
                .collect::<Vec<_>>()
                .join(" or ")
        ),
    }
}

/// Keyrings given as relative paths are relative to the recipe file; absolute ones are
/// host paths such as `/usr/share/keyrings/...`.
fn resolve_keyring(recipe: &Path, keyring: PathBuf) -> PathBuf {
    if keyring.is_absolute() {
        keyring
    } else {
        recipe.parent().unwrap_or(Path::new(".")).join(keyring)
    }
}

/// Snapshot timestamps as the snapshot services spell them: `20251201T000000Z`.
fn check_snapshot(ts: &str) -> Result<()> {
    let b = ts.as_bytes();
    let ok = b.len() == 16
        && b[8] == b'T'
        && b[15] == b'Z'
        && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit);
    if !ok {
        bail!("`{ts}` is not a snapshot timestamp: write it like 20251201T000000Z (UTC)");
    }
    Ok(())
}

/// Image names become file names, VM names and host names: keep them DNS labels.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !ok {
        bail!("`{name}` is not a valid name: use lowercase letters, digits and inner dashes");
    }
    Ok(())
}

/// The template variables overlays see: the recipe's own, plus `recipe.*` facts.
pub fn template_context(recipe: &Recipe) -> BTreeMap<String, serde_json::Value> {
    let mut ctx: BTreeMap<String, serde_json::Value> = recipe
        .variables
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                serde_json::to_value(v).expect("toml values serialize"),
            )
        })
        .collect();
    ctx.insert(
        "recipe".into(),
        serde_json::json!({
            "name": recipe.name,
            "appliance": recipe.appliance.map(Appliance::as_str),
            "distribution": recipe.base.distribution.to_string(),
            "suite": recipe.base.suite,
        }),
    );
    ctx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    const BASE: &str = r#"
packages = ["systemd"]
[base]
suite = "trixie"
"#;

    #[test]
    fn unknown_key_names_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "r.toml",
            "[base]\nsuite = \"trixie\"\nmirorr = \"x\"\n",
        );
        let err = format!("{:#}", Recipe::load(&path).unwrap_err());
        assert!(err.contains("r.toml:3:1"), "{err}");
        assert!(err.contains("unknown field `mirorr`"), "{err}");
    }

    #[test]
    fn top_level_typo_is_reported_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "r.toml",
            "pakages = [\"vim\"]\n[base]\nsuite = \"trixie\"\n",
        );
        let err = format!("{:#}", Recipe::load(&path).unwrap_err());
        assert!(err.contains("r.toml:1:1"), "{err}");
        assert!(err.contains("pakages"), "{err}");
    }

    #[test]
    fn bad_size_is_reported_with_position() {
        let dir = tempfile::tempdir().unwrap();
        let text = "[base]\nsuite = \"trixie\"\n[disk]\nsize = \"2X\"\n";
        let path = write(dir.path(), "r.toml", text);
        let err = format!("{:#}", Recipe::load(&path).unwrap_err());
        assert!(err.contains("r.toml:4:8"), "{err}");
        assert!(err.contains("not a size unit"), "{err}");
    }

    #[test]
    fn extends_merges_by_the_documented_rules() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("o1")).unwrap();
        std::fs::create_dir_all(dir.path().join("o2")).unwrap();
        write(
            dir.path(),
            "base.toml",
            r#"
packages = ["systemd", "less", "vim-tiny"]
overlays = ["o1"]
[base]
suite = "trixie"
components = ["main"]
[disk]
size = "2G"
[kernel]
cmdline = ["console=ttyS0"]
[variables]
greeting = "hello"
port = 443
"#,
        );
        let child = write(
            dir.path(),
            "child.toml",
            r#"
extends = "base.toml"
packages = ["docker.io", "-less", "systemd"]
overlays = ["o2"]
[disk]
esp-size = "64M"
[kernel]
cmdline = ["quiet"]
[variables]
greeting = "hi"
"#,
        );
        let r = Recipe::load(&child).unwrap();
        assert_eq!(r.name, "child");
        assert_eq!(r.packages, ["systemd", "vim-tiny", "docker.io"]);
        assert_eq!(
            r.overlays
                .iter()
                .map(|o| o.name.as_str())
                .collect::<Vec<_>>(),
            ["o1", "o2"]
        );
        assert_eq!(r.kernel.cmdline, ["console=ttyS0", "quiet"]);
        assert_eq!(r.disk.size, Size(2 << 30));
        assert_eq!(r.disk.esp_size, Size(64 << 20));
        assert_eq!(r.variables["greeting"].as_str(), Some("hi"));
        assert_eq!(r.variables["port"].as_integer(), Some(443));
        assert_eq!(r.base.mirror, "http://deb.debian.org/debian");
        assert_eq!(r.kernel.package, "linux-image-cloud-amd64");
        assert_eq!(r.files.len(), 2);
    }

    #[test]
    fn removing_a_package_nobody_installs_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "base.toml", BASE);
        let child = write(
            dir.path(),
            "c.toml",
            "extends = \"base.toml\"\npackages = [\"-nano\"]\n",
        );
        let err = format!("{:#}", Recipe::load(&child).unwrap_err());
        assert!(err.contains("`-nano` removes `nano`"), "{err}");
    }

    #[test]
    fn missing_overlay_folder_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "r.toml",
            "overlays = [\"nowhere\"]\n[base]\nsuite = \"trixie\"\n",
        );
        let err = format!("{:#}", Recipe::load(&path).unwrap_err());
        assert!(err.contains("folder `nowhere` does not exist"), "{err}");
    }

    #[test]
    fn extends_cycle_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.toml", "extends = \"b.toml\"\n");
        let b = write(dir.path(), "b.toml", "extends = \"a.toml\"\n");
        let err = format!("{:#}", Recipe::load(&b).unwrap_err());
        assert!(
            err.contains("cycle") && err.contains("b.toml extends") && err.contains("a.toml"),
            "{err}"
        );
        let c = write(dir.path(), "c.toml", "extends = \"sub/none.toml\"\n");
        let err = format!("{:#}", Recipe::load(&c).unwrap_err());
        assert!(
            err.contains("c.toml: `extends` names") && err.contains("none.toml, which does not"),
            "{err}"
        );
    }

    #[test]
    fn missing_suite_and_bad_name_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "r.toml", "[disk]\nsize = \"2G\"\n");
        let err = format!("{:#}", Recipe::load(&path).unwrap_err());
        assert!(err.contains("`base.suite` is not set"), "{err}");
        let path = write(
            dir.path(),
            "r.toml",
            "name = \"My_Image\"\n[base]\nsuite = \"trixie\"\n",
        );
        let err = format!("{:#}", Recipe::load(&path).unwrap_err());
        assert!(err.contains("not a valid name"), "{err}");
    }

    #[test]
    fn a_mirror_needs_a_scheme() {
        let dir = tempfile::tempdir().unwrap();
        for m in [
            "deb.debian.org/debian",
            "ftp://ftp.debian.org/debian",
            "http://",
        ] {
            let path = write(
                dir.path(),
                "m.toml",
                &format!("[base]\nsuite = \"trixie\"\nmirror = \"{m}\"\n"),
            );
            let err = format!("{:#}", Recipe::load(&path).unwrap_err());
            assert!(
                err.contains("m.toml: `base.mirror`") && err.contains("scheme"),
                "{m}: {err}"
            );
        }
        let path = write(
            dir.path(),
            "m.toml",
            "[base]\nsuite = \"trixie\"\nmirror = \"https://deb.example/debian\"\n",
        );
        assert_eq!(
            Recipe::load(&path).unwrap().base.mirror,
            "https://deb.example/debian"
        );
    }

    #[test]
    fn a_snapshot_pins_the_mirror() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "s.toml",
            "[base]\nsuite = \"trixie\"\nsnapshot = \"20251201T000000Z\"\n",
        );
        let r = Recipe::load(&path).unwrap();
        assert_eq!(
            r.base.mirror,
            "http://snapshot.debian.org/archive/debian/20251201T000000Z"
        );
        let path = write(
            dir.path(),
            "s.toml",
            "[base]\nsuite = \"trixie\"\nsnapshot = \"2025-12-01\"\n",
        );
        let err = format!("{:#}", Recipe::load(&path).unwrap_err());
        assert!(
            err.contains("`base.snapshot`") && err.contains("20251201T000000Z"),
            "{err}"
        );
    }

    #[test]
    fn ubuntu_gets_its_own_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "u.toml",
            "[base]\ndistribution = \"ubuntu\"\nsuite = \"noble\"\n",
        );
        let r = Recipe::load(&path).unwrap();
        assert_eq!(r.base.mirror, "http://archive.ubuntu.com/ubuntu");
        assert_eq!(r.base.components, ["main", "universe"]);
        assert_eq!(r.kernel.package, "linux-image-virtual");
        assert!(r.base.keyring.ends_with("ubuntu-archive-keyring.gpg"));
    }

    #[test]
    fn hash_changes_with_content() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a.toml", "[base]\nsuite = \"trixie\"\n");
        let b = write(
            dir.path(),
            "b.toml",
            "name = \"a\"\n[base]\nsuite = \"forky\"\n",
        );
        let (a, b) = (Recipe::load(&a).unwrap(), Recipe::load(&b).unwrap());
        assert_ne!(a.hash(), b.hash());
        assert_eq!(a.hash(), a.clone().hash());
    }

    const SOURCES: &str = r#"
[base]
suite = "trixie"

[[repositories]]
name = "vendor"
enabled = false
url = "https://pkgs.example.org/debian/"
key-url = "https://pkgs.example.org/key.gpg"
fingerprint = "2596 a99e AAB3 3821 893C  0A79 458C A832 957F 5868"
packages = ["vendor-tool"]

[[artifacts]]
name = "tool"
url = "https://example.org/tool.tar.gz"
sha256 = "AB00000000000000000000000000000000000000000000000000000000000000"
member = "tool"
path = "/usr/local/bin/tool"
mode = "0755"

[[artifacts]]
name = "motd"
url = "file:///srv/motd"
sha256 = "cd00000000000000000000000000000000000000000000000000000000000000"
path = "/etc/motd"
"#;

    #[test]
    fn repositories_and_artifacts_merge_by_name() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "base.toml", SOURCES);
        let r = Recipe::load(&dir.path().join("base.toml")).unwrap();
        assert!(r.repositories.is_empty(), "switched off");
        assert_eq!(r.artifacts.len(), 2);
        assert_eq!(r.artifacts[0].sha256, format!("ab{}", "0".repeat(62)));
        assert_eq!(r.artifacts[0].mode, 0o755);
        assert_eq!(r.artifacts[1].mode, 0o644);

        let child = write(
            dir.path(),
            "child.toml",
            r#"
extends = "base.toml"
[[repositories]]
name = "vendor"
enabled = true
[[artifacts]]
name = "tool"
url = "http://127.0.0.1:8080/tool.tar.gz"
sha256 = "ef00000000000000000000000000000000000000000000000000000000000000"
[[artifacts]]
name = "motd"
enabled = false
"#,
        );
        let r = Recipe::load(&child).unwrap();
        let repo = &r.repositories[0];
        assert_eq!(repo.url, "https://pkgs.example.org/debian");
        assert_eq!(repo.suite, "trixie", "the base suite by default");
        assert_eq!(repo.components, ["main"]);
        assert_eq!(repo.fingerprint, "2596A99EAAB33821893C0A79458CA832957F5868");
        assert_eq!(repo.packages, ["vendor-tool"]);
        assert_eq!(r.artifacts.len(), 1);
        let tool = &r.artifacts[0];
        assert_eq!(tool.url, "http://127.0.0.1:8080/tool.tar.gz");
        assert_eq!(tool.member.as_deref(), Some("tool"));
        assert_eq!(tool.path, "/usr/local/bin/tool");
        assert_eq!(tool.mode, 0o755);
        assert!(crate::build::bootstrap::packages(&r).contains(&"vendor-tool".to_owned()));
    }

    #[test]
    fn an_unpinned_or_misspelt_source_is_refused_naming_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "base.toml", SOURCES);
        let cases = [
            (
                "[[repositories]]\nname = \"vendor\"\nenabled = true\nfingerprint = \"957F5868\"\n",
                "repositories `vendor`: fingerprint: `957F5868` is not a fingerprint",
            ),
            (
                "[[repositories]]\nname = \"x\"\nurl = \"https://x\"\nkey-url = \"https://x/k\"\n",
                "repositories `x`: fingerprint is not set: an unpinned key is refused",
            ),
            (
                "[[repositories]]\nname = \"x\"\nurl = \"ftp://x\"\n",
                "repositories `x`: url",
            ),
            (
                "[[artifacts]]\nname = \"tool\"\nsha256 = \"abc\"\n",
                "artifacts `tool`: sha256: `abc` is not a sha256",
            ),
            (
                "[[artifacts]]\nname = \"new\"\nurl = \"https://x/y\"\npath = \"/y\"\n",
                "artifacts `new`: sha256 is not set",
            ),
            (
                "[[artifacts]]\nname = \"tool\"\npath = \"usr/bin/tool\"\n",
                "artifacts `tool`: path: `usr/bin/tool` must be an absolute file path",
            ),
            (
                "[[artifacts]]\nname = \"tool\"\nmode = \"rwx\"\n",
                "artifacts `tool`: mode: `rwx` is not an octal mode",
            ),
            (
                "[[artifacts]]\nname = \"tool\"\nmode = 755\n",
                "artifacts `tool`: mode: write the mode as an octal string, like \"0755\" (the number 755 would be read as mode 1363)",
            ),
        ];
        for (text, expected) in cases {
            let child = write(
                dir.path(),
                "child.toml",
                &format!("extends = \"base.toml\"\n{text}"),
            );
            let err = format!("{:#}", Recipe::load(&child).unwrap_err());
            assert!(err.contains("child.toml: "), "{err}");
            assert!(err.contains(expected), "{expected}\n{err}");
        }
        let child = write(
            dir.path(),
            "child.toml",
            "extends = \"base.toml\"\n[[artifacts]]\nname = \"tool\"\nsha265 = \"x\"\n",
        );
        let err = format!("{:#}", Recipe::load(&child).unwrap_err());
        assert!(err.contains("child.toml:4:1"), "{err}");
    }

    #[test]
    fn tailscale_is_off_by_default_and_one_switch_away() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes");
        for name in ["tsidp.toml", "omni.toml"] {
            let r = Recipe::load(&root.join(name)).unwrap();
            assert!(r.repositories.is_empty(), "{name}");
            assert!(!crate::build::bootstrap::packages(&r).contains(&"tailscale".to_owned()));
        }
        let dir = tempfile::tempdir().unwrap();
        let child = write(
            dir.path(),
            "admin.toml",
            &format!(
                "extends = \"{}\"\n[[repositories]]\nname = \"tailscale\"\nenabled = true\n",
                root.join("omni.toml").display()
            ),
        );
        let r = Recipe::load(&child).unwrap();
        let ts = &r.repositories[0];
        assert_eq!(ts.url, "https://pkgs.tailscale.com/stable/debian");
        assert_eq!(ts.suite, "trixie");
        assert_eq!(
            ts.key_url,
            "https://pkgs.tailscale.com/stable/debian/trixie.noarmor.gpg"
        );
        assert_eq!(ts.fingerprint, "2596A99EAAB33821893C0A79458CA832957F5868");
        assert!(crate::build::bootstrap::packages(&r).contains(&"tailscale".to_owned()));
    }

    #[test]
    fn tsidp_declares_its_tarball_and_refuses_it_unpinned() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes");
        assert!(
            Recipe::load(&root.join("tsidp.toml"))
                .unwrap()
                .artifacts
                .is_empty()
        );
        let dir = tempfile::tempdir().unwrap();
        let tsidp = root.join("tsidp.toml");
        let on = write(
            dir.path(),
            "on.toml",
            &format!(
                "extends = \"{}\"\n[[artifacts]]\nname = \"tsidp\"\nenabled = true\n",
                tsidp.display()
            ),
        );
        let err = format!("{:#}", Recipe::load(&on).unwrap_err());
        assert!(
            err.contains("artifacts `tsidp`: sha256 is not set"),
            "{err}"
        );
        let pinned = write(
            dir.path(),
            "pinned.toml",
            &format!(
                "extends = \"{}\"\n[[artifacts]]\nname = \"tsidp\"\nenabled = true\n\
                 sha256 = \"{}\"\n",
                tsidp.display(),
                "1".repeat(64)
            ),
        );
        let r = Recipe::load(&pinned).unwrap();
        let a = &r.artifacts[0];
        assert!(
            a.url
                .starts_with("https://github.com/tailscale/tsidp/releases/download/v")
        );
        assert!(a.url.ends_with("_linux_amd64.tar.gz"));
        assert_eq!(
            (a.member.as_deref(), a.path.as_str(), a.mode),
            (Some("tsidp"), "/usr/local/bin/tsidp", 0o755)
        );
    }

    #[test]
    fn shipped_recipes_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes");
        for name in ["tsidp.toml", "omni.toml"] {
            let r = Recipe::load(&root.join(name)).unwrap();
            assert!(r.packages.iter().any(|p| p == "openssh-server"), "{name}");
            assert!(r.appliance.is_some(), "{name}");
        }
        let omni = Recipe::load(&root.join("omni.toml")).unwrap();
        assert!(omni.packages.iter().any(|p| p == "docker.io"));
        assert!(omni.packages.iter().any(|p| p == "docker-compose"));
    }
}
