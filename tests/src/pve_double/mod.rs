//! A Proxmox VE API double: an HTTPS server on loopback that answers the endpoints
//! `omni-image upload` and `deploy` use, the way a PVE 9.1 node does.
//!
//! What it does:
//! - validates every request against the official API schema (`pve-api-schema.json`, found
//!   at `../shared/data/` next to the workspace or named by `PVE_API_SCHEMA`): unknown
//!   paths and methods (501), unknown, missing and ill-typed parameters, enums, patterns,
//!   ranges, `requires`, and property strings key by key (400 with the server's
//!   `{"errors": ...}` body);
//! - authenticates API tokens (`PVEAPIToken=` header) and tickets (`PVEAuthCookie` plus
//!   `CSRFPreventionToken` on writes), 401 without a body otherwise;
//! - evaluates each method's `permissions` from the schema against an ACL it is given
//!   (privileges granted directly, propagation, the most specific path wins, privilege
//!   separated tokens get the intersection with their user), 403 "Permission check failed";
//! - parses uploads strictly (see [`upload`]), verifies the checksum and runs
//!   `qemu-img info` on the file in a task, refusing non-qcow2 data and backing files;
//! - runs tasks with real UPIDs, a log and an exit status;
//! - creates VMs by importing the uploaded disk with `qemu-img convert`, makes templates
//!   (`base-` volumes), full clones, resizes disks, and starts a clone as a real QEMU
//!   process (TCG, OVMF) with a cloud-init drive built as Proxmox builds it, answering the
//!   guest-agent endpoints through the guest's own `qemu-guest-agent`;
//! - answers errors as the server does: 400 with `errors`, 403/500 with `message`, 501 in
//!   plain text, and closes the connection after any status >= 400.
//!
//! What it does not model: clusters (one node), roles (ACL entries carry privileges
//! directly), pools, storage types other than a directory, `vmbr0` bridges (QEMU's user-mode
//! network stands in), HA, locks, pending changes (config edits apply at once), the ~5 s
//! stall timeout of the upload parser, named formats other than those in
//! [`schema::check_named_format`], md5/sha1 upload checksums, ticket expiry and TFA.

pub mod client;
pub mod schema;
pub mod upload;
pub mod vm;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};

use schema::{Params, Schema};

/// Where the schema lives unless `PVE_API_SCHEMA` says otherwise.
pub fn schema_path() -> PathBuf {
    std::env::var_os("PVE_API_SCHEMA")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace().join("../shared/data/pve-api-schema.json"))
}

#[derive(Clone, Debug)]
pub struct StorageConfig {
    pub id: String,
    pub content: Vec<String>,
    pub capacity: u64,
}

#[derive(Clone, Debug)]
pub struct TokenConfig {
    /// `user@realm!name`.
    pub id: String,
    pub secret: String,
    pub privsep: bool,
}

#[derive(Clone, Debug)]
pub struct AclEntry {
    pub path: String,
    /// A user id or a token id.
    pub subject: String,
    pub privs: Vec<String>,
    pub propagate: bool,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub node: String,
    pub version: String,
    pub storages: Vec<StorageConfig>,
    /// (user id, password) pairs for ticket logins.
    pub users: Vec<(String, String)>,
    pub tokens: Vec<TokenConfig>,
    pub acl: Vec<AclEntry>,
}

/// Every privilege our client needs, for building ACLs in tests.
pub const CLIENT_PRIVS: &[&str] = &[
    "Datastore.Allocate",
    "Datastore.AllocateSpace",
    "Datastore.AllocateTemplate",
    "Datastore.Audit",
    "VM.Allocate",
    "VM.Audit",
    "VM.Clone",
    "VM.Config.CDROM",
    "VM.Config.CPU",
    "VM.Config.Cloudinit",
    "VM.Config.Disk",
    "VM.Config.HWType",
    "VM.Config.Memory",
    "VM.Config.Network",
    "VM.Config.Options",
    "VM.PowerMgmt",
    "VM.GuestAgent.Unrestricted",
    "Sys.Audit",
];

