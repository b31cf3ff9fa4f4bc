//! `anatomy-node serve`: wires the stages together and runs them until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::anatomy::model::{self, Model};
use crate::anatomy::worker::{self, Classifier};
use crate::audit::{AuditEvent, AuditLog, EventType, Outcome};
use crate::config::Config;
use crate::dimse::find::FindScp;
use crate::dimse::listener::{Limits, Listener};
use crate::dimse::ServiceContext;
use crate::index::{Index, IndexWriter};
use crate::metrics::Metrics;
use crate::net::ServerTls;
use crate::store::Store;
use crate::{series, web};

/// Connect to the configured index database and bring its schema up to date.
pub async fn open_index(config: &Config) -> anyhow::Result<Index> {
    std::fs::create_dir_all(&config.storage.path)
        .with_context(|| format!("creating storage.path {}", config.storage.path.display()))?;
    let url = config.database_url();
    let index = Index::connect(&url, config.database.max_connections, config.storage.fsync)
        .await
        .with_context(|| format!("connecting to the index database ({})", redact(&url)))?;
    index
        .migrate()
        .await
        .context("migrating the index database")?;
    Ok(index)
}

/// The index as the forward workers commit delivery outcomes to it: a copy's outcome is
/// committed before the next copy goes out, so that commit must be cheap. Unless
/// `forward.sync_outcomes`, it gets its own connections whose commits wait for the
/// operating system but not for the disk (SQLite `synchronous = NORMAL`, PostgreSQL
/// `synchronous_commit = off`): a crash of the node loses none of them, a power loss may.
pub async fn open_outcomes(config: &Config, index: &Index) -> anyhow::Result<Index> {
    let relaxed = config.storage.fsync && !config.forward.sync_outcomes;
    if !relaxed || config.destinations.is_empty() {
        return Ok(index.clone());
    }
    let url = config.database_url();
    let connections = (config.destinations.len() as u32).saturating_add(1);
    Index::connect(&url, connections, false)
        .await
        .with_context(|| {
            format!(
                "connecting to the index database for forwarding outcomes ({})",
                redact(&url)
            )
        })
}

