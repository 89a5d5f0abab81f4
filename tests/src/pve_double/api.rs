//! The endpoints' behaviour, after the schema and the ACL have passed a request.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use sha2::Digest;

use base64::Engine;
use serde_json::{Value, json};

use super::upload::Upload;
use super::{
    Answer, Caller, Inner, P, Shared, UploadRecord, Vm, Volume, fail, privileges, run, start_task,
};

const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

pub async fn dispatch(
    shared: &Arc<Shared>,
    method: &str,
    path: &str,
    p: &P,
    caller: &Caller,
    upload: Option<Upload>,
) -> Answer {
    // Requests for another node or an unknown storage fail before the handler runs.
    {
        let inner = shared.lock();
        if let Some(node) = p.get("node")
            && node != inner.config.node
        {
            return fail(
                500,
                format!(
                    "hostname lookup '{node}' failed - failed to get address info for: {node}: \
                     Name or service not known"
                ),
            );
        }
        if let Some(storage) = p.get("storage")
            && path.contains("{storage}")
            && !inner.config.storages.iter().any(|s| s.id == storage)
        {
            if let Some(u) = &upload {
                let _ = fs_err::remove_file(&u.spool);
            }
            return fail(500, format!("storage '{storage}' does not exist"));
        }
    }
    let shared = shared.clone();
    let blocking = {
        let method = method.to_string();
        let path = path.to_string();
        let p = P(p.0.clone());
        let caller = caller.clone();
        move || handle_sync(&shared, &method, &path, &p, &caller, upload)
    };
    // Handlers may run commands (qemu-img, the guest agent): keep them off the reactor.
    match tokio::task::spawn_blocking(blocking).await {
        Ok(answer) => answer,
        Err(e) => fail(500, format!("internal error: {e}")),
    }
}

fn handle_sync(
    shared: &Arc<Shared>,
    method: &str,
    path: &str,
    p: &P,
    caller: &Caller,
    upload: Option<Upload>,
) -> Answer {
    match (method, path) {
        ("GET", "/version") => {
            let version = shared.lock().config.version.clone();
            Answer::Data(
                json!({"version": version, "release": version.rsplit_once('.').map(|v| v.0).unwrap_or(&version), "repoid": "0000000000000000"}),
            )
        }
        ("GET", "/nodes") => {
            let node = shared.lock().config.node.clone();
            Answer::Data(json!([{"node": node, "status": "online", "type": "node"}]))
        }
        ("POST", "/access/ticket") => ticket(shared, p),
        ("GET", "/access/permissions") => permissions(shared, caller),
        ("GET", "/cluster/nextid") => nextid(shared, p),
        ("GET", "/cluster/resources") => resources(shared, p),
        ("GET", "/storage/{storage}") => {
            let inner = shared.lock();
            let s = inner
                .config
                .storages
                .iter()
                .find(|s| s.id == p.str("storage"))
                .unwrap();
            Answer::Data(json!({
                "storage": s.id, "type": "dir", "content": s.content.join(","),
                "path": shared.storage_dir(&s.id).display().to_string(), "digest": "0"
            }))
        }
        ("GET", "/nodes/{node}/storage/{storage}/status") => storage_status(shared, p),
        ("GET", "/nodes/{node}/storage/{storage}/content") => storage_content(shared, p),
        ("DELETE", "/nodes/{node}/storage/{storage}/content/{volume}") => {
            delete_volume(shared, p, caller)
        }
        ("POST", "/nodes/{node}/storage/{storage}/upload") => {
            upload_file(shared, p, caller, upload.expect("upload body"))
        }
        ("GET", "/nodes/{node}/tasks/{upid}/status") => task_status(shared, p, caller),
        ("GET", "/nodes/{node}/tasks/{upid}/log") => task_log(shared, p, caller),
        ("POST", "/nodes/{node}/qemu") => create_vm(shared, p, caller),
        ("GET", "/nodes/{node}/qemu") => {
            let inner = shared.lock();
            let list: Vec<Value> = inner
                .vms
                .iter()
                .filter(|(id, _)| may_audit(&inner, caller, **id))
                .map(|(id, vm)| vm_resource(*id, vm, &inner.config.node))
                .collect();
            Answer::Data(Value::Array(list))
        }
        ("GET", "/nodes/{node}/qemu/{vmid}/config") => {
            let inner = shared.lock();
            match inner.vms.get(&vmid(p)) {
                Some(vm) => {
                    let mut map: serde_json::Map<String, Value> = vm
                        .config
                        .iter()
                        .map(|(k, v)| (k.clone(), json!(v)))
                        .collect();
                    if vm.template {
                        map.insert("template".into(), json!(1));
                    }
                    map.insert("digest".into(), json!(digest(&vm.config)));
                    Answer::Data(Value::Object(map))
                }
                None => no_vm(p),
            }
        }
        ("PUT", "/nodes/{node}/qemu/{vmid}/config") => update_config(shared, p, caller),
        ("POST", "/nodes/{node}/qemu/{vmid}/template") => make_template(shared, p, caller),
        ("POST", "/nodes/{node}/qemu/{vmid}/clone") => clone_vm(shared, p, caller),
        ("PUT", "/nodes/{node}/qemu/{vmid}/resize") => resize(shared, p, caller),
        ("POST", "/nodes/{node}/qemu/{vmid}/status/start") => start_vm(shared, p, caller),
        ("POST", "/nodes/{node}/qemu/{vmid}/status/stop") => stop_vm(shared, p, caller),
        ("GET", "/nodes/{node}/qemu/{vmid}/status/current") => {
            let inner = shared.lock();
            match inner.vms.get(&vmid(p)) {
                Some(vm) => {
                    let running = vm.process.as_ref().is_some_and(|r| r.alive());
                    Answer::Data(json!({
                        "vmid": vmid(p), "name": vm.config.get("name"),
                        "status": if running { "running" } else { "stopped" },
                        "qmpstatus": if running { "running" } else { "stopped" },
                        "agent": vm.config.get("agent").map(|a| a.starts_with('1') || a.contains("enabled=1")).unwrap_or(false) as u8,
                        "template": vm.template as u8,
                    }))
                }
                None => no_vm(p),
            }
        }
        ("DELETE", "/nodes/{node}/qemu/{vmid}") => destroy_vm(shared, p, caller),
        ("POST", "/nodes/{node}/qemu/{vmid}/agent/ping") => {
            agent(shared, p, json!({"execute": "guest-ping"}))
                .map_or_else(|e| e, |_| Answer::Data(json!({})))
        }
        ("POST", "/nodes/{node}/qemu/{vmid}/agent/exec") => {
            let command = p.all("command");
            let mut args = json!({"path": command[0], "arg": command[1..], "capture-output": true});
            if let Some(input) = p.get("input-data") {
                args["input-data"] = json!(base64::engine::general_purpose::STANDARD.encode(input));
            }
            agent(
                shared,
                p,
                json!({"execute": "guest-exec", "arguments": args}),
            )
            .map_or_else(|e| e, |r| Answer::Data(json!({"pid": r["pid"]})))
        }
        ("GET", "/nodes/{node}/qemu/{vmid}/agent/exec-status") => {
            let pid: i64 = p.str("pid").parse().unwrap_or(0);
            let cmd = json!({"execute": "guest-exec-status", "arguments": {"pid": pid}});
            agent(shared, p, cmd).map_or_else(
                |e| e,
                |mut r| {
                    // The server hands back stdout and stderr decoded.
                    for key in ["out-data", "err-data"] {
                        if let Some(s) = r[key].as_str() {
                            let bytes = base64::engine::general_purpose::STANDARD
                                .decode(s)
                                .unwrap_or_default();
                            r[key] = json!(String::from_utf8_lossy(&bytes));
                        }
                    }
                    Answer::Data(r)
                },
            )
        }
        ("GET", "/nodes/{node}/qemu/{vmid}/agent/file-read") => file_read(shared, p),
        _ => Answer::NotImplemented(format!(
            "{method} {path} is in the schema but not modelled by this double"
        )),
    }
}