pub const TOKEN_ID: &str = "omni@pve!ci";
pub const TOKEN_SECRET: &str = "5f0c1d5e-8f7e-4a8b-9d51-0f4e2b6c7a10";
pub const USER: &str = "omni@pve";
pub const PASSWORD: &str = "correct horse battery staple";

impl Config {
    /// One node `pve` with a directory storage `local` (import, iso, images) of 64 GiB, and a
    /// privilege-separated token plus its user, both granted [`CLIENT_PRIVS`] on `/`.
    pub fn standard() -> Config {
        let privs: Vec<String> = CLIENT_PRIVS.iter().map(|s| s.to_string()).collect();
        Config {
            node: "pve".into(),
            version: "9.1.2".into(),
            storages: vec![StorageConfig {
                id: "local".into(),
                content: ["iso", "vztmpl", "import", "images", "backup"]
                    .map(String::from)
                    .to_vec(),
                capacity: 64 << 30,
            }],
            users: vec![(USER.into(), PASSWORD.into())],
            tokens: vec![TokenConfig {
                id: TOKEN_ID.into(),
                secret: TOKEN_SECRET.into(),
                privsep: true,
            }],
            acl: [USER, TOKEN_ID]
                .iter()
                .map(|s| AclEntry {
                    path: "/".into(),
                    subject: s.to_string(),
                    privs: privs.clone(),
                    propagate: true,
                })
                .collect(),
        }
    }
}

/// One request as the double saw it, for tests that look at the wire.
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub status: u16,
}

/// One upload the parser accepted.
#[derive(Clone, Debug)]
pub struct UploadRecord {
    pub file_name: String,
    pub size: u64,
    pub elapsed: Duration,
}

pub struct Volume {
    pub path: PathBuf,
    pub content: String,
    pub format: String,
}

pub struct Vm {
    pub config: BTreeMap<String, String>,
    pub template: bool,
    pub process: Option<vm::Running>,
}

pub struct Task {
    pub upid: String,
    pub kind: String,
    pub id: String,
    pub user: String,
    pub pid: u32,
    pub pstart: u32,
    pub starttime: u64,
    pub log: Vec<String>,
    /// `None` while running, then `OK` or the error text.
    pub exitstatus: Option<String>,
}

pub struct Inner {
    pub config: Config,
    pub volumes: BTreeMap<String, BTreeMap<String, Volume>>,
    pub vms: BTreeMap<u32, Vm>,
    pub tasks: BTreeMap<String, Task>,
    pub tickets: BTreeMap<String, (String, String)>,
    pub requests: Vec<Logged>,
    pub uploads: Vec<UploadRecord>,
}

pub struct Shared {
    pub inner: Mutex<Inner>,
    pub schema: Schema,
    pub dir: PathBuf,
    /// Uploads whose connection is dropped mid-body before the parser sees them whole.
    pub upload_resets: AtomicU32,
    /// Uploads whose bytes arrive damaged (as through a faulty proxy): the server's checksum
    /// check then fails the import task.
    pub upload_damages: AtomicU32,
    next_pid: AtomicU32,
}

impl Shared {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn storage_dir(&self, storage: &str) -> PathBuf {
        self.dir.join("storage").join(storage)
    }
}

