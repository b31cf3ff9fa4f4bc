use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use anatomy_node::config::{Config, LogFormat};
use anatomy_node::node;

#[derive(Parser)]
#[command(
    name = "anatomy-node",
    version,
    about = "DICOM node that labels the anatomy of CT series"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node: DICOM listener (C-ECHO, C-STORE), HTTP port, series completion.
    Serve {
        /// Configuration file (TOML); without it the embedded defaults apply.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Database administration.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// Label the axial CT images in files or folders on disk (no server): per-image labels
    /// and per-series coverage, as a table or JSON lines.
    Classify(anatomy_node::classify_cli::ClassifyArgs),
    /// Score a model on a dataset folder (error, AUC, confusion, patients, calibration):
    /// summary on stdout, metrics.json and plots in --out.
    Eval(anatomy_node::eval::EvalArgs),
    /// The forwarding outbox: counts per destination and state, dead letters, retries.
    Forward {
        #[command(subcommand)]
        command: anatomy_node::forward::cli::ForwardCommand,
    },
    /// Mine labelled key-images from the archive into a dataset folder (cron job): label
    /// sources from [mine], the archive from [archive]. Exit codes: 0 complete, 1 failed,
    /// 2 usage, 3 some studies failed, 4 stopped early (time window, signal), 75 locked.
    Mine(anatomy_node::mine::MineArgs),
    /// Make an API token for the HTTP port: prints the token (once) and the configuration
    /// lines that hold its SHA-256 hash (README, "Security").
    Token {
        /// A name for the token (shown in the log when it is used), e.g. "pacs-viewer".
        #[arg(long)]
        name: String,
        /// Its roles, comma-separated: read (QIDO-RS, WADO-RS, the page), write (STOW-RS),
        /// metrics (/metrics), admin (all of them).
        #[arg(long, value_delimiter = ',', default_value = "read")]
        roles: Vec<String>,
    },
    /// The audit trail (who did what: associations, received instances, C-FIND, forwards,
    /// HTTP requests, authentication failures, node start and stop), newest first, as a
    /// table or JSON lines.
    Audit(anatomy_node::audit::cli::AuditArgs),
    /// Training data preparation.
    Dataset {
        #[command(subcommand)]
        command: DatasetCommand,
    },
}

#[derive(Subcommand)]
enum DatasetCommand {
    /// Convert labelled DICOM files into a dataset folder (docs/contracts.md).
    Build(anatomy_node::dataset::BuildArgs),
}

#[derive(Subcommand)]
enum DbCommand {
    /// Create or upgrade the index schema (serve also does this at start-up).
    Migrate {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("anatomy-node: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // dicom-ul's async writer needs the multi-threaded runtime.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Dataset {
            command: DatasetCommand::Build(args),
        } => anatomy_node::dataset::run_build(&args.into()),
        Command::Eval(args) => anatomy_node::eval::run_eval(args),
        Command::Mine(args) => {
            drop(runtime);
            let mut config = match Config::load(args.config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("anatomy-node mine: error: {e}");
                    std::process::exit(i32::from(anatomy_node::mine::exit::USAGE));
                }
            };
            // A progress bar on a terminal, structured logs (log.format) otherwise.
            if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                config.log.level = "warn".into();
            }
            init_logging(&config);
            let code = anatomy_node::mine::run(args, config);
            std::process::exit(i32::from(code));
        }
        Command::Token { name, roles } => print_token(&name, &roles),
        Command::Audit(args) => {
            let config = Config::load(args.config.as_deref())?;
            // stdout is the listing; only warnings on stderr.
            let mut quiet = config.clone();
            quiet.log.level = "warn".into();
            init_logging(&quiet);
            runtime.block_on(anatomy_node::audit::cli::run(args))
        }
        Command::Forward { command } => runtime.block_on(anatomy_node::forward::cli::run(command)),
        Command::Classify(args) => {
            let mut config = Config::load(args.config.as_deref())?;
            // The command's own lines go to stdout and stderr; the node's info logs (ONNX
            // Runtime's among them) would drown them. RUST_LOG still wins.
            config.log.level = "warn".into();
            init_logging(&config);
            anatomy_node::classify_cli::run(&config, &args)
        }
        Command::Serve { config } => {
            let config = Config::load(config.as_deref())?;
            init_logging(&config);
            runtime.block_on(node::serve(config))
        }
        Command::Db {
            command: DbCommand::Migrate { config },
        } => {
            let config = Config::load(config.as_deref())?;
            init_logging(&config);
            runtime.block_on(async {
                let index = node::open_index(&config).await?;
                index.close().await;
                println!(
                    "index schema is up to date ({})",
                    node::redact(&config.database_url())
                );
                Ok(())
            })
        }
    }
}

fn print_token(name: &str, roles: &[String]) -> anyhow::Result<()> {
    use anatomy_node::web::auth::{generate_token, token_hash, Role};
    let roles = roles
        .iter()
        .map(|r| {
            Role::parse(r)
                .with_context(|| format!("unknown role {r:?}: use read, write, metrics or admin"))
        })
        .collect::<anyhow::Result<Vec<Role>>>()?;
    if name.is_empty() || name.contains([':', ',', '"', '\\']) {
        anyhow::bail!("--name must be non-empty, without : , \" or \\");
    }
    let token = generate_token()?;
    let hash = token_hash(&token);
    let names: Vec<&str> = roles.iter().map(|r| r.name()).collect();
    let list = names
        .iter()
        .map(|r| format!("\"{r}\""))
        .collect::<Vec<_>>()
        .join(", ");
    println!("# The token: give it to the client (Authorization: Bearer ...). It is shown only");
    println!("# now; the node keeps only its hash.");
    println!("{token}");
    println!();
    println!(
        "# Add to config.toml, after the [http] section (or to http.tokens_file, as [[tokens]]):"
    );
    println!("[[http.tokens]]");
    println!("name = \"{name}\"");
    println!("sha256 = \"{hash}\"");
    println!("roles = [{list}]");
    println!();
    println!("# or in the environment (comma-separated for several tokens):");
    println!(
        "# ANATOMY_HTTP__TOKENS=\"{name}:{hash}:{}\"",
        names.join("+")
    );
    Ok(())
}

/// Structured logs on stderr (stdout stays free for command output). `RUST_LOG` wins
/// over `log.level`. ONNX Runtime's own messages (the `ort` target; over a hundred INFO
/// lines while a session is created) stay at warnings unless the filter names `ort`.
fn init_logging(config: &Config) {
    anatomy_node::phi::set_allowed(config.log.phi);
    init_subscriber(config);
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
}

fn init_subscriber(config: &Config) {
    let names_ort = config.log.level.split(',').any(|d| {
        d.trim() == "ort" || d.trim().starts_with("ort=") || d.trim().starts_with("ort::")
    });
    let level = if names_ort {
        config.log.level.clone()
    } else {
        format!("{},ort=warn", config.log.level)
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&level))
        .unwrap_or_else(|_| EnvFilter::new("info,ort=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