fn vmid(p: &P) -> u32 {
    p.str("vmid").parse().unwrap_or(0)
}

fn no_vm(p: &P) -> Answer {
    fail(
        500,
        format!(
            "Configuration file 'nodes/pve/qemu-server/{}.conf' does not exist",
            p.str("vmid")
        ),
    )
}

fn digest(config: &BTreeMap<String, String>) -> String {
    use sha2::Digest;
    let text: String = config.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
    hex::encode(&sha2::Sha256::digest(text.as_bytes())[..20])
}

fn may_audit(inner: &Inner, caller: &Caller, id: u32) -> bool {
    privileges(&inner.config, &caller.id, &format!("/vms/{id}")).contains("VM.Audit")
}

fn require(inner: &Inner, caller: &Caller, path: &str, privs: &[&str]) -> Result<(), Answer> {
    let have = privileges(&inner.config, &caller.id, path);
    let missing: Vec<&str> = privs
        .iter()
        .copied()
        .filter(|p| !have.contains(*p))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(fail(
            403,
            format!("Permission check failed ({path}, {})", missing.join(", ")),
        ))
    }
}

fn ticket(shared: &Arc<Shared>, p: &P) -> Answer {
    let mut inner = shared.lock();
    let mut user = p.str("username").to_string();
    if let Some(realm) = p.get("realm")
        && !user.contains('@')
    {
        user = format!("{user}@{realm}");
    }
    let ok = inner
        .config
        .users
        .iter()
        .any(|(u, pw)| *u == user && pw == p.str("password"));
    if !ok {
        return Answer::Unauthorized("authentication failure".into());
    }
    let n = inner.tickets.len();
    let ticket = format!(
        "PVE:{user}:{:08X}::{}",
        0x6745_0000 + n,
        hex::encode(rand_bytes(24))
    );
    let csrf = format!("{:08X}:{}", 0x6745_0000 + n, hex::encode(rand_bytes(16)));
    inner
        .tickets
        .insert(ticket.clone(), (user.clone(), csrf.clone()));
    Answer::Data(
        json!({"username": user, "ticket": ticket, "CSRFPreventionToken": csrf, "cap": {}}),
    )
}

fn rand_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    // Loopback test double: /dev/urandom is enough.
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut buf);
    }
    buf
}

fn permissions(shared: &Arc<Shared>, caller: &Caller) -> Answer {
    let inner = shared.lock();
    let mut paths: Vec<String> = inner.config.acl.iter().map(|a| a.path.clone()).collect();
    paths.extend(["/".into(), "/vms".into(), "/storage".into()]);
    for s in &inner.config.storages {
        paths.push(format!("/storage/{}", s.id));
    }
    for id in inner.vms.keys() {
        paths.push(format!("/vms/{id}"));
    }
    paths.sort();
    paths.dedup();
    let mut out = serde_json::Map::new();
    for path in paths {
        let privs = privileges(&inner.config, &caller.id, &path);
        if !privs.is_empty() {
            out.insert(
                path,
                privs
                    .into_iter()
                    .map(|p| (p, json!(1)))
                    .collect::<serde_json::Map<_, _>>()
                    .into(),
            );
        }
    }
    Answer::Data(Value::Object(out))
}