/// A running double. Dropping it stops the server and every QEMU it started.
pub struct PveDouble {
    /// `https://127.0.0.1:PORT/api2/json`.
    pub url: String,
    pub addr: SocketAddr,
    /// SHA-256 of the server's leaf certificate, `AA:BB:...`.
    pub fingerprint: String,
    /// The CA that signed the server's certificate (PEM), like `pve-root-ca.pem`.
    pub ca_file: PathBuf,
    pub shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl PveDouble {
    pub fn start(config: Config) -> anyhow::Result<PveDouble> {
        let dir = tempfile::Builder::new().prefix("pve-double-").tempdir()?;
        let schema = Schema::load(&schema_path())?;
        let mut volumes = BTreeMap::new();
        for s in &config.storages {
            fs_err::create_dir_all(dir.path().join("storage").join(&s.id))?;
            volumes.insert(s.id.clone(), BTreeMap::new());
        }
        fs_err::create_dir_all(dir.path().join("tmp"))?;
        fs_err::create_dir_all(dir.path().join("run"))?;

        let (tls, fingerprint, ca_pem) = make_tls()?;
        let ca_file = dir.path().join("pve-root-ca.pem");
        fs_err::write(&ca_file, ca_pem)?;

        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                config,
                volumes,
                vms: BTreeMap::new(),
                tasks: BTreeMap::new(),
                tickets: BTreeMap::new(),
                requests: Vec::new(),
                uploads: Vec::new(),
            }),
            schema,
            dir: dir.path().to_path_buf(),
            upload_resets: AtomicU32::new(0),
            upload_damages: AtomicU32::new(0),
            next_pid: AtomicU32::new(4000),
        });

        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let server_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("pve-double".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("building the double's runtime");
                rt.block_on(serve(std_listener, tls, server_shared, stop_rx));
            })?;
        Ok(PveDouble {
            url: format!("https://127.0.0.1:{}/api2/json", addr.port()),
            addr,
            fingerprint,
            ca_file,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
            _dir: dir,
        })
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.shared.lock().requests.clone()
    }

    pub fn uploads(&self) -> Vec<UploadRecord> {
        self.shared.lock().uploads.clone()
    }

    /// Drops the connection of the next `n` uploads halfway through their bodies.
    pub fn reset_next_uploads(&self, n: u32) {
        self.shared.upload_resets.store(n, Ordering::SeqCst);
    }

    /// Damages the bytes of the next `n` uploads on their way in.
    pub fn damage_next_uploads(&self, n: u32) {
        self.shared.upload_damages.store(n, Ordering::SeqCst);
    }

    /// (vmid, name, template, tags) of every VM.
    pub fn vms(&self) -> Vec<(u32, String, bool, String)> {
        let inner = self.shared.lock();
        inner
            .vms
            .iter()
            .map(|(id, vm)| {
                let get = |k: &str| vm.config.get(k).cloned().unwrap_or_default();
                (*id, get("name"), vm.template, get("tags"))
            })
            .collect()
    }

    pub fn vm_config(&self, vmid: u32) -> Option<BTreeMap<String, String>> {
        self.shared
            .lock()
            .vms
            .get(&vmid)
            .map(|vm| vm.config.clone())
    }

    /// The volume ids on a storage.
    pub fn volumes(&self, storage: &str) -> Vec<String> {
        let inner = self.shared.lock();
        inner
            .volumes
            .get(storage)
            .map(|v| v.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Creates a VM directly, e.g. to occupy a VMID.
    pub fn add_vm(&self, vmid: u32, name: &str, template: bool) {
        let mut config = BTreeMap::new();
        config.insert("name".to_string(), name.to_string());
        self.shared.lock().vms.insert(
            vmid,
            Vm {
                config,
                template,
                process: None,
            },
        );
    }

    /// The serial console log of a started VM.
    pub fn serial_log(&self, vmid: u32) -> PathBuf {
        self.shared
            .dir
            .join("run")
            .join(format!("{vmid}.serial.log"))
    }
}

impl Drop for PveDouble {
    fn drop(&mut self) {
        for vm in self.shared.lock().vms.values_mut() {
            if let Some(p) = vm.process.take() {
                p.kill();
            }
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A CA and a leaf for `localhost`/127.0.0.1 signed by it, as a PVE node has.
fn make_tls() -> anyhow::Result<(rustls::ServerConfig, String, String)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Proxmox Virtual Environment");
    ca_params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, "pve-double");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let leaf_key = KeyPair::generate()?;
    let mut leaf_params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "pve.local");
    let leaf = leaf_params.signed_by(&leaf_key, &issuer)?;

    let leaf_der = leaf.der().to_vec();
    let digest = <sha2::Sha256 as sha2::Digest>::digest(&leaf_der);
    let fingerprint = digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf_der.into(), ca_cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )?;
    Ok((config, fingerprint, ca_cert.pem()))
}

