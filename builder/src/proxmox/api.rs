//! A small client for the Proxmox VE API: authentication, the `{"data": ...}` envelope, error
//! mapping, and task polling.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use super::conn::{Auth, Connection};
use super::tls;

/// An answer other than 2xx, mapped to what a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "authentication failed on {what} (401 {reason}): check the token id and its secret, \
         or the user and password"
    )]
    Unauthorized { what: String, reason: String },
    #[error(
        "permission denied on {what}: {message}; grant it with `pveum acl modify PATH --roles \
         ROLE --tokens TOKENID` (a privilege-separated token needs its own ACL entry)"
    )]
    Forbidden { what: String, message: String },
    #[error("{what} was rejected: {}", format_params(.errors))]
    BadParams {
        what: String,
        errors: Vec<(String, String)>,
    },
    #[error("{what} is not implemented by this server (501: {message})")]
    NotImplemented { what: String, message: String },
    #[error("{what} failed ({status}): {message}")]
    Other {
        what: String,
        status: u16,
        message: String,
    },
}

fn format_params(errors: &[(String, String)]) -> String {
    errors
        .iter()
        .map(|(k, v)| format!("{k}: {}", v.trim()))
        .collect::<Vec<_>>()
        .join("; ")
}

pub struct Api {
    http: reqwest::Client,
    base: url::Url,
    auth: Header,
    pub task_timeout: Duration,
}

enum Header {
    Token(String),
    Ticket { cookie: String, csrf: String },
}