fn nextid(shared: &Arc<Shared>, p: &P) -> Answer {
    let inner = shared.lock();
    if let Some(id) = p.get("vmid") {
        let id: u32 = id.parse().unwrap_or(0);
        if inner.vms.contains_key(&id) {
            return fail(400, format!("VM {id} already exists"));
        }
        return Answer::Data(json!(id.to_string()));
    }
    let id = (100..).find(|id| !inner.vms.contains_key(id)).unwrap();
    // The server answers a string here.
    Answer::Data(json!(id.to_string()))
}

fn vm_resource(id: u32, vm: &Vm, node: &str) -> Value {
    let running = vm.process.as_ref().is_some_and(|r| r.alive());
    json!({
        "id": format!("qemu/{id}"), "type": "qemu", "vmid": id, "node": node,
        "name": vm.config.get("name"), "tags": vm.config.get("tags"),
        "template": vm.template as u8, "status": if running { "running" } else { "stopped" },
    })
}

fn resources(shared: &Arc<Shared>, p: &P) -> Answer {
    let inner = shared.lock();
    let mut out = Vec::new();
    let kind = p.get("type");
    if kind.is_none() || kind == Some("vm") {
        for (id, vm) in &inner.vms {
            out.push(vm_resource(*id, vm, &inner.config.node));
        }
    }
    if kind.is_none() || kind == Some("storage") {
        for s in &inner.config.storages {
            out.push(
                json!({"id": format!("storage/{}/{}", inner.config.node, s.id), "type": "storage",
                "storage": s.id, "node": inner.config.node, "content": s.content.join(","),
                "maxdisk": s.capacity, "status": "available"}),
            );
        }
    }
    Answer::Data(Value::Array(out))
}

fn storage_status(shared: &Arc<Shared>, p: &P) -> Answer {
    let inner = shared.lock();
    let s = inner
        .config
        .storages
        .iter()
        .find(|s| s.id == p.str("storage"))
        .unwrap();
    let used = super::storage_used(&shared.storage_dir(&s.id)).min(s.capacity);
    Answer::Data(json!({
        "content": s.content.join(","), "type": "dir", "active": 1, "enabled": 1, "shared": 0,
        "total": s.capacity, "used": used, "avail": s.capacity - used,
    }))
}

fn storage_content(shared: &Arc<Shared>, p: &P) -> Answer {
    let inner = shared.lock();
    let vols = &inner.volumes[p.str("storage")];
    let list: Vec<Value> = vols
        .iter()
        .filter(|(_, v)| p.get("content").is_none_or(|c| c == v.content))
        .map(|(id, v)| {
            let size = std::fs::metadata(&v.path).map(|m| m.len()).unwrap_or(0);
            json!({"volid": id, "content": v.content, "format": v.format, "size": size})
        })
        .collect();
    Answer::Data(Value::Array(list))
}

fn delete_volume(shared: &Arc<Shared>, p: &P, caller: &Caller) -> Answer {
    let storage = p.str("storage").to_string();
    let mut volid = p.str("volume").to_string();
    if !volid.contains(':') {
        volid = format!("{storage}:{volid}");
    }
    {
        let inner = shared.lock();
        if let Err(a) = require(
            &inner,
            caller,
            &format!("/storage/{storage}"),
            &["Datastore.Allocate"],
        ) {
            return a;
        }
        if !inner.volumes[&storage].contains_key(&volid) {
            return fail(500, format!("volume '{volid}' does not exist"));
        }
    }
    let upid = start_task(shared, "imgdel", "", &caller.id, move |ctx| {
        let vol = ctx
            .shared
            .lock()
            .volumes
            .get_mut(&storage)
            .and_then(|v| v.remove(&volid));
        if let Some(vol) = vol {
            std::fs::remove_file(&vol.path).map_err(|e| format!("removing {volid}: {e}"))?;
            ctx.log(format!("Removed volume '{volid}'"));
        }
        Ok(())
    });
    Answer::Data(json!(upid))
}

fn valid_upload_name(name: &str, content: &str) -> bool {
    let exts: &[&str] = match content {
        "import" => &["ova", "qcow2", "raw", "vmdk"],
        "iso" => &["iso", "img"],
        _ => &["tar.gz", "tar.xz", "tar.zst"],
    };
    let Some((stem, ext)) = name.rsplit_once('.') else {
        return false;
    };
    let stem_ok = !stem.is_empty()
        && stem
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.+=_".contains(c));
    stem_ok && (exts.contains(&ext) || exts.iter().any(|e| name.ends_with(&format!(".{e}"))))
}

