//! One run of the agent at boot: find the seed, and when its instance is new (or was cut
//! short), apply it step by step, journaling each step. Bad input never stops the boot: it is
//! reported, recorded for `status`, and the run goes on with what is usable.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::appliance::{self, Appliance};
use crate::apply;
use crate::config::network::Network;
use crate::config::userdata::{self, CloudConfig, UserData};
use crate::config::{interfaces, metadata, network};
use crate::datasource::{self, Datasource, Env, NetworkFormat};
use crate::state::{self, Boot, State, Status, Step};

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// A seed to use instead of looking for one.
    pub seed: Option<PathBuf>,
    /// Do not wait for udev when no seed is found at once.
    pub no_settle: bool,
}

/// What the run ended with, for the ready line.
#[derive(Debug)]
pub struct Summary {
    pub datasource: Option<String>,
    pub outcome: String,
}

pub fn run(env: &Env, options: &Options) -> Result<Summary> {
    let started = Instant::now();
    let root = &env.root;
    let image = match Appliance::of_image(root) {
        Ok(a) => a,
        Err(err) => {
            tracing::warn!("{err:#}");
            None
        }
    };

    // Every boot: tsidp needs its auth key only until it has logged in.
    if image == Some(Appliance::Tsidp) {
        match appliance::tsidp::forget_key_after_login(root) {
            Ok(true) => tracing::info!("tsidp has logged in: removed its auth key from disk"),
            Ok(false) => {}
            Err(err) => tracing::warn!("{err:#}"),
        }
    }

    let mut previous = State::load(root)?;
    // Every boot is recorded, also one that found nothing, so `status` can tell "ran,
    // nothing to do" from "has not run".
    let boot = |previous: &mut Option<State>, ds: Option<String>, outcome: &str| -> Result<()> {
        let state = previous.get_or_insert_with(State::default);
        state.last_boot = Some(Boot {
            at: state::now(),
            datasource: ds,
            outcome: outcome.to_owned(),
            ms: started.elapsed().as_millis() as u64,
        });
        state.save(root)
    };

    let source: Box<dyn Datasource> = match find(env, options) {
        Ok(Some(ds)) => ds,
        Ok(None) => {
            let outcome = "no datasource found (no cidata/config-2 filesystem, no ds= on the \
                           kernel command line, no seed directory): nothing to configure";
            tracing::info!("{outcome}");
            boot(&mut previous, None, "no datasource")?;
            return Ok(Summary {
                datasource: None,
                outcome: "no datasource".into(),
            });
        }
        Err(err) => {
            tracing::error!("{err:#}");
            boot(&mut previous, None, &format!("datasource error: {err:#}"))?;
            return Ok(Summary {
                datasource: None,
                outcome: "datasource error".into(),
            });
        }
    };
    let ds_name = source.name();
    tracing::info!("datasource: {ds_name}");

    let failed = |previous: &mut Option<State>, err: anyhow::Error| -> Result<Summary> {
        tracing::error!("{err:#}; nothing applied");
        boot(previous, Some(ds_name.clone()), &format!("failed: {err:#}"))?;
        Ok(Summary {
            datasource: Some(ds_name.clone()),
            outcome: "bad seed, nothing applied".into(),
        })
    };
    let files = match source
        .read()
        .with_context(|| format!("reading the seed {ds_name}"))
    {
        Ok(f) => f,
        Err(err) => return failed(&mut previous, err),
    };
    let meta_bytes = files.meta_data.clone().unwrap_or_default();
    let meta = match metadata::parse(files.meta_format, &meta_bytes, "meta-data") {
        Ok(m) => m,
        Err(err) => return failed(&mut previous, err),
    };

    let machine_uuid = machine_uuid(env);
    // A state without an instance only recorded boots that found no seed.
    let boot_only = previous.as_ref().is_some_and(|p| p.instance_id.is_empty());
    if boot_only {
        previous = None;
    }
    let resume = previous
        .as_ref()
        .filter(|p| p.instance_id == meta.instance_id);
    if let Some(p) = resume {
        if p.finished_at.is_some() {
            let outcome = format!(
                "instance {} already configured; nothing to do",
                meta.instance_id
            );
            tracing::info!("{outcome}");
            boot(
                &mut previous,
                Some(ds_name.clone()),
                "instance unchanged, nothing re-run",
            )?;
            return Ok(Summary {
                datasource: Some(ds_name),
                outcome: "instance unchanged".into(),
            });
        }
        tracing::info!(
            "resuming instance {} (an earlier run did not finish)",
            meta.instance_id
        );
    }
    let new_machine = match &previous {
        None => true,
        Some(p) => {
            p.machine_uuid.is_some() && machine_uuid.is_some() && p.machine_uuid != machine_uuid
        }
    };
    let instance_changed = previous
        .as_ref()
        .is_some_and(|p| p.instance_id != meta.instance_id);
    let mut st = match resume {
        Some(p) => p.clone(),
        None => State {
            instance_id: meta.instance_id.clone(),
            datasource: ds_name.clone(),
            machine_uuid: machine_uuid.clone(),
            started_at: state::now(),
            ..Default::default()
        },
    };
    st.problems.clear();
    st.save(root)?;

    // The documents: each is independent, so a broken one does not stop the others.
    let mut cfg = CloudConfig::default();
    let mut user_data_ok = false;
    if let Some(bytes) = &files.user_data {
        match userdata::parse(bytes, "user-data") {
            Ok(UserData::Config(c)) => {
                cfg = *c;
                user_data_ok = true;
            }
            Ok(UserData::Skipped(why)) => st.problems.push(why),
            Err(err) => st.problems.push(format!("{err:#}; user-data not applied")),
        }
    }
    if let Some(bytes) = files.vendor_data.as_ref().filter(|b| !b.is_empty()) {
        match userdata::parse(bytes, "vendor-data") {
            Ok(UserData::Config(v)) => cfg.merge_vendor(*v),
            Ok(UserData::Skipped(why)) => st.problems.push(why),
            Err(err) => st
                .problems
                .push(format!("{err:#}; vendor-data not applied")),
        }
    }
    let net: Option<Network> = match &files.network {
        Some((NetworkFormat::CloudInit, bytes)) => network::parse(bytes, "network-config")
            .unwrap_or_else(|err| {
                st.problems.push(format!("{err:#}; network not configured"));
                None
            }),
        Some((NetworkFormat::Interfaces, bytes)) => {
            interfaces::parse(&String::from_utf8_lossy(bytes))
                .map(Some)
                .unwrap_or_else(|err| {
                    st.problems
                        .push(format!("network (interfaces): {err:#}; not configured"));
                    None
                })
        }
        None => None,
    };
    if !cfg.unimplemented.is_empty() {
        tracing::info!(
            "user-data keys not applied: {}",
            cfg.unimplemented.join(", ")
        );
    }
    st.unimplemented_keys = cfg.unimplemented.clone();
    st.problems.extend(cfg.warnings.iter().cloned());
    for p in &st.problems {
        tracing::warn!("{p}");
    }

    let mut steps = Steps {
        state: st,
        root: root.clone(),
    };

    steps.run("machine-id", |_| {
        Ok(match apply::machine_id::apply(root, new_machine)? {
            apply::machine_id::Outcome::Kept(_) => "kept".into(),
            apply::machine_id::Outcome::Written(id) => format!("new id {id}"),
        })
    })?;

    let hostname = apply::hostname::choose(
        cfg.hostname.as_deref(),
        cfg.fqdn.as_deref(),
        meta.local_hostname.as_deref(),
        cfg.prefer_fqdn,
    );

    steps.run("ssh-host-keys", |_| {
        let types: Vec<String> = cfg.ssh_genkeytypes.clone().unwrap_or_else(|| {
            apply::hostkeys::DEFAULT_TYPES
                .iter()
                .map(|s| s.to_string())
                .collect()
        });
        let asked = instance_changed && cfg.ssh_deletekeys == Some(true);
        if !new_machine && !asked && apply::hostkeys::present(root, &types) {
            return Ok("kept (same machine; set ssh_deletekeys: true to renew)".into());
        }
        let host = hostname
            .as_ref()
            .map(|h| h.0.clone())
            .unwrap_or_else(|| "localhost".into());
        let fingerprints = apply::hostkeys::regenerate(root, &types, &format!("root@{host}"))?;
        for f in &fingerprints {
            tracing::info!("ssh host key: {f}");
        }
        Ok(format!("generated {}", types.join(", ")))
    })?;

    if let Some((name, fqdn)) = &hostname {
        steps.run("hostname", |_| {
            apply::hostname::apply(root, name)?;
            Ok(name.clone())
        })?;
        if cfg.manage_etc_hosts {
            steps.run("etc-hosts", |_| {
                apply::hostname::apply_hosts(root, name, fqdn.as_deref())?;
                Ok(fqdn.clone().unwrap_or_else(|| name.clone()))
            })?;
        }
    }

    if user_data_ok || !meta.public_keys.is_empty() {
        let default_name = apply::users::distro_default_user(root);
        let plans = apply::users::plan(&cfg, &default_name, &meta.public_keys);
        steps.run("users", |warnings| {
            apply::users::apply(root, &plans, cfg.chpasswd_expire.unwrap_or(true), warnings)?;
            let names: Vec<&str> = plans.iter().map(|p| p.spec.name.as_str()).collect();
            Ok(names.join(", "))
        })?;
    }
    if let Some(allow) = cfg.ssh_pwauth {
        steps.run("ssh-pwauth", |_| {
            apply::users::ssh_pwauth(root, allow)?;
            Ok(if allow {
                "password logins allowed"
            } else {
                "password logins refused"
            }
            .into())
        })?;
    }

    if let Some(net) = &net {
        steps.run("network", |warnings| {
            let nics = apply::network::nics(&env.sysfs);
            let written = apply::network::apply(root, net, &nics, warnings)?;
            Ok(format!("{} systemd-networkd file(s)", written.len()))
        })?;
    }

    if !cfg.write_files.is_empty() {
        steps.run("write-files", |warnings| {
            let mut n = 0;
            for f in &cfg.write_files {
                match apply::write_files::apply(root, f) {
                    Ok(()) => n += 1,
                    Err(err) => warnings.push(format!("{err:#}; skipped")),
                }
            }
            Ok(format!("{n} of {} file(s)", cfg.write_files.len()))
        })?;
    }

    let section = cfg.appliance.clone();
    let mut missing_secrets = None;
    steps.run("appliance-secrets", |warnings| {
        let outcome = appliance::apply(root, image, section.as_ref())?;
        for u in &outcome.findings.unknown {
            warnings.push(format!("{u}: unknown key, ignored"));
        }
        warnings.extend(
            outcome
                .findings
                .invalid
                .iter()
                .map(|i| format!("{i}; not applied")),
        );
        for note in &outcome.notes {
            tracing::info!("{note}");
        }
        let missing = outcome.missing.clone();
        if !missing.is_empty() {
            tracing::warn!(
                "missing secrets: {} (their services stay stopped)",
                missing.join(", ")
            );
        }
        missing_secrets = Some(missing.clone());
        Ok(SecretsDetail {
            written: outcome.written.len(),
            missing,
            image,
        }
        .to_string())
    })?;
    if let Some(missing) = missing_secrets {
        steps.state.missing_secrets = missing;
        steps.state.save(root)?;
    }

    if cfg.package_upgrade {
        steps.state.record(Step {
            name: "package-upgrade".into(),
            status: Status::Skipped,
            detail: "asked for, not run: a boot must not depend on the network".into(),
            ms: 0,
        });
    }

    let mut st = steps.state;
    st.finished_at = Some(state::now());
    st.duration_ms = Some(started.elapsed().as_millis() as u64);
    st.last_boot = Some(Boot {
        at: state::now(),
        datasource: Some(ds_name.clone()),
        outcome: format!("applied instance {}", st.instance_id),
        ms: started.elapsed().as_millis() as u64,
    });
    st.save(root)?;
    let failed = st
        .steps
        .iter()
        .filter(|s| s.status == Status::Failed)
        .count();
    let mut outcome = format!("instance {} applied", short(&st.instance_id));
    if failed > 0 {
        outcome.push_str(&format!(", {failed} step(s) failed"));
    }
    if !st.missing_secrets.is_empty() {
        outcome.push_str(&format!(", {} secret(s) missing", st.missing_secrets.len()));
    }
    Ok(Summary {
        datasource: Some(ds_name),
        outcome,
    })
}

