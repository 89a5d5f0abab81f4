//! The upload endpoint's body parser, as strict as the server's.
//!
//! The real server streams `multipart/form-data` into `/var/tmp/pveupload-*` with a parser
//! that only knows one layout: a `Content-Length` (a chunked body is answered 501), the
//! text fields first in the order `content`, `checksum-algorithm`, `checksum`, then the file
//! part named `filename`. The file's bytes are spooled to disk and hashed as they arrive, so
//! memory stays constant whatever the upload's size.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use sha2::Digest;

/// The text fields the parser accepts, in the only order it accepts them.
const FIELD_ORDER: [&str; 3] = ["content", "checksum-algorithm", "checksum"];

/// What a well-formed upload body carried.
pub struct Upload {
    pub fields: Vec<(String, String)>,
    /// The `filename` attribute of the file part, as sent.
    pub file_name: String,
    pub spool: PathBuf,
    pub size: u64,
    /// Hex digest of the file, by the algorithm named in `checksum-algorithm` (sha256 when
    /// none was named).
    pub digest: String,
    /// Time from the request's headers to the end of its body.
    pub elapsed: Duration,
}

/// Why the parser refused a body: an HTTP status and the server's message.
#[derive(Debug)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
    /// The client went away (or the double was told to drop the connection).
    pub aborted: bool,
}

fn refuse(status: u16, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
        aborted: false,
    }
}

enum State {
    /// Looking for the first boundary line.
    Preamble,
    /// Inside part headers.
    Headers,
    /// Inside a text field's value.
    Field(String, Vec<u8>),
    /// Inside the file part.
    File,
    Done,
}

/// Streams a multipart body into a spool file under `spool_dir`. `abort_after` makes the
/// double drop the connection after that many body bytes (a fault for retry tests). A refused
/// body is read to its end before the answer goes out, so the client sees the answer rather
/// than a reset.
pub async fn receive(
    content_type: Option<&str>,
    mut body: Incoming,
    spool_dir: &Path,
    started: Instant,
    abort_after: Option<u64>,
) -> Result<Upload, Refusal> {
    let result = parse(content_type, &mut body, spool_dir, started, abort_after).await;
    if let Err(r) = &result
        && !r.aborted
    {
        while let Some(Ok(_)) = body.frame().await {}
    }
    result
}

