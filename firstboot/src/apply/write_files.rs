//! cloud-config `write_files`.

use anyhow::{Context, Result};

use crate::accounts;
use crate::config::userdata::WriteFile;
use crate::fsutil::{self, Root};

pub fn apply(root: &Root, file: &WriteFile) -> Result<()> {
    let target = fsutil::check_target_path(&file.path)
        .with_context(|| format!("write_files: path `{}`", file.path))?;
    let owner = accounts::resolve_owner(root, &file.owner)
        .with_context(|| format!("write_files {}: owner `{}`", file.path, file.owner))?;
    let path = root.join(&target);
    let mut content = Vec::new();
    if file.append {
        content = fsutil::read_optional(&path)?.unwrap_or_default();
    }
    content.extend_from_slice(&file.content);
    fsutil::write_atomic(&path, &content, file.permissions, Some(owner))
        .with_context(|| format!("write_files {}", file.path))
}