fn upload_file(shared: &Arc<Shared>, p: &P, caller: &Caller, mut upload: Upload) -> Answer {
    if shared
        .upload_damages
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        // The bytes changed on the way: the digest the server computed is not the one the
        // client sent (any other value stands for it).
        upload.digest = hex::encode(sha2::Sha256::digest(upload.digest.as_bytes()));
    }
    let storage = p.str("storage").to_string();
    let content = p.str("content").to_string();
    let discard = |a: Answer| {
        let _ = fs_err::remove_file(&upload.spool);
        a
    };
    let (allowed, capacity) = {
        let inner = shared.lock();
        let s = inner
            .config
            .storages
            .iter()
            .find(|s| s.id == storage)
            .unwrap();
        (s.content.contains(&content), s.capacity)
    };
    // The server checks the storage's content types only now, after the whole body arrived.
    if !allowed {
        return discard(fail(
            500,
            format!("storage '{storage}' does not support '{content}' content"),
        ));
    }
    let name = upload.file_name.clone();
    if !valid_upload_name(&name, &content) {
        let mut e = BTreeMap::new();
        e.insert(
            "filename".to_string(),
            "invalid filename or wrong extension".to_string(),
        );
        return discard(Answer::Params(e));
    }
    shared.lock().uploads.push(UploadRecord {
        file_name: name.clone(),
        size: upload.size,
        elapsed: upload.elapsed,
    });

    let expected = p.get("checksum").map(|s| s.to_ascii_lowercase());
    let algo = p.get("checksum-algorithm").unwrap_or("sha256").to_string();
    let sub = if content == "iso" {
        "template/iso"
    } else {
        content.as_str()
    };
    let target_dir = shared.storage_dir(&storage).join(sub);
    let volid = format!("{storage}:{content}/{name}");
    let upid = start_task(shared, "imgcopy", "", &caller.id, move |ctx| {
        let spool = upload.spool.clone();
        let result = (|| {
            ctx.log(format!("starting file import from: {}", spool.display()));
            if let Some(expected) = &expected {
                ctx.log(format!("validating checksum ({algo})..."));
                if *expected != upload.digest {
                    return Err(format!(
                        "checksum mismatch: got '{}' != expect '{expected}'",
                        upload.digest
                    ));
                }
                ctx.log("checksum verified");
            }
            if content == "import" {
                let out = run(Command::new("qemu-img")
                    .args(["info", "--output=json"])
                    .arg(&spool))?;
                let info: Value = serde_json::from_slice(&out).map_err(|e| e.to_string())?;
                let ext = name.rsplit('.').next().unwrap_or("");
                let format = info["format"].as_str().unwrap_or("");
                if info.get("backing-filename").is_some() {
                    return Err("image has a backing file, refusing to import it".into());
                }
                if format != ext {
                    return Err(format!(
                        "uploaded file is of format '{format}', not '{ext}'"
                    ));
                }
            }
            let used = super::storage_used(&ctx.shared.storage_dir(&storage));
            if used + upload.size > capacity {
                return Err("error writing target file: No space left on device".into());
            }
            fs_err::create_dir_all(&target_dir).map_err(|e| e.to_string())?;
            let target = target_dir.join(&name);
            ctx.log(format!("target file: {}", target.display()));
            fs_err::rename(&spool, &target).map_err(|e| e.to_string())?;
            let format = if content == "iso" {
                "iso"
            } else {
                name.rsplit('.').next().unwrap_or("raw")
            };
            ctx.shared.lock().volumes.get_mut(&storage).unwrap().insert(
                volid.clone(),
                Volume {
                    path: target,
                    content: content.clone(),
                    format: format.into(),
                },
            );
            ctx.log(format!("file size is: {}", upload.size));
            Ok(())
        })();
        let _ = std::fs::remove_file(&spool);
        result
    });
    Answer::Data(json!(upid))
}

fn find_task<'a>(inner: &'a Inner, p: &P, caller: &Caller) -> Result<&'a super::Task, Answer> {
    let upid = p.str("upid");
    let Some(task) = inner.tasks.get(upid) else {
        return Err(fail(500, format!("no such task '{upid}'")));
    };
    if task.user != caller.id {
        require(
            inner,
            caller,
            &format!("/nodes/{}", inner.config.node),
            &["Sys.Audit"],
        )?;
    }
    Ok(task)
}

fn task_status(shared: &Arc<Shared>, p: &P, caller: &Caller) -> Answer {
    let inner = shared.lock();
    match find_task(&inner, p, caller) {
        Ok(t) => {
            let mut v = json!({
                "upid": t.upid, "node": inner.config.node, "pid": t.pid, "pstart": t.pstart,
                "starttime": t.starttime, "type": t.kind, "id": t.id, "user": t.user,
                "status": if t.exitstatus.is_some() { "stopped" } else { "running" },
            });
            if let Some(e) = &t.exitstatus {
                v["exitstatus"] = json!(e);
            }
            Answer::Data(v)
        }
        Err(a) => a,
    }
}

fn task_log(shared: &Arc<Shared>, p: &P, caller: &Caller) -> Answer {
    let inner = shared.lock();
    match find_task(&inner, p, caller) {
        Ok(t) => {
            let start: usize = p.get("start").and_then(|s| s.parse().ok()).unwrap_or(0);
            let limit: usize = p.get("limit").and_then(|s| s.parse().ok()).unwrap_or(50);
            let lines: Vec<Value> = t
                .log
                .iter()
                .enumerate()
                .skip(start)
                .take(limit)
                .map(|(i, l)| json!({"n": i + 1, "t": l}))
                .collect();
            Answer::Data(Value::Array(lines))
        }
        Err(a) => a,
    }
}

/// Which privilege a config key needs, as the server's `check_vm_modify_config_perm`.
fn config_priv(key: &str) -> &'static str {
    let base = key.trim_end_matches(|c: char| c.is_ascii_digit());
    match base {
        "memory" | "balloon" | "shares" => "VM.Config.Memory",
        "cores" | "sockets" | "cpu" | "vcpus" | "cpulimit" | "cpuunits" | "numa" => "VM.Config.CPU",
        "net" => "VM.Config.Network",
        "ide" | "sata" | "scsi" | "virtio" | "efidisk" | "tpmstate" | "unused" => "VM.Config.Disk",
        "ciuser" | "cipassword" | "sshkeys" | "ipconfig" | "nameserver" | "searchdomain"
        | "citype" | "ciupgrade" | "cicustom" => "VM.Config.Cloudinit",
        "machine" | "bios" | "scsihw" | "vga" | "serial" | "usb" | "hostpci" | "tablet" => {
            "VM.Config.HWType"
        }
        _ => "VM.Config.Options",
    }
}

fn is_drive(key: &str) -> bool {
    let base = key.trim_end_matches(|c: char| c.is_ascii_digit());
    base != key
        && matches!(
            base,
            "ide" | "sata" | "scsi" | "virtio" | "efidisk" | "tpmstate"
        )
}

/// Storages a drive value allocates on, for the `Datastore.AllocateSpace` check.
fn drive_storage(value: &str) -> Option<String> {
    let file = value.split(',').next()?;
    let (storage, rest) = file.split_once(':')?;
    (!file.starts_with('/'))
        .then(|| storage.to_string())
        .filter(|_| !rest.is_empty())
}