pub async fn serve(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    // Credentials and certificates first: a bad token list, JWKS or certificate stops the
    // node before it opens any port.
    let http_security = if config.http.enabled {
        Some(http_security(&config.http)?)
    } else {
        None
    };
    let dicom_tls = dicom_security(&config)?;
    let https_cert = http_security.as_ref().and_then(|(_, tls)| tls.clone());
    let metrics = Arc::new(Metrics::new());
    let index = open_index(&config).await?;
    let (mut audit, audit_writer) =
        AuditLog::spawn(index.clone(), metrics.clone(), config.audit.retention_days);
    let syslog = crate::audit::syslog::SyslogSender::start(
        &config.audit.syslog,
        &config.dicom.ae_title,
        metrics.clone(),
    )?;
    let syslog_task = syslog.map(|(sender, task)| {
        audit = audit.clone().with_syslog(sender);
        task
    });
    let writer = IndexWriter::spawn(index.clone(), config.database.batch_max);
    let store = Store::open(&config.storage, index.clone(), writer, metrics.clone())
        .with_context(|| format!("opening storage.path {}", config.storage.path.display()))?;
    let ctx = Arc::new(ServiceContext {
        allowed_peers: Arc::new(config.dicom.allowed_peers.0.clone()),
        config: config.clone(),
        store: Arc::new(store),
        metrics: metrics.clone(),
        find: FindScp::new(index.clone(), config.database.max_connections),
        audit: audit.clone(),
    });
    if !config.dicom.allow_any_peer && ctx.allowed_peers.is_empty() {
        warn!("dicom.allowed_peers is empty and dicom.allow_any_peer is false: every association will be rejected");
    }

    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let wake = Arc::new(Notify::new());
    let outcomes = open_outcomes(&config, &index).await?;
    let forwarding = crate::forward::start(
        &config,
        index.clone(),
        outcomes,
        metrics.clone(),
        node_id(),
        audit.clone(),
        shutdown.clone(),
    );
    let (classifier, classifier_status) =
        start_classifier(&config, &index, &metrics, forwarding.labelled.clone()).await;
    // Configuration and model changes show as node starts: which file, which model.
    let config_file = config
        .source
        .as_ref()
        .map_or_else(|| "(defaults)".to_string(), |p| p.display().to_string());
    audit.record(
        AuditEvent::new(EventType::NodeStart, Outcome::Success, "node")
            .object(format!("config {config_file}"))
            .detail(format!(
                "anatomy-node {}, node {}, AE {}, classifier {}",
                env!("CARGO_PKG_VERSION"),
                node_id(),
                config.dicom.ae_title,
                classifier_status
            )),
    );
    let web_store = ctx.store.clone();
    let listeners = bind_dicom(&config, ctx, dicom_tls.clone()).await?;

    let http = match http_security {
        Some(security) => Some(
            start_http(
                &config,
                security,
                &index,
                &metrics,
                classifier_status,
                (web_store, audit.clone()),
                &shutdown,
            )
            .await?,
        ),
        None => None,
    };

    let completion = tokio::spawn(series::run_completion(
        config.series.clone(),
        index.clone(),
        metrics.clone(),
        wake.clone(),
        shutdown.clone(),
    ));
    let classifying =
        classifier.map(|c| tokio::spawn(worker::run(c, wake.clone(), shutdown.clone())));
    let accepting: Vec<_> = listeners
        .into_iter()
        .map(|l| tokio::spawn(l.run(shutdown.clone(), tasks.clone())))
        .collect();

    wait_for_signal(dicom_tls.as_deref(), https_cert.as_deref(), &audit).await?;
    info!("shutdown requested: no new associations; finishing in-flight C-STOREs");
    shutdown.cancel();
    tasks.close();
    for listener in accepting {
        let _ = listener.await;
    }
    let grace = Duration::from_secs(config.dicom.shutdown_grace_secs);
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        warn!(
            open = tasks.len(),
            "associations still open after dicom.shutdown_grace_secs; exiting anyway"
        );
    }
    let _ = completion.await;
    if let Some(classifying) = classifying {
        // A classification in progress finishes (its job would be redone after a restart anyway).
        let _ = classifying.await;
    }
    // A copy on the wire finishes; claimed jobs not yet sent go back to the queue.
    forwarding.join().await;
    if let Some(http) = http {
        let _ = http.await;
    }
    audit.record(
        AuditEvent::new(EventType::NodeStop, Outcome::Success, "node")
            .object(format!("config {config_file}"))
            .detail(format!("node {}", node_id())),
    );
    audit.flush().await;
    drop(audit);
    let _ = tokio::time::timeout(Duration::from_secs(5), audit_writer).await;
    if let Some(task) = syslog_task {
        // What is still queued for the collector gets a moment to leave.
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    index.close().await;
    info!("stopped");
    Ok(())
}

/// What the HTTP port checks credentials with, and its TLS configuration (HTTPS).
type HttpSecurity = (
    web::auth::Authenticator,
    Option<Arc<web::tls::HttpsCertificate>>,
);

fn http_security(http: &crate::config::HttpConfig) -> anyhow::Result<HttpSecurity> {
    let auth = web::auth::Authenticator::from_config(http)?;
    let tls = match (&http.tls_cert, &http.tls_key) {
        (Some(cert), Some(key)) => Some(Arc::new(web::tls::HttpsCertificate::load(cert, key)?)),
        _ => None,
    };
    Ok((auth, tls))
}