struct SecretsDetail {
    written: usize,
    missing: Vec<String>,
    image: Option<Appliance>,
}

impl std::fmt::Display for SecretsDetail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.image {
            None => write!(f, "not an appliance image"),
            Some(a) => {
                write!(f, "{}: {} file(s) written", a.name(), self.written)?;
                if !self.missing.is_empty() {
                    write!(f, ", missing {}", self.missing.join(", "))?;
                }
                Ok(())
            }
        }
    }
}

fn short(id: &str) -> &str {
    if id.len() > 12 { &id[..12] } else { id }
}

/// The steps of one instance, journaled as they finish.
struct Steps {
    state: State,
    root: crate::fsutil::Root,
}

impl Steps {
    fn run(
        &mut self,
        name: &str,
        f: impl FnOnce(&mut Vec<String>) -> Result<String>,
    ) -> Result<()> {
        if self.state.done(name) {
            return Ok(());
        }
        let t = Instant::now();
        let mut warnings = Vec::new();
        let result = f(&mut warnings);
        let ms = t.elapsed().as_millis() as u64;
        let step = match result {
            Ok(detail) => {
                tracing::info!("{name}: {detail}");
                Step {
                    name: name.into(),
                    status: Status::Done,
                    detail,
                    ms,
                }
            }
            Err(err) => {
                tracing::error!("{name}: {err:#}");
                self.state.problems.push(format!("{name}: {err:#}"));
                Step {
                    name: name.into(),
                    status: Status::Failed,
                    detail: format!("{err:#}"),
                    ms,
                }
            }
        };
        for w in warnings {
            tracing::warn!("{name}: {w}");
            self.state.problems.push(format!("{name}: {w}"));
        }
        self.state.record(step);
        self.state.save(&self.root)
    }
}

fn find(env: &Env, options: &Options) -> Result<Option<Box<dyn Datasource>>> {
    if let Some(seed) = &options.seed {
        return datasource::explicit(seed).map(Some);
    }
    if let Some(ds) = datasource::discover(env)? {
        return Ok(Some(ds));
    }
    // The CD-ROM may still be on its way (its driver is loaded by udev): wait for udev's
    // queue once, bounded, then look again.
    if env.root.is_live() && !options.no_settle {
        let _ = apply::run(std::process::Command::new("udevadm").args(["settle", "--timeout=10"]));
        return datasource::discover(env);
    }
    Ok(None)
}

/// The SMBIOS system uuid (Proxmox gives each VM, and each clone, its own).
fn machine_uuid(env: &Env) -> Option<String> {
    let text = std::fs::read_to_string(env.sysfs.join("class/dmi/id/product_uuid")).ok()?;
    let id = text.trim().to_lowercase();
    (!id.is_empty()).then_some(id)
}