const META_KEYS: [&str; 4] = ["node", "vmid", "digest", "skiplock"];

fn create_vm(shared: &Arc<Shared>, p: &P, caller: &Caller) -> Answer {
    let id = vmid(p);
    let mut config = BTreeMap::new();
    {
        let mut inner = shared.lock();
        if let Err(a) = require(&inner, caller, &format!("/vms/{id}"), &["VM.Allocate"]) {
            return a;
        }
        for (k, v) in &p.0 {
            if META_KEYS.contains(&k.as_str()) {
                continue;
            }
            if let Err(a) = require(&inner, caller, &format!("/vms/{id}"), &[config_priv(k)]) {
                return a;
            }
            if is_drive(k)
                && let Some(st) = drive_storage(&v[0])
                && let Err(a) = require(
                    &inner,
                    caller,
                    &format!("/storage/{st}"),
                    &["Datastore.AllocateSpace"],
                )
            {
                return a;
            }
            config.insert(k.clone(), v[0].clone());
        }
        if inner.vms.contains_key(&id) {
            return fail(
                500,
                format!("unable to create VM {id}: config file already exists"),
            );
        }
        let mut reserved = BTreeMap::new();
        reserved.insert("lock".to_string(), "create".to_string());
        inner.vms.insert(
            id,
            Vm {
                config: reserved,
                template: false,
                process: None,
            },
        );
    }
    let upid = start_task(
        shared,
        "qmcreate",
        &id.to_string(),
        &caller.id,
        move |ctx| {
            let result = allocate_drives(ctx, id, &mut config);
            let mut inner = ctx.shared.lock();
            match result {
                Ok(()) => {
                    inner.vms.get_mut(&id).unwrap().config = config;
                    Ok(())
                }
                Err(e) => {
                    // A failed create leaves nothing behind.
                    inner.vms.remove(&id);
                    for vols in inner.volumes.values_mut() {
                        vols.retain(|volid, v| {
                            let mine = volid.contains(&format!(":{id}/"));
                            if mine {
                                let _ = std::fs::remove_file(&v.path);
                            }
                            !mine
                        });
                    }
                    Err(e)
                }
            }
        },
    );
    Answer::Data(json!(upid))
}

fn images_dir(shared: &Shared, storage: &str, id: u32) -> PathBuf {
    shared
        .storage_dir(storage)
        .join("images")
        .join(id.to_string())
}

fn volume_path(shared: &Shared, volid: &str) -> Option<PathBuf> {
    let (storage, _) = volid.split_once(':')?;
    shared
        .lock()
        .volumes
        .get(storage)?
        .get(volid)
        .map(|v| v.path.clone())
}

fn check_images(shared: &Shared, storage: &str) -> Result<(), String> {
    let inner = shared.lock();
    let s = inner
        .config
        .storages
        .iter()
        .find(|s| s.id == storage)
        .ok_or_else(|| format!("storage '{storage}' does not exist"))?;
    if !s.content.iter().any(|c| c == "images") {
        return Err(format!(
            "storage '{storage}' does not support content-type 'images'"
        ));
    }
    Ok(())
}

/// Allocates the volumes a new config asks for (`ST:SIZE`, `ST:0,import-from=`,
/// `ST:cloudinit`), rewriting each drive to the volume it got, as the server does.
fn allocate_drives(
    ctx: &super::TaskCtx,
    id: u32,
    config: &mut BTreeMap<String, String>,
) -> Result<(), String> {
    let shared = &ctx.shared;
    let mut n = 0;
    let keys: Vec<String> = config.keys().cloned().collect();
    // The EFI disk comes first so it gets disk-0, as on a real node.
    let mut order: Vec<String> = keys
        .iter()
        .filter(|k| k.starts_with("efidisk"))
        .cloned()
        .collect();
    order.extend(
        keys.iter()
            .filter(|k| is_drive(k) && !k.starts_with("efidisk"))
            .cloned(),
    );
    for key in order {
        let value = config[&key].clone();
        let mut parts: Vec<(Option<String>, String)> = super::schema::split_property_string(&value);
        let file = parts[0].1.clone();
        let Some((storage, spec)) = file.split_once(':') else {
            continue;
        };
        if spec.contains('/') || file == "none" || file == "cdrom" {
            continue; // an existing volume, e.g. an ISO
        }
        check_images(shared, storage)?;
        let dir = images_dir(shared, storage, id);
        fs_err::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let (volname, path, format) = if spec == "cloudinit" {
            let name = format!("vm-{id}-cloudinit.qcow2");
            run(Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(dir.join(&name))
                .arg("4M"))?;
            parts.retain(|(k, _)| k.as_deref() != Some("media"));
            parts.push((Some("media".into()), "cdrom".into()));
            (name.clone(), dir.join(name), "qcow2")
        } else if key.starts_with("efidisk") {
            let name = format!("vm-{id}-disk-{n}.raw");
            n += 1;
            fs_err::copy(OVMF_VARS, dir.join(&name)).map_err(|e| e.to_string())?;
            parts.push((Some("size".into()), "528K".into()));
            (name.clone(), dir.join(name), "raw")
        } else {
            let name = format!("vm-{id}-disk-{n}.qcow2");
            n += 1;
            let path = dir.join(&name);
            let import = parts
                .iter()
                .find(|(k, _)| k.as_deref() == Some("import-from"))
                .map(|(_, v)| v.clone());
            if let Some(src) = import {
                let src_path = if src.starts_with('/') {
                    Some(PathBuf::from(&src))
                } else {
                    volume_path(shared, &src)
                };
                let src_path =
                    src_path.ok_or_else(|| format!("unable to parse volume ID '{src}'"))?;
                ctx.log(format!(
                    "importing disk '{src}' to volume '{storage}:{id}/{name}'"
                ));
                run(Command::new("qemu-img")
                    .args(["convert", "-O", "qcow2"])
                    .arg(&src_path)
                    .arg(&path))?;
                parts.retain(|(k, _)| k.as_deref() != Some("import-from"));
            } else {
                let gib: f64 = spec
                    .parse()
                    .map_err(|_| format!("unable to parse size '{spec}'"))?;
                run(Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2"])
                    .arg(&path)
                    .arg(format!("{}M", (gib * 1024.0) as u64)))?;
            }
            let info = run(Command::new("qemu-img")
                .args(["info", "--output=json"])
                .arg(&path))?;
            let info: Value = serde_json::from_slice(&info).map_err(|e| e.to_string())?;
            let size = info["virtual-size"].as_u64().unwrap_or(0);
            parts.push((Some("size".into()), human_size(size)));
            (name, path, "qcow2")
        };
        let volid = format!("{storage}:{id}/{volname}");
        parts[0].1 = volid.clone();
        shared.lock().volumes.get_mut(storage).unwrap().insert(
            volid,
            Volume {
                path,
                content: "images".into(),
                format: format.into(),
            },
        );
        config.insert(key, join_property_string(&parts));
    }
    // Network devices get a MAC address in Proxmox's range.
    for key in keys.iter().filter(|k| k.starts_with("net")) {
        let value = config[key].clone();
        let mut parts = super::schema::split_property_string(&value);
        if let (None, model) = &parts[0] {
            let mac = rand_bytes(3);
            let model = model.clone();
            parts[0] = (
                Some(model),
                format!("BC:24:11:{:02X}:{:02X}:{:02X}", mac[0], mac[1], mac[2]),
            );
            config.insert(key.clone(), join_property_string(&parts));
        }
    }
    config
        .entry("smbios1".into())
        .or_insert_with(|| format!("uuid={}", uuid_like()));
    Ok(())
}