/// The HTTP port, plain or HTTPS, until `shutdown`.
async fn start_http(
    config: &Arc<Config>,
    (auth, tls): HttpSecurity,
    index: &Index,
    metrics: &Arc<Metrics>,
    classifier_status: String,
    // STOW-RS stores through the DICOM port's store; requests go to its audit trail.
    (store, audit): (Arc<Store>, AuditLog),
    shutdown: &CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let http = &config.http;
    let addr = SocketAddr::new(http.bind, http.port);
    let tcp = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on http port {addr}"))?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    info!(%addr, scheme, credentials = %auth.describe(), "HTTP port ready (/healthz, /metrics, /dicom-web, /)");
    if tls.is_none() && !http.bind.is_loopback() {
        warn!(%addr, "plain HTTP on a network address: tokens and patient data travel in clear; set http.tls_cert and http.tls_key, or put a TLS proxy in front");
    }
    auth.spawn_key_refresh(shutdown.clone());
    let app = web::router(
        web::WebState::new(
            index.clone(),
            metrics.clone(),
            Arc::new(classifier_status),
            store,
            config.clone(),
            Arc::new(auth),
        )
        .with_audit(audit),
    );
    let stop = shutdown.clone();
    Ok(match tls {
        Some(tls) => {
            let listener = web::tls::TlsListener::new(tcp, tls, shutdown.clone())
                .context("starting the HTTPS listener")?;
            tokio::spawn(async move {
                let served = axum::serve(
                    listener,
                    app.into_make_service_with_connect_info::<web::ClientAddr>(),
                )
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
                if let Err(e) = served {
                    warn!(error = %e, "HTTPS server stopped");
                }
            })
        }
        None => tokio::spawn(async move {
            let served = axum::serve(
                tcp,
                app.into_make_service_with_connect_info::<web::ClientAddr>(),
            )
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
            if let Err(e) = served {
                warn!(error = %e, "HTTP server stopped");
            }
        }),
    })
}

/// Load the model (and ONNX Runtime) when the classifier is enabled. A node that cannot
/// classify still stores, indexes and completes series; their jobs wait in the queue for a
/// node with a working model.
async fn start_classifier(
    config: &Config,
    index: &Index,
    metrics: &Arc<Metrics>,
    labelled: Arc<Notify>,
) -> (Option<Arc<Classifier>>, String) {
    let c = &config.classifier;
    if !c.enabled {
        info!("classifier disabled (classifier.enabled = false): series are stored and completed, not labelled");
        return (None, "disabled".into());
    }
    let (model_path, library, device, threads, max_batch) = (
        c.model.clone(),
        c.onnxruntime_library.clone(),
        c.device,
        c.threads,
        c.max_batch,
    );
    let loaded = tokio::task::spawn_blocking(move || {
        model::init_runtime(library.as_deref())?;
        Model::load(&model_path, device, threads).map(|m| m.with_max_batch(max_batch))
    })
    .await;
    let model = match loaded {
        Ok(Ok(model)) => model,
        Ok(Err(e)) => {
            error!(error = %e, "classifier unavailable: series are stored and completed, and their jobs wait until a valid model is configured");
            return (None, format!("unavailable: {e}"));
        }
        Err(e) => {
            error!(error = %e, "classifier unavailable: loading the model crashed");
            return (None, format!("unavailable: loading the model crashed: {e}"));
        }
    };
    let status = format!(
        "ready (model {}, version {}, {})",
        c.model.display(),
        model.info().model_version,
        model.provider()
    );
    info!(classifier = %status, "classifier ready");
    metrics.classifier_ready.set(1);
    let classifier = Classifier {
        model: Arc::new(model),
        index: index.clone(),
        metrics: metrics.clone(),
        storage_root: config.storage.path.clone(),
        config: c.clone(),
        node_id: node_id(),
        labelled: Some(labelled),
    };
    (Some(Arc::new(classifier)), status)
}

/// This node in the work queue: host name and process id.
fn node_id() -> String {
    let host =
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "node".into());
    format!("{}:{}", host.trim(), std::process::id())
}

/// The DICOM TLS server of `[dicom.tls]`, and a check that every destination's and the
/// archive's TLS files load, so a bad certificate stops the node before it opens a port.
fn dicom_security(config: &Config) -> anyhow::Result<Option<Arc<ServerTls>>> {
    for (i, d) in config.destinations.iter().enumerate() {
        crate::net::ClientTls::build(&d.tls, &d.host)
            .with_context(|| format!("destinations[{i}].tls"))?;
    }
    match config.dicom.tls.server_files() {
        Some(files) => Ok(Some(Arc::new(ServerTls::load(files).context("dicom.tls")?))),
        None => Ok(None),
    }
}