async fn serve(
    listener: std::net::TcpListener,
    tls: rustls::ServerConfig,
    shared: Arc<Shared>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    loop {
        let (tcp, _) = tokio::select! {
            _ = &mut stop => return,
            r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
        };
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let io = hyper_util::rt::TokioIo::new(stream);
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { handle(shared, req).await }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(io, service)
                .await;
        });
    }
}

type Resp = Response<Full<Bytes>>;

/// An answer the way the server formats it.
#[derive(Debug)]
pub enum Answer {
    Data(Value),
    /// 400 "Parameter verification failed." with per-parameter errors.
    Params(BTreeMap<String, String>),
    /// A JSON error: 403, 500, 595...
    Error(u16, String),
    /// 401 without a body.
    Unauthorized(String),
    /// 501 in plain text.
    NotImplemented(String),
}

pub fn fail(status: u16, msg: impl Into<String>) -> Answer {
    Answer::Error(status, msg.into())
}

fn render(answer: Answer) -> Resp {
    let (status, body, ctype, reason) = match answer {
        Answer::Data(data) => (
            200,
            json!({ "data": data }).to_string(),
            "application/json",
            None,
        ),
        Answer::Params(errors) => (
            400,
            json!({"data": null, "errors": errors, "message": "Parameter verification failed.\n"})
                .to_string(),
            "application/json",
            Some("Parameter verification failed.".to_string()),
        ),
        Answer::Error(status, msg) => (
            status,
            json!({"data": null, "message": format!("{}\n", msg.trim_end())}).to_string(),
            "application/json",
            Some(msg.lines().next().unwrap_or("").to_string()),
        ),
        Answer::Unauthorized(msg) => (401, String::new(), "text/plain", Some(msg)),
        Answer::NotImplemented(msg) => (501, format!("{msg}\n"), "text/plain", Some(msg)),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert("content-type", ctype.parse().unwrap());
    if let Some(reason) = reason
        && let Ok(r) = hyper::ext::ReasonPhrase::try_from(reason.into_bytes())
    {
        resp.extensions_mut().insert(r);
    }
    if status >= 400 {
        resp.headers_mut()
            .insert("connection", "close".parse().unwrap());
    }
    resp
}

/// Who made a request.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The user id, or the token id for tokens.
    pub id: String,
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Resp, std::io::Error> {
    let method = req.method().as_str().to_string();
    let raw_path = req.uri().path().to_string();
    let result = route(&shared, req).await;
    let resp = match result {
        Ok(answer) => render(answer),
        // A dropped connection: no answer at all.
        Err(e) => return Err(e),
    };
    shared.lock().requests.push(Logged {
        method,
        path: raw_path,
        status: resp.status().as_u16(),
    });
    Ok(resp)
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Result<Answer, std::io::Error> {
    let started = Instant::now();
    let method = req.method().as_str().to_string();
    let Some(rel) = req.uri().path().strip_prefix("/api2/json") else {
        return Ok(Answer::NotImplemented(format!(
            "Unsupported format '{}'",
            req.uri().path()
        )));
    };
    let segments: Option<Vec<String>> = rel
        .split('/')
        .filter(|s| !s.is_empty())
        .map(schema::percent_decode)
        .collect();
    let Some(segments) = segments else {
        return Ok(fail(400, "invalid URI encoding"));
    };
    let headers = req.headers().clone();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };

    // The server's HTTP layer reads bodies only with a known length.
    if header("transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().contains("chunked")) {
        // The body is read and dropped before the answer: a socket closed with unread data
        // in it is reset by the kernel, and the client could then see no answer at all.
        let _ = req.into_body().collect().await;
        return Ok(Answer::NotImplemented(
            "chunked transfer encoding not supported".into(),
        ));
    }
    let has_body = method == "POST" || method == "PUT";

    let found = shared.schema.find(&method, &segments);
    let Ok(endpoint) = found else {
        return Ok(Answer::NotImplemented(format!(
            "Method '{method} {rel}' not implemented"
        )));
    };
    let schema_path = endpoint.path.clone();
    let info = endpoint.info.clone();

    // Authentication.
    let caller = if schema_path == "/access/ticket" && method == "POST" {
        None
    } else {
        match authenticate(
            shared,
            header("authorization"),
            header("cookie"),
            &method,
            header("csrfpreventiontoken"),
        ) {
            Ok(c) => Some(c),
            Err(answer) => return Ok(answer),
        }
    };
    if let Some(c) = &caller
        && c.id.contains('!')
        && info["allowtoken"].as_i64() == Some(0)
    {
        return Ok(fail(
            403,
            "Permission check failed (API tokens are not allowed)",
        ));
    }

    // Parameters: the query string, then the body.
    let mut params = match schema::parse_form(req.uri().query().unwrap_or("")) {
        Some(p) => p,
        None => return Ok(fail(400, "invalid query string")),
    };
    let is_upload = schema_path == "/nodes/{node}/storage/{storage}/upload";
    // The upload parser needs the body's length up front.
    if is_upload && header("content-length").is_none() {
        return Ok(Answer::NotImplemented(
            "upload without Content-Length".into(),
        ));
    }
    let mut upload = None;
    if is_upload {
        let abort = if shared
            .upload_resets
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            header("content-length")
                .and_then(|l| l.parse::<u64>().ok())
                .map(|l| l / 2)
        } else {
            None
        };
        let spool = shared.dir.join("tmp");
        match upload::receive(
            header("content-type").as_deref(),
            req.into_body(),
            &spool,
            started,
            abort,
        )
        .await
        {
            Ok(u) => {
                for (k, v) in &u.fields {
                    params.entry(k.clone()).or_default().push(v.clone());
                }
                params.insert("filename".into(), vec![u.file_name.clone()]);
                upload = Some(u);
            }
            Err(r) if r.aborted => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    r.message,
                ));
            }
            Err(r) if r.status == 501 => return Ok(Answer::NotImplemented(r.message)),
            Err(r) => return Ok(fail(r.status, r.message)),
        }
    } else if has_body {
        let ctype = header("content-type").unwrap_or_default();
        let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return Ok(fail(413, "request too large")),
        };
        let text = String::from_utf8_lossy(&body);
        if ctype.starts_with("application/json") {
            let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&text) else {
                return Ok(fail(400, "malformed JSON body"));
            };
            for (k, v) in map {
                let vals = match v {
                    Value::Array(a) => a.iter().map(json_scalar).collect(),
                    other => vec![json_scalar(&other)],
                };
                params.insert(k, vals);
            }
        } else {
            let Some(form) = schema::parse_form(&text) else {
                return Ok(fail(400, "malformed form body"));
            };
            for (k, v) in form {
                params.entry(k).or_default().extend(v);
            }
        }
    }
    for (k, v) in endpoint.path_params {
        params.insert(k, vec![v]);
    }

    let errors = schema::check_params(&info, &params);
    if !errors.is_empty() {
        if let Some(u) = &upload {
            let _ = fs_err::remove_file(&u.spool);
        }
        return Ok(Answer::Params(errors));
    }

    if let Some(caller) = &caller
        && let Err(answer) = check_permissions(shared, caller, &info["permissions"], &params)
    {
        if let Some(u) = &upload {
            let _ = fs_err::remove_file(&u.spool);
        }
        return Ok(answer);
    }

    let p = P(params);
    let caller = caller.unwrap_or(Caller { id: String::new() });
    Ok(api::dispatch(shared, &method, &schema_path, &p, &caller, upload).await)
}