fn uuid_like() -> String {
    let b = hex::encode(rand_bytes(16));
    format!(
        "{}-{}-{}-{}-{}",
        &b[..8],
        &b[8..12],
        &b[12..16],
        &b[16..20],
        &b[20..]
    )
}

fn human_size(bytes: u64) -> String {
    if bytes.is_multiple_of(1 << 30) {
        format!("{}G", bytes >> 30)
    } else if bytes.is_multiple_of(1 << 20) {
        format!("{}M", bytes >> 20)
    } else {
        format!("{}K", bytes.div_ceil(1024))
    }
}

fn join_property_string(parts: &[(Option<String>, String)]) -> String {
    parts
        .iter()
        .map(|(k, v)| match k {
            Some(k) => format!("{k}={v}"),
            None => v.clone(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn running(inner: &Inner, id: u32) -> bool {
    inner
        .vms
        .get(&id)
        .and_then(|vm| vm.process.as_ref())
        .is_some_and(|p| p.alive())
}

fn update_config(shared: &Arc<Shared>, p: &P, caller: &Caller) -> Answer {
    let id = vmid(p);
    let mut inner = shared.lock();
    if !inner.vms.contains_key(&id) {
        return no_vm(p);
    }
    for k in
        p.0.keys()
            .filter(|k| !META_KEYS.contains(&k.as_str()) && *k != "delete")
    {
        if let Err(a) = require(&inner, caller, &format!("/vms/{id}"), &[config_priv(k)]) {
            return a;
        }
    }
    let deletes: Vec<String> = p
        .str("delete")
        .split([',', ';', ' '])
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    for k in &deletes {
        if let Err(a) = require(&inner, caller, &format!("/vms/{id}"), &[config_priv(k)]) {
            return a;
        }
    }
    let is_running = running(&inner, id);
    let vm = inner.vms.get_mut(&id).unwrap();
    if vm.template {
        return fail(500, "you can't change the configuration of a template");
    }
    for k in &deletes {
        vm.config.remove(k);
    }
    for (k, v) in &p.0 {
        if META_KEYS.contains(&k.as_str()) || k == "delete" {
            continue;
        }
        // A CD-ROM's medium changes at once on a running VM.
        if is_running
            && k.starts_with("ide")
            && v[0].starts_with("none")
            && v[0].contains("media=cdrom")
            && let Some(proc_) = &vm.process
            && let Err(e) =
                proc_.qmp(json!({"execute": "eject", "arguments": {"id": k, "force": true}}))
        {
            return fail(500, format!("unable to eject {k}: {e}"));
        }
        vm.config.insert(k.clone(), v[0].clone());
    }
    Answer::Data(Value::Null)
}

fn make_template(shared: &Arc<Shared>, p: &P, caller: &Caller) -> Answer {
    let id = vmid(p);
    {
        let inner = shared.lock();
        let Some(vm) = inner.vms.get(&id) else {
            return no_vm(p);
        };
        if vm.template {
            return fail(500, "you can't convert a template to a template");
        }
        if running(&inner, id) {
            return fail(500, "you can't convert a running VM to a template");
        }
    }
    let upid = start_task(
        shared,
        "qmtemplate",
        &id.to_string(),
        &caller.id,
        move |ctx| {
            let mut inner = ctx.shared.lock();
            let inner = &mut *inner;
            let vm = inner.vms.get_mut(&id).ok_or("VM vanished")?;
            for (key, value) in vm.config.iter_mut() {
                if !is_drive(key) || value.contains("cloudinit") {
                    continue;
                }
                let volid = value.split(',').next().unwrap_or("").to_string();
                let Some((storage, _)) = volid.split_once(':') else {
                    continue;
                };
                let Some(vols) = inner.volumes.get_mut(storage) else {
                    continue;
                };
                let Some(vol) = vols.remove(&volid) else {
                    continue;
                };
                let new_volid = volid.replace(&format!("/vm-{id}-"), &format!("/base-{id}-"));
                let name = new_volid.rsplit('/').next().unwrap();
                let new_path = vol.path.with_file_name(name);
                std::fs::rename(&vol.path, &new_path).map_err(|e| e.to_string())?;
                vols.insert(
                    new_volid.clone(),
                    Volume {
                        path: new_path,
                        ..vol
                    },
                );
                *value = value.replacen(&volid, &new_volid, 1);
            }
            vm.template = true;
            Ok(())
        },
    );
    Answer::Data(json!(upid))
}

fn clone_vm(shared: &Arc<Shared>, p: &P, caller: &Caller) -> Answer {
    let id = vmid(p);
    let newid: u32 = p.str("newid").parse().unwrap_or(0);
    let full = p.get("full").map(|_| p.flag("full"));
    let source = {
        let mut inner = shared.lock();
        let Some(vm) = inner.vms.get(&id) else {
            return no_vm(p);
        };
        if inner.vms.contains_key(&newid) {
            return fail(
                500,
                format!("unable to create VM {newid}: config file already exists"),
            );
        }
        let source = (vm.config.clone(), vm.template);
        let mut reserved = BTreeMap::new();
        reserved.insert("lock".to_string(), "clone".to_string());
        inner.vms.insert(
            newid,
            Vm {
                config: reserved,
                template: false,
                process: None,
            },
        );
        source
    };
    let (src_config, is_template) = source;
    if !is_template && full == Some(false) {
        shared.lock().vms.remove(&newid);
        return fail(
            500,
            "linked clone feature is not supported for a VM that is not a template",
        );
    }
    let linked = is_template && full != Some(true);
    let name = p.get("name").map(String::from);
    let description = p.get("description").map(String::from);
    let upid = start_task(shared, "qmclone", &id.to_string(), &caller.id, move |ctx| {
        let shared = &ctx.shared;
        let result = (|| {
            let mut config = src_config.clone();
            let mut n = 0;
            let mut keys: Vec<String> = config.keys().filter(|k| is_drive(k)).cloned().collect();
            keys.sort_by_key(|k| !k.starts_with("efidisk"));
            for key in keys {
                let value = config[&key].clone();
                let volid = value.split(',').next().unwrap_or("").to_string();
                let Some(src) = volume_path(shared, &volid) else {
                    continue;
                };
                let storage = volid.split_once(':').unwrap().0.to_string();
                let dir = images_dir(shared, &storage, newid);
                fs_err::create_dir_all(&dir).map_err(|e| e.to_string())?;
                let ext = volid.rsplit('.').next().unwrap_or("qcow2").to_string();
                let vname = if value.contains("cloudinit") {
                    format!("vm-{newid}-cloudinit.qcow2")
                } else {
                    n += 1;
                    format!("vm-{newid}-disk-{}.{ext}", n - 1)
                };
                let dst = dir.join(&vname);
                ctx.log(format!("clone {volid}: {key} -> {storage}:{newid}/{vname}"));
                if ext == "qcow2" && linked && !value.contains("cloudinit") {
                    run(Command::new("qemu-img")
                        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                        .arg(&src)
                        .arg(&dst))?;
                } else if ext == "qcow2" {
                    run(Command::new("qemu-img")
                        .args(["convert", "-O", "qcow2"])
                        .arg(&src)
                        .arg(&dst))?;
                } else {
                    fs_err::copy(&src, &dst).map_err(|e| e.to_string())?;
                }
                let new_volid = format!("{storage}:{newid}/{vname}");
                shared.lock().volumes.get_mut(&storage).unwrap().insert(
                    new_volid.clone(),
                    Volume {
                        path: dst,
                        content: "images".into(),
                        format: ext.clone(),
                    },
                );
                config.insert(key, value.replacen(&volid, &new_volid, 1));
            }
            for (key, value) in config.clone() {
                if key.starts_with("net") {
                    let mut parts = super::schema::split_property_string(&value);
                    let mac = rand_bytes(3);
                    parts[0].1 = format!("BC:24:11:{:02X}:{:02X}:{:02X}", mac[0], mac[1], mac[2]);
                    config.insert(key, join_property_string(&parts));
                }
            }
            if let Some(name) = &name {
                config.insert("name".into(), name.clone());
            }
            if let Some(d) = &description {
                config.insert("description".into(), d.clone());
            }
            config.insert("smbios1".into(), format!("uuid={}", uuid_like()));
            Ok(config)
        })();
        let mut inner = shared.lock();
        match result {
            Ok(config) => {
                inner.vms.get_mut(&newid).unwrap().config = config;
                Ok(())
            }
            Err(e) => {
                inner.vms.remove(&newid);
                Err(e)
            }
        }
    });
    Answer::Data(json!(upid))
}

fn parse_size(s: &str) -> Option<u64> {
    let (num, unit) = match s.chars().last()? {
        c @ ('K' | 'M' | 'G' | 'T') => (&s[..s.len() - 1], c),
        _ => (s, 'B'),
    };
    let n: f64 = num.parse().ok()?;
    let mult: u64 = match unit {
        'K' => 1 << 10,
        'M' => 1 << 20,
        'G' => 1 << 30,
        'T' => 1 << 40,
        _ => 1,
    };
    Some((n * mult as f64) as u64)
}

fn resize(shared: &Arc<Shared>, p: &P, caller: &Caller) -> Answer {
    let id = vmid(p);
    let disk = p.str("disk").to_string();
    let size = p.str("size").to_string();
    let volid = {
        let inner = shared.lock();
        let Some(vm) = inner.vms.get(&id) else {
            return no_vm(p);
        };
        let Some(value) = vm.config.get(&disk) else {
            return fail(500, format!("disk '{disk}' does not exist"));
        };
        value.split(',').next().unwrap_or("").to_string()
    };
    let Some(path) = volume_path(shared, &volid) else {
        return fail(500, format!("volume '{volid}' does not exist"));
    };
    let upid = start_task(shared, "resize", &id.to_string(), &caller.id, move |ctx| {
        let info = run(Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&path))?;
        let info: Value = serde_json::from_slice(&info).map_err(|e| e.to_string())?;
        let current = info["virtual-size"].as_u64().unwrap_or(0);
        let (relative, amount) = match size.strip_prefix('+') {
            Some(rest) => (true, rest),
            None => (false, size.as_str()),
        };
        let amount = parse_size(amount).ok_or(format!("invalid size '{size}'"))?;
        let new = if relative { current + amount } else { amount };
        if new < current {
            return Err("shrinking disks is not supported".into());
        }
        ctx.log(format!("resizing {disk} from {current} to {new} bytes"));
        run(Command::new("qemu-img")
            .args(["resize", "-q"])
            .arg(&path)
            .arg(new.to_string()))?;
        let mut inner = ctx.shared.lock();
        if let Some(vm) = inner.vms.get_mut(&id)
            && let Some(v) = vm.config.get_mut(&disk)
        {
            let mut parts = super::schema::split_property_string(v);
            parts.retain(|(k, _)| k.as_deref() != Some("size"));
            parts.push((Some("size".into()), human_size(new)));
            *v = join_property_string(&parts);
        }
        Ok(())
    });
    Answer::Data(json!(upid))
}

fn start_vm(shared: &Arc<Shared>, p: &P, caller: &Caller) -> Answer {
    let id = vmid(p);
    {
        let inner = shared.lock();
        let Some(vm) = inner.vms.get(&id) else {
            return no_vm(p);
        };
        if vm.template {
            return fail(500, "you can't start a vm if it's a template");
        }
        if running(&inner, id) {
            return fail(500, format!("VM {id} already running"));
        }
    }
    let upid = start_task(shared, "qmstart", &id.to_string(), &caller.id, move |ctx| {
        let config = ctx
            .shared
            .lock()
            .vms
            .get(&id)
            .map(|vm| vm.config.clone())
            .ok_or("VM vanished")?;
        let running = super::vm::start(ctx, id, &config)?;
        ctx.shared
            .lock()
            .vms
            .get_mut(&id)
            .ok_or("VM vanished")?
            .process = Some(running);
        Ok(())
    });
    Answer::Data(json!(upid))
}

fn stop_vm(shared: &Arc<Shared>, p: &P, caller: &Caller) -> Answer {
    let id = vmid(p);
    if !shared.lock().vms.contains_key(&id) {
        return no_vm(p);
    }
    let upid = start_task(shared, "qmstop", &id.to_string(), &caller.id, move |ctx| {
        let proc_ = ctx
            .shared
            .lock()
            .vms
            .get_mut(&id)
            .and_then(|vm| vm.process.take());
        if let Some(p) = proc_ {
            p.kill();
        }
        Ok(())
    });
    Answer::Data(json!(upid))
}

fn destroy_vm(shared: &Arc<Shared>, p: &P, caller: &Caller) -> Answer {
    let id = vmid(p);
    {
        let inner = shared.lock();
        if !inner.vms.contains_key(&id) {
            return no_vm(p);
        }
        if running(&inner, id) {
            return fail(500, format!("VM {id} is running - destroy failed"));
        }
    }
    let upid = start_task(
        shared,
        "qmdestroy",
        &id.to_string(),
        &caller.id,
        move |ctx| {
            let mut inner = ctx.shared.lock();
            inner.vms.remove(&id);
            for vols in inner.volumes.values_mut() {
                vols.retain(|volid, v| {
                    let mine = volid.contains(&format!(":{id}/"));
                    if mine {
                        let _ = std::fs::remove_file(&v.path);
                    }
                    !mine
                });
            }
            drop(inner);
            ctx.log(format!("destroyed VM {id}"));
            Ok(())
        },
    );
    Answer::Data(json!(upid))
}

fn agent(shared: &Arc<Shared>, p: &P, command: Value) -> Result<Value, Answer> {
    let id = vmid(p);
    let socket = {
        let inner = shared.lock();
        let Some(vm) = inner.vms.get(&id) else {
            return Err(no_vm(p));
        };
        let enabled = vm.config.get("agent").is_some_and(|a| {
            let first = a.split(',').next().unwrap_or("");
            first == "1" || first == "enabled=1"
        });
        if !enabled {
            return Err(fail(500, "No QEMU guest agent configured"));
        }
        match &vm.process {
            Some(proc_) if proc_.alive() => proc_.agent_socket.clone(),
            _ => return Err(fail(500, format!("VM {id} is not running"))),
        }
    };
    super::vm::agent_call(&socket, &command).map_err(|e| fail(500, e))
}

fn file_read(shared: &Arc<Shared>, p: &P) -> Answer {
    let open =
        json!({"execute": "guest-file-open", "arguments": {"path": p.str("file"), "mode": "r"}});
    let handle = match agent(shared, p, open) {
        Ok(h) => h,
        Err(a) => return a,
    };
    let read =
        json!({"execute": "guest-file-read", "arguments": {"handle": handle, "count": 16 << 20}});
    let result = agent(shared, p, read);
    let _ = agent(
        shared,
        p,
        json!({"execute": "guest-file-close", "arguments": {"handle": handle}}),
    );
    match result {
        Ok(r) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(r["buf-b64"].as_str().unwrap_or(""))
                .unwrap_or_default();
            Answer::Data(json!({"content": String::from_utf8_lossy(&bytes)}))
        }
        Err(a) => a,
    }
}