impl Api {
    pub async fn connect(conn: Connection) -> anyhow::Result<Api> {
        let tls = tls::client_config(&conn.trust)?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(Duration::from_secs(15))
            // The server drops idle keep-alive connections; do not reuse them for long.
            .pool_idle_timeout(Duration::from_secs(3))
            .user_agent(concat!("omni-image/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("setting up the HTTP client")?;
        let auth = match &conn.auth {
            Auth::Token { id, secret } => Header::Token(format!("PVEAPIToken={id}={secret}")),
            Auth::Password { user, password } => {
                let url = format!("{}/access/ticket", conn.base);
                let resp = http
                    .post(&url)
                    .form(&[("username", user.as_str()), ("password", password.as_str())])
                    .send()
                    .await
                    .with_context(|| format!("connecting to {}", conn.base))?;
                let data = envelope(resp, "logging in (POST /access/ticket)").await?;
                let ticket = data["ticket"]
                    .as_str()
                    .context("login answer without a ticket")?;
                let csrf = data["CSRFPreventionToken"]
                    .as_str()
                    .context("login answer without a CSRF token")?;
                let cookie = format!(
                    "PVEAuthCookie={}",
                    percent_encoding::utf8_percent_encode(
                        ticket,
                        percent_encoding::NON_ALPHANUMERIC
                    )
                );
                Header::Ticket {
                    cookie,
                    csrf: csrf.to_string(),
                }
            }
        };
        Ok(Api {
            http,
            base: conn.base,
            auth,
            task_timeout: conn.task_timeout,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn host(&self) -> String {
        self.base.host_str().unwrap_or("the server").to_string()
    }

    /// A request with authentication headers set.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let write = method != reqwest::Method::GET;
        let rb = self.http.request(method, self.url(path));
        match &self.auth {
            Header::Token(h) => rb.header("Authorization", h),
            Header::Ticket { cookie, csrf } => {
                let rb = rb.header("Cookie", cookie);
                if write {
                    rb.header("CSRFPreventionToken", csrf)
                } else {
                    rb
                }
            }
        }
    }

    pub async fn get(&self, path: &str, query: &[(&str, &str)]) -> anyhow::Result<Value> {
        let what = format!("GET {path}");
        let resp = self
            .request(reqwest::Method::GET, path)
            .query(query)
            .send()
            .await;
        envelope(self.sent(resp)?, &what).await
    }

    pub async fn post(&self, path: &str, form: &[(&str, String)]) -> anyhow::Result<Value> {
        self.write(reqwest::Method::POST, path, form).await
    }

    pub async fn put(&self, path: &str, form: &[(&str, String)]) -> anyhow::Result<Value> {
        self.write(reqwest::Method::PUT, path, form).await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<Value> {
        let what = format!("DELETE {path}");
        let resp = self.request(reqwest::Method::DELETE, path).send().await;
        envelope(self.sent(resp)?, &what).await
    }

    async fn write(
        &self,
        method: reqwest::Method,
        path: &str,
        form: &[(&str, String)],
    ) -> anyhow::Result<Value> {
        let what = format!("{method} {path}");
        tracing::debug!(
            "{what} {:?}",
            form.iter().map(|(k, _)| k).collect::<Vec<_>>()
        );
        let resp = self.request(method, path).form(form).send().await;
        envelope(self.sent(resp)?, &what).await
    }

    pub fn sent(
        &self,
        resp: Result<reqwest::Response, reqwest::Error>,
    ) -> anyhow::Result<reqwest::Response> {
        resp.map_err(|e| {
            let tls = tls::explain(&e);
            let err = anyhow::Error::new(e).context(format!("connecting to {}", self.base));
            match tls {
                Some(why) => err.context(why),
                None => err,
            }
        })
    }

    /// Waits for a task to stop, polling its status until the deadline. A failed task's error
    /// carries the last lines of its log.
    pub async fn wait_task(&self, node: &str, upid: &str, what: &str) -> anyhow::Result<()> {
        let started = Instant::now();
        let enc = percent_encoding::utf8_percent_encode(upid, percent_encoding::NON_ALPHANUMERIC);
        let path = format!("/nodes/{node}/tasks/{enc}/status");
        let mut delay = Duration::from_millis(200);
        loop {
            let status = self
                .get(&path, &[])
                .await
                .with_context(|| format!("{what}: polling task"))?;
            if status["status"] == "stopped" {
                let exit = status["exitstatus"]
                    .as_str()
                    .unwrap_or("unknown")
                    .to_string();
                if exit == "OK" || exit.starts_with("WARNINGS") {
                    tracing::debug!("{what}: task {upid} {exit} in {:.1?}", started.elapsed());
                    return Ok(());
                }
                let log = self.task_log_tail(node, upid, 10).await.unwrap_or_default();
                bail!(
                    "{what} failed: {exit}\n  task {upid}, last log lines:\n    {}",
                    log.join("\n    ")
                );
            }
            if started.elapsed() > self.task_timeout {
                bail!(
                    "{what}: task {upid} still running after {}s (raise --task-timeout, or check \
                     the task in the web UI)",
                    self.task_timeout.as_secs()
                );
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    async fn task_log_tail(&self, node: &str, upid: &str, n: usize) -> anyhow::Result<Vec<String>> {
        let enc = percent_encoding::utf8_percent_encode(upid, percent_encoding::NON_ALPHANUMERIC);
        let log = self
            .get(
                &format!("/nodes/{node}/tasks/{enc}/log"),
                &[("limit", "500")],
            )
            .await?;
        let lines: Vec<String> = log
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["t"].as_str().map(String::from))
            .collect();
        Ok(lines[lines.len().saturating_sub(n)..].to_vec())
    }

    /// Runs a call that answers a UPID, then waits for that task.
    pub async fn run_task(
        &self,
        node: &str,
        call: impl std::future::Future<Output = anyhow::Result<Value>>,
        what: &str,
    ) -> anyhow::Result<()> {
        let upid = call.await.with_context(|| what.to_string())?;
        match upid.as_str() {
            Some(upid) => self.wait_task(node, upid, what).await,
            // Some calls finish synchronously and answer null.
            None => Ok(()),
        }
    }
}

/// Unwraps `{"data": ...}` or maps the error answer.
pub async fn envelope(resp: reqwest::Response, what: &str) -> anyhow::Result<Value> {
    let status = resp.status();
    let reason = status.canonical_reason().unwrap_or("").to_string();
    let text = resp
        .text()
        .await
        .with_context(|| format!("{what}: reading the answer"))?;
    if status.is_success() {
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{what}: the answer is not JSON: {:.200}", text))?;
        return Ok(v["data"].clone());
    }
    let json: Option<Value> = serde_json::from_str(&text).ok();
    let message = json
        .as_ref()
        .and_then(|j| j["message"].as_str())
        .map(|m| m.trim().to_string())
        .unwrap_or_else(|| text.trim().to_string());
    let what = what.to_string();
    let err = match status.as_u16() {
        401 => ApiError::Unauthorized {
            what,
            reason: if message.is_empty() { reason } else { message },
        },
        403 => ApiError::Forbidden { what, message },
        400 => {
            let errors = json
                .as_ref()
                .and_then(|j| j["errors"].as_object())
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                        .collect()
                })
                .unwrap_or_else(|| vec![("request".into(), message.clone())]);
            ApiError::BadParams { what, errors }
        }
        501 => ApiError::NotImplemented { what, message },
        s => ApiError::Other {
            what,
            status: s,
            message,
        },
    };
    Err(err.into())
}

/// Whether an error is the connection failing (worth retrying an upload), not an answer.
pub fn is_transport(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<reqwest::Error>()
            .is_some_and(|r| r.is_request() || r.is_body() || r.is_connect())
            || e.downcast_ref::<std::io::Error>().is_some()
    })
}