fn json_scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => (*b as u8).to_string(),
        other => other.to_string(),
    }
}

fn authenticate(
    shared: &Shared,
    authorization: Option<String>,
    cookie: Option<String>,
    method: &str,
    csrf: Option<String>,
) -> Result<Caller, Answer> {
    let inner = shared.lock();
    if let Some(auth) = authorization {
        let Some(rest) = auth.strip_prefix("PVEAPIToken=") else {
            return Err(Answer::Unauthorized("invalid authorization header".into()));
        };
        let Some((id, secret)) = rest.split_once('=') else {
            return Err(Answer::Unauthorized("invalid token value!".into()));
        };
        let ok = inner
            .config
            .tokens
            .iter()
            .any(|t| t.id == id && t.secret == secret);
        if !ok {
            return Err(Answer::Unauthorized("invalid token value!".into()));
        }
        return Ok(Caller { id: id.to_string() });
    }
    let ticket = cookie.and_then(|c| {
        c.split(';').find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == "PVEAuthCookie").then(|| schema::percent_decode(v).unwrap_or_default())
        })
    });
    let Some(ticket) = ticket else {
        return Err(Answer::Unauthorized("No ticket".into()));
    };
    let Some((user, token)) = inner.tickets.get(&ticket) else {
        return Err(Answer::Unauthorized("authentication failure".into()));
    };
    if method != "GET" && csrf.as_deref() != Some(token.as_str()) {
        return Err(Answer::Unauthorized(
            "Permission denied - invalid csrf token".into(),
        ));
    }
    Ok(Caller { id: user.clone() })
}

