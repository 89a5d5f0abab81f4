//! What `omni-image build` left next to an image: `NAME.qcow2`, `NAME.qcow2.sha256`
//! (sha256sum format) and `NAME.manifest.json`.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The manifest fields publishing reads. Every field is optional: an image without a
/// manifest still uploads, with defaults.
#[derive(Debug, Default, Deserialize)]
pub struct Manifest {
    pub name: Option<String>,
    #[serde(default)]
    pub recipe: Recipe,
    #[serde(default)]
    pub packages: Vec<serde_json::Value>,
    #[serde(default)]
    pub sizes: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Recipe {
    pub name: Option<String>,
    pub description: Option<String>,
    pub appliance: Option<String>,
    #[serde(default)]
    pub base: Base,
    #[serde(default)]
    pub vm: VmDefaults,
}

#[derive(Debug, Default, Deserialize)]
pub struct Base {
    pub distribution: Option<String>,
    pub suite: Option<String>,
}

/// `[vm]` of a recipe, as the manifest repeats it.
#[derive(Debug, Default, Deserialize)]
pub struct VmDefaults {
    /// MiB.
    pub memory: Option<u32>,
    pub cores: Option<u32>,
    #[serde(default)]
    pub tags: Vec<String>,
}

pub struct Image {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
    pub manifest: Manifest,
    /// The manifest's name, else the file's stem.
    pub name: String,
}

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

impl Image {
    pub fn open(path: &Path) -> anyhow::Result<Image> {
        let mut file = fs_err::File::open(path).context("opening the image")?;
        let size = file.metadata()?.len();
        let mut magic = [0u8; 4];
        if file.read_exact(&mut magic).is_err() || &magic != QCOW2_MAGIC {
            bail!(
                "{} is not a qcow2 image (no QFI\\xfb magic): upload takes what `omni-image \
                 build` writes; convert others with `qemu-img convert -O qcow2`",
                path.display()
            );
        }
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("image.qcow2");
        let stem = file_name.strip_suffix(".qcow2").unwrap_or(file_name);
        let dir = path.parent().unwrap_or(Path::new("."));

        let manifest_path = dir.join(format!("{stem}.manifest.json"));
        let manifest: Manifest = if manifest_path.exists() {
            let text = fs_err::read_to_string(&manifest_path)?;
            serde_json::from_str(&text)
                .with_context(|| format!("reading manifest {}", manifest_path.display()))?
        } else {
            tracing::info!("no manifest {}: using defaults", manifest_path.display());
            Manifest::default()
        };

        let sum_path = dir.join(format!("{file_name}.sha256"));
        let sha256 = if sum_path.exists() {
            let text = fs_err::read_to_string(&sum_path)?;
            let digest = text
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_lowercase();
            if digest.len() != 64 || !digest.chars().all(|c| c.is_ascii_hexdigit()) {
                bail!(
                    "{} is not in sha256sum format (HEX  FILE): rebuild the image or delete the \
                     file to have the checksum computed",
                    sum_path.display()
                );
            }
            // The checksum names the template that holds this image, so it must be this
            // file's: an old checksum beside a replaced image would match the old template.
            let actual = sha256_file(path)?;
            if actual != digest {
                bail!(
                    "{} does not match {} (the file's sha256 is {actual}, the checksum file says \
                     {digest}): the image changed after it was built; rebuild it, or delete the \
                     checksum file to upload it as it is",
                    sum_path.display(),
                    path.display()
                );
            }
            digest
        } else {
            tracing::info!("no {}: computing the checksum", sum_path.display());
            sha256_file(path)?
        };
        let name = manifest.name.clone().unwrap_or_else(|| stem.to_string());
        Ok(Image {
            path: path.to_path_buf(),
            size,
            sha256,
            manifest,
            name,
        })
    }

    /// A short summary for the template's description (Markdown, as the web UI renders it).
    pub fn description(&self) -> String {
        let m = &self.manifest;
        let mut d = format!("**{}**, built by omni-image\n\n", self.name);
        if let Some(text) = &m.recipe.description {
            d.push_str(&format!("{text}\n\n"));
        }
        if let Some(r) = &m.recipe.name {
            d.push_str(&format!("- recipe: {r}\n"));
        }
        if let Some(a) = &m.recipe.appliance {
            d.push_str(&format!("- appliance: {a}\n"));
        }
        if let (Some(dist), Some(suite)) = (&m.recipe.base.distribution, &m.recipe.base.suite) {
            d.push_str(&format!("- base: {dist} {suite}\n"));
        }
        if !m.packages.is_empty() {
            d.push_str(&format!("- packages: {}\n", m.packages.len()));
        }
        if let Some(disk) = m.sizes.get("disk_bytes").and_then(|v| v.as_u64()) {
            d.push_str(&format!("- disk: {} MiB\n", disk >> 20));
        }
        d.push_str(&format!(
            "- image: {} bytes\n- sha256: {}\n",
            self.size, self.sha256
        ));
        d
    }
}

pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file = fs_err::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}