async fn parse(
    content_type: Option<&str>,
    body: &mut Incoming,
    spool_dir: &Path,
    started: Instant,
    abort_after: Option<u64>,
) -> Result<Upload, Refusal> {
    let boundary = content_type
        .and_then(|ct| {
            let (mime, rest) = ct.split_once(';')?;
            (mime.trim().eq_ignore_ascii_case("multipart/form-data")).then_some(rest)?;
            rest.split(';').find_map(|p| {
                let (k, v) = p.trim().split_once('=')?;
                (k.eq_ignore_ascii_case("boundary")).then(|| v.trim_matches('"').to_string())
            })
        })
        .ok_or_else(|| refuse(400, "unable to parse multipart/form-data: no boundary"))?;
    let delimiter = format!("\r\n--{boundary}");
    let finder = memchr::memmem::Finder::new(delimiter.as_bytes()).into_owned();

    let spool = tempfile::Builder::new()
        .prefix("pveupload-")
        .tempfile_in(spool_dir)
        .map_err(|e| refuse(500, format!("unable to create spool file: {e}")))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, spool.as_file());

    let mut fields: Vec<(String, String)> = Vec::new();
    let mut file_name = None;
    let mut hasher: Option<Hasher> = None;
    let mut size = 0u64;
    let mut received = 0u64;
    // Starting with CRLF lets the first boundary match the same delimiter as the others.
    let mut buf = BytesMut::from(&b"\r\n"[..]);
    let mut state = State::Preamble;

    loop {
        // Parse as much as the buffer allows.
        loop {
            match &mut state {
                State::Preamble => {
                    let Some(pos) = finder.find(&buf) else { break };
                    buf.advance(pos + delimiter.len());
                    state = State::Headers;
                }
                State::Headers => {
                    // After a boundary: "--" ends the body, CRLF starts a part's headers.
                    if buf.len() < 2 {
                        break;
                    }
                    if buf.starts_with(b"--") {
                        state = State::Done;
                        continue;
                    }
                    let Some(end) = memchr::memmem::find(&buf, b"\r\n\r\n") else {
                        if buf.len() > 8192 {
                            return Err(refuse(400, "multipart part headers too long"));
                        }
                        break;
                    };
                    let headers = String::from_utf8_lossy(&buf[2..end]).to_string();
                    buf.advance(end + 4);
                    let (name, fname) = parse_disposition(&headers)
                        .ok_or_else(|| refuse(400, "multipart part without Content-Disposition"))?;
                    if name == "filename" {
                        let Some(fname) = fname else {
                            return Err(refuse(400, "file part 'filename' has no filename"));
                        };
                        file_name = Some(fname);
                        let algo = fields
                            .iter()
                            .find(|(k, _)| k == "checksum-algorithm")
                            .map(|(_, v)| v.as_str())
                            .unwrap_or("sha256");
                        hasher = Some(Hasher::new(algo).ok_or_else(|| {
                            refuse(501, format!("checksum algorithm '{algo}' not modelled"))
                        })?);
                        state = State::File;
                    } else {
                        if file_name.is_some() {
                            return Err(refuse(400, format!("field '{name}' after the file part")));
                        }
                        let rank =
                            FIELD_ORDER.iter().position(|f| *f == name).ok_or_else(|| {
                                refuse(400, format!("unexpected multipart field '{name}'"))
                            })?;
                        if let Some((last, _)) = fields.last() {
                            let last_rank = FIELD_ORDER.iter().position(|f| f == last).unwrap();
                            if rank <= last_rank {
                                return Err(refuse(
                                    400,
                                    format!(
                                        "multipart field '{name}' out of order (after '{last}')"
                                    ),
                                ));
                            }
                        }
                        state = State::Field(name, Vec::new());
                    }
                }
                State::Field(name, value) => {
                    let Some(pos) = finder.find(&buf) else {
                        if buf.len() > 4096 {
                            return Err(refuse(400, format!("field '{name}' too long")));
                        }
                        break;
                    };
                    value.extend_from_slice(&buf[..pos]);
                    buf.advance(pos + delimiter.len());
                    let value = String::from_utf8_lossy(value).to_string();
                    fields.push((name.clone(), value));
                    state = State::Headers;
                }
                State::File => {
                    let h = hasher.as_mut().unwrap();
                    if let Some(pos) = finder.find(&buf) {
                        h.update(&buf[..pos]);
                        write(&mut out, &buf[..pos])?;
                        size += pos as u64;
                        buf.advance(pos + delimiter.len());
                        state = State::Headers;
                    } else {
                        // Keep a tail that may hold the start of a delimiter.
                        let keep = delimiter.len().min(buf.len());
                        let n = buf.len() - keep;
                        h.update(&buf[..n]);
                        write(&mut out, &buf[..n])?;
                        size += n as u64;
                        buf.advance(n);
                        break;
                    }
                }
                State::Done => break,
            }
        }

        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    received += data.len() as u64;
                    if abort_after.is_some_and(|limit| received >= limit) {
                        return Err(Refusal {
                            status: 0,
                            message: "connection dropped by fault injection".into(),
                            aborted: true,
                        });
                    }
                    if matches!(state, State::Done) {
                        continue;
                    }
                    buf.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => {
                return Err(Refusal {
                    status: 0,
                    message: e.to_string(),
                    aborted: true,
                });
            }
            None => break,
        }
    }
    let elapsed = started.elapsed();
    if !matches!(state, State::Done) {
        return Err(refuse(400, "unexpected end of multipart body"));
    }
    out.flush()
        .map_err(|e| refuse(500, format!("writing spool file: {e}")))?;
    drop(out);
    let Some(file_name) = file_name else {
        return Err(refuse(
            400,
            "multipart body without the file part 'filename'",
        ));
    };
    let (_, path) = spool.keep().map_err(|e| refuse(500, e.to_string()))?;
    Ok(Upload {
        fields,
        file_name,
        spool: path,
        size,
        digest: hasher.unwrap().finish(),
        elapsed,
    })
}

fn write(out: &mut impl Write, data: &[u8]) -> Result<(), Refusal> {
    out.write_all(data)
        .map_err(|e| refuse(500, format!("writing spool file: {e}")))
}

/// Reads `name` and `filename` from a part's `Content-Disposition: form-data` header.
fn parse_disposition(headers: &str) -> Option<(String, Option<String>)> {
    let line = headers.lines().find(|l| {
        l.split_once(':')
            .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case("content-disposition"))
    })?;
    let (_, value) = line.split_once(':')?;
    let mut name = None;
    let mut file_name = None;
    for part in value.split(';').map(str::trim) {
        if let Some((k, v)) = part.split_once('=') {
            let v = v.trim_matches('"').to_string();
            match k.trim() {
                "name" => name = Some(v),
                "filename" => file_name = Some(v),
                _ => {}
            }
        }
    }
    Some((name?, file_name))
}

enum Hasher {
    Sha224(sha2::Sha224),
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

impl Hasher {
    fn new(algo: &str) -> Option<Hasher> {
        Some(match algo {
            "sha224" => Hasher::Sha224(Default::default()),
            "sha256" => Hasher::Sha256(Default::default()),
            "sha384" => Hasher::Sha384(Default::default()),
            "sha512" => Hasher::Sha512(Default::default()),
            // TODO: md5 and sha1 are in the schema's enum; no test needs them, so the double
            // answers 501 instead of pulling in two more hash crates.
            _ => return None,
        })
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha224(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha384(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    fn finish(self) -> String {
        match self {
            Hasher::Sha224(h) => hex::encode(h.finalize()),
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::Sha384(h) => hex::encode(h.finalize()),
            Hasher::Sha512(h) => hex::encode(h.finalize()),
        }
    }
}