/// The privileges a user or token holds on `path`.
pub fn privileges(config: &Config, subject: &str, path: &str) -> BTreeSet<String> {
    if subject == "root@pam" {
        return CLIENT_PRIVS.iter().map(|s| s.to_string()).collect();
    }
    let of = |who: &str| {
        let mut privs = BTreeSet::new();
        let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        for depth in 0..=parts.len() {
            let level = format!("/{}", parts[..depth].join("/"));
            let entries: Vec<&AclEntry> = config
                .acl
                .iter()
                .filter(|a| {
                    a.subject == who && a.path == level && (a.propagate || depth == parts.len())
                })
                .collect();
            if !entries.is_empty() {
                privs = entries
                    .iter()
                    .flat_map(|a| a.privs.iter().cloned())
                    .collect();
            }
        }
        privs
    };
    match subject.split_once('!') {
        Some((user, _)) => {
            let token = config.tokens.iter().find(|t| t.id == subject);
            let user_privs = of(user);
            if token.is_some_and(|t| t.privsep) {
                of(subject).intersection(&user_privs).cloned().collect()
            } else {
                user_privs
            }
        }
        None => of(subject),
    }
}

fn subst(path: &str, params: &Params) -> String {
    let mut out = path.to_string();
    for (k, v) in params {
        out = out.replace(&format!("{{{k}}}"), &v[0]);
    }
    out
}

/// Evaluates a schema `permissions` object for a caller.
fn check_permissions(
    shared: &Shared,
    caller: &Caller,
    perms: &Value,
    params: &Params,
) -> Result<(), Answer> {
    let Some(check) = perms.get("check") else {
        // `user: all`, `user: world`, or a description the handler enforces itself.
        return Ok(());
    };
    let inner = shared.lock();
    let mut missing = None;
    if eval_check(&inner.config, caller, check, params, &mut missing) {
        Ok(())
    } else {
        let (path, privs) = missing.unwrap_or_default();
        Err(fail(
            403,
            format!("Permission check failed ({path}, {privs})"),
        ))
    }
}