/// The DICOM listeners: the plain port (unless `dicom.tls.plain_port = false`) and the TLS
/// port of `[dicom.tls]` with `tls`, sharing one association limit.
async fn bind_dicom(
    config: &Config,
    ctx: Arc<ServiceContext>,
    tls: Option<Arc<ServerTls>>,
) -> anyhow::Result<Vec<Listener>> {
    let dicom = &config.dicom;
    let limits = Limits::new(dicom.max_associations);
    let mut listeners = Vec::new();
    if let (Some(port), Some(tls)) = (dicom.tls.port, tls) {
        let addr = SocketAddr::new(dicom.bind, port);
        let client_ca = tls.files().client_ca.clone();
        let listener = Listener::bind(addr, ctx.clone(), Some(tls), limits.clone())
            .await
            .with_context(|| format!("listening on dicom.tls.port {addr}"))?;
        info!(%addr, ae_title = %dicom.ae_title, ?client_ca, require_client_cert = dicom.tls.require_client_cert, "DICOM TLS listener ready");
        listeners.push(listener);
    }
    if dicom.tls.plain_port {
        let addr = SocketAddr::new(dicom.bind, dicom.port);
        let listener = Listener::bind(addr, ctx, None, limits)
            .await
            .with_context(|| format!("listening on dicom port {addr}"))?;
        info!(%addr, ae_title = %dicom.ae_title, storage = %config.storage.path.display(), "DICOM listener ready");
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Wait for SIGTERM or SIGINT. SIGHUP meanwhile reloads the DICOM TLS certificate, key and
/// client CA, and the HTTPS certificate and key: new handshakes use them, open associations
/// and connections go on with their session.
async fn wait_for_signal(
    dicom: Option<&ServerTls>,
    https: Option<&web::tls::HttpsCertificate>,
    audit: &AuditLog,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => reload_certificates(dicom, https, audit),
        }
    }
}

fn reload_certificates(
    dicom: Option<&ServerTls>,
    https: Option<&web::tls::HttpsCertificate>,
    audit: &AuditLog,
) {
    if dicom.is_none() && https.is_none() {
        info!("SIGHUP: no dicom.tls or http.tls_cert to reload");
    }
    if let Some(tls) = dicom {
        let object = format!("dicom.tls.cert {}", tls.files().cert.display());
        let done = tls.reload().map_err(|e| e.to_string());
        reloaded(
            "DICOM TLS",
            "certificate, key and client CA",
            object,
            done,
            audit,
        );
    }
    if let Some(tls) = https {
        let object = format!("http.tls_cert {}", tls.cert_path().display());
        let done = tls.reload().map_err(|e| e.to_string());
        reloaded("HTTPS", "certificate and key", object, done, audit);
    }
}

/// Log and audit one reload; `what` names the port ("DICOM TLS", "HTTPS").
fn reloaded(what: &str, files: &str, object: String, done: Result<(), String>, audit: &AuditLog) {
    let (outcome, detail) = match done {
        Ok(()) => {
            info!(file = %object, "SIGHUP: {what} certificate reloaded");
            (Outcome::Success, format!("{what} {files} reloaded"))
        }
        Err(e) => {
            error!(error = %e, "SIGHUP: {what} reload failed; the previous certificate stays in use");
            (Outcome::Failure, format!("{what} reload failed: {e}"))
        }
    };
    audit.record(
        AuditEvent::new(EventType::ConfigReload, outcome, "node")
            .object(object)
            .detail(detail),
    );
}

/// Hide the password of a database URL in messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            super::redact("postgres://node:secret@127.0.0.1/anatomy"),
            "postgres://node:***@127.0.0.1/anatomy"
        );
        assert_eq!(super::redact("sqlite:///x.db"), "sqlite:///x.db");
    }
}
