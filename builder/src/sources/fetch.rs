//! Downloads over HTTP(S), and `file://` reads for local sources, with one timeout policy.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};

/// Small files (keys, Release files) are refused beyond this size.
pub const SMALL: u64 = 64 << 20;

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_body(Some(Duration::from_secs(600)))
        .http_status_as_error(false)
        .build()
        .new_agent()
}

/// Why a URL could not be fetched, told apart so callers can say what to do.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("cannot reach {url} ({reason})")]
    Unreachable { url: String, reason: String },
}

/// Where small files fetched over the network are kept, and whether the network may be used
/// (`build --offline`). Set once per process by the build.
static MODE: std::sync::OnceLock<(std::path::PathBuf, bool)> = std::sync::OnceLock::new();

pub fn configure(cache: &Path, offline: bool) {
    let _ = MODE.set((cache.join("fetched"), offline));
}

pub fn offline() -> bool {
    MODE.get().is_some_and(|m| m.1)
}

fn kept_copy(url: &str) -> Option<std::path::PathBuf> {
    use sha2::Digest;
    let (dir, _) = MODE.get()?;
    Some(dir.join(hex::encode(sha2::Sha256::digest(url.as_bytes()))))
}

/// A whole (small) file in memory. Online, a copy is kept in the cache; offline, only that
/// copy is read (and checked again by the caller, like a fresh download).
pub fn get(url: &str) -> Result<Vec<u8>> {
    if let Some(path) = url.strip_prefix("file://") {
        return fs_err::read(path).with_context(|| format!("reading {url}"));
    }
    if offline() {
        let copy = kept_copy(url).expect("offline mode has a cache");
        return fs_err::read(&copy).map_err(|_| {
            anyhow::anyhow!(
                "--offline: {url} was never fetched, so it is not in the cache; build once \
                 without --offline"
            )
        });
    }
    let mut resp = open(url)?;
    let bytes = resp
        .body_mut()
        .with_config()
        .limit(SMALL)
        .read_to_vec()
        .with_context(|| format!("reading {url}"))?;
    if let Some(copy) = kept_copy(url) {
        let dir = copy.parent().expect("kept copies live in a folder");
        let tmp = copy.with_extension("partial");
        let kept = fs_err::create_dir_all(dir)
            .and_then(|_| fs_err::write(&tmp, &bytes))
            .and_then(|_| fs_err::rename(&tmp, &copy));
        if let Err(err) = kept {
            tracing::debug!("not keeping a copy of {url}: {err}");
        }
    }
    Ok(bytes)
}

fn open(url: &str) -> Result<ureq::http::Response<ureq::Body>> {
    if offline() {
        bail!("--offline: {url} is not in the cache; build once without --offline");
    }
    match agent().get(url).call() {
        Ok(resp) if resp.status().is_success() => Ok(resp),
        Ok(resp) => Err(FetchError::Status {
            url: url.to_owned(),
            status: resp.status().as_u16(),
        }
        .into()),
        Err(err) => Err(FetchError::Unreachable {
            url: url.to_owned(),
            reason: err.to_string(),
        }
        .into()),
    }
}

/// Streams `url` into `dest`, handing every chunk to `each` (for hashing) and drawing a
/// progress bar on a terminal. Returns the number of bytes.
pub fn download(url: &str, dest: &Path, mut each: impl FnMut(&[u8])) -> Result<u64> {
    let (mut reader, length): (Box<dyn Read>, Option<u64>) =
        if let Some(path) = url.strip_prefix("file://") {
            let f = fs_err::File::open(path).with_context(|| format!("reading {url}"))?;
            let len = f.metadata().ok().map(|m| m.len());
            (Box::new(f), len)
        } else {
            let resp = open(url)?;
            let len = resp.body().content_length();
            (Box::new(resp.into_body().into_reader()), len)
        };
    let bar = crate::logging::fancy().then(|| {
        let bar = length.map_or_else(ProgressBar::new_spinner, ProgressBar::new);
        bar.set_style(
            ProgressStyle::with_template(
                "  {msg} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .expect("static template"),
        );
        bar.set_message(url.rsplit('/').next().unwrap_or(url).to_owned());
        bar
    });
    let mut out = fs_err::File::create(dest)?;
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        crate::interrupt::check()?;
        let n = reader
            .read(&mut buf)
            .with_context(|| format!("downloading {url}"))?;
        if n == 0 {
            break;
        }
        each(&buf[..n]);
        out.write_all(&buf[..n])?;
        total += n as u64;
        if let Some(bar) = &bar {
            bar.set_position(total);
        }
    }
    out.sync_all()?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if let Some(expected) = length
        && expected != total
    {
        bail!("downloading {url}: the server announced {expected} bytes but sent {total}");
    }
    Ok(total)
}

#[cfg(test)]
pub(crate) mod testserver {
    //! A loopback HTTP server that serves a folder, for tests.

    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::path::PathBuf;

    /// Serves files below `root` on 127.0.0.1 until the process ends; returns the base URL.
    pub fn serve(root: PathBuf) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let root = root.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut line = String::new();
                    let _ = reader.read_line(&mut line);
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) <= 2 {
                            break;
                        }
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let file = root.join(path.trim_start_matches('/'));
                    let mut stream = stream;
                    match std::fs::read(&file) {
                        Ok(body) if file.is_file() => {
                            let _ = write!(
                                stream,
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\
                                 Connection: close\r\n\r\n",
                                body.len()
                            );
                            let _ = stream.write_all(&body);
                        }
                        _ => {
                            let _ = write!(
                                stream,
                                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\
                                 Connection: close\r\n\r\n"
                            );
                        }
                    }
                });
            }
        });
        format!("http://{addr}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetches_over_http_and_from_files_and_names_a_404() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), b"hello").unwrap();
        let base = testserver::serve(dir.path().to_path_buf());
        assert_eq!(get(&format!("{base}/a.txt")).unwrap(), b"hello");
        let file_url = format!("file://{}", dir.path().join("a.txt").display());
        assert_eq!(get(&file_url).unwrap(), b"hello");
        let err = get(&format!("{base}/missing")).unwrap_err();
        assert!(
            matches!(
                err.downcast_ref::<FetchError>(),
                Some(FetchError::Status { status: 404, .. })
            ),
            "{err:#}"
        );

        let dest = dir.path().join("copy");
        let mut seen = 0;
        let n = download(&format!("{base}/a.txt"), &dest, |c| seen += c.len()).unwrap();
        assert_eq!((n, seen), (5, 5));
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello");
    }
}