fn eval_check(
    config: &Config,
    caller: &Caller,
    check: &Value,
    params: &Params,
    missing: &mut Option<(String, String)>,
) -> bool {
    let Some(list) = check.as_array() else {
        return false;
    };
    match list.first().and_then(Value::as_str) {
        Some("and") => list[1..]
            .iter()
            .all(|c| eval_check(config, caller, c, params, missing)),
        Some("or") => list[1..]
            .iter()
            .any(|c| eval_check(config, caller, c, params, missing)),
        Some("perm") => {
            let path = subst(list[1].as_str().unwrap_or("/"), params);
            let wanted: Vec<&str> = list[2]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let rest: Vec<&str> = list[3..].iter().filter_map(Value::as_str).collect();
            if let Some(i) = rest.iter().position(|s| *s == "require_param")
                && let Some(p) = rest.get(i + 1)
                && !params.contains_key(*p)
            {
                return false;
            }
            let any = rest.contains(&"any");
            let have = privileges(config, &caller.id, &path);
            let ok = if any {
                wanted.iter().any(|w| have.contains(*w))
            } else {
                wanted.iter().all(|w| have.contains(*w))
            };
            if !ok && missing.is_none() {
                let lacking: Vec<&str> = wanted
                    .iter()
                    .copied()
                    .filter(|w| !have.contains(*w))
                    .collect();
                let sep = if any { "|" } else { ", " };
                *missing = Some((path, lacking.join(sep)));
            }
            ok
        }
        _ => false,
    }
}

/// Request parameters after validation.
pub struct P(pub Params);

impl P {
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).and_then(|v| v.first()).map(String::as_str)
    }
    pub fn str(&self, k: &str) -> &str {
        self.get(k).unwrap_or("")
    }
    pub fn all(&self, k: &str) -> Vec<String> {
        self.0.get(k).cloned().unwrap_or_default()
    }
    pub fn flag(&self, k: &str) -> bool {
        self.get(k).and_then(schema::parse_bool).unwrap_or(false)
    }
}

/// Starts a task: returns its UPID at once and runs `work` in the background.
pub fn start_task<F>(shared: &Arc<Shared>, kind: &str, id: &str, user: &str, work: F) -> String
where
    F: FnOnce(&TaskCtx) -> Result<(), String> + Send + 'static,
{
    let pid = shared.next_pid.fetch_add(1, Ordering::SeqCst);
    let pstart = pid.wrapping_mul(7919) & 0xFFFFFF;
    let starttime = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let node = shared.lock().config.node.clone();
    let upid = format!("UPID:{node}:{pid:08X}:{pstart:08X}:{starttime:08X}:{kind}:{id}:{user}:");
    shared.lock().tasks.insert(
        upid.clone(),
        Task {
            upid: upid.clone(),
            kind: kind.into(),
            id: id.into(),
            user: user.into(),
            pid,
            pstart,
            starttime,
            log: Vec::new(),
            exitstatus: None,
        },
    );
    let ctx = TaskCtx {
        shared: shared.clone(),
        upid: upid.clone(),
    };
    tokio::task::spawn_blocking(move || {
        let result = work(&ctx);
        let mut inner = ctx.shared.lock();
        if let Some(task) = inner.tasks.get_mut(&ctx.upid) {
            match result {
                Ok(()) => {
                    task.log.push("TASK OK".into());
                    task.exitstatus = Some("OK".into());
                }
                Err(e) => {
                    task.log.push(format!("TASK ERROR: {e}"));
                    task.exitstatus = Some(e);
                }
            }
        }
    });
    upid
}

pub struct TaskCtx {
    pub shared: Arc<Shared>,
    pub upid: String,
}

impl TaskCtx {
    pub fn log(&self, line: impl Into<String>) {
        if let Some(t) = self.shared.lock().tasks.get_mut(&self.upid) {
            t.log.push(line.into());
        }
    }
}

/// Runs a host command for a task, its stderr in the error.
pub fn run(cmd: &mut std::process::Command) -> Result<Vec<u8>, String> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("running {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}

pub fn storage_used(dir: &Path) -> u64 {
    walk_size(dir)
}

fn walk_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                walk_size(&p)
            } else {
                use std::os::unix::fs::MetadataExt;
                e.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
            }
        })
        .sum()
}

pub mod api;
