//! `meshreg`: the daemon binary. Parses flags and the config (exit 64 on a
//! bad one; `--check` also validates the sources' objects, exit 65), builds
//! the [`App`], wires SIGTERM/SIGINT to its shutdown and SIGHUP to its
//! reloads, and runs it.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use meshreg::{App, Config, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Exit code for a configuration error (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// Exit code of `--check` when a source's objects are invalid (EX_DATAERR).
const EXIT_DATA: u8 = 65;

/// Multi-registry service discovery with a delta/SotW xDS server.
#[derive(Debug, Parser)]
#[command(version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("MESHREG_COMMIT"), ")"), about)]
struct Args {
    /// Config file (YAML). Without it, the embedded bookinfo example runs.
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Override `xds.listen` (e.g. 127.0.0.1:0 for any free port).
    #[arg(long)]
    xds_listen: Option<SocketAddr>,
    /// Override `http.listen`.
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// Log filter (tracing `EnvFilter` syntax); RUST_LOG also works. The
    /// default silences the `kube` client's and watchers' own logs of every
    /// reconnection attempt and refused list: the Kubernetes source logs an
    /// outage once.
    #[arg(
        long,
        default_value = "info,kube_client::client::builder=off,kube_runtime::watcher=off"
    )]
    log: String,
    /// Validate the config and every source's objects (like `istioctl
    /// validate`), then exit: 0 valid, 64 bad config, 65 invalid objects.
    #[arg(long)]
    check: bool,
    /// Log format: `text` (one line per event, for people and journald)
    /// or `json` (one JSON object per line, for log pipelines).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Inspect a running daemon, as istioctl inspects istiod: proxy-status,
    /// proxy-config, registry, sources, rejected. Exit codes: 0 done, 66
    /// unknown proxy, 69 daemon unreachable, 70 unexpected answer, 77
    /// refused.
    Ctl(meshreg::ctl::CtlArgs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Ctl(ctl)) = &args.command {
        let mut ctl = ctl.clone();
        if ctl.addr.is_none()
            && let Some(path) = &args.config
        {
            // The daemon's own config says where it listens.
            match Config::load(Some(path)) {
                Ok(c) => {
                    let mut addr = c.http.listen;
                    if addr.ip().is_unspecified() {
                        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                    }
                    ctl.addr = Some(addr.to_string());
                }
                Err(e) => {
                    let _ = writeln!(std::io::stderr(), "meshreg ctl: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
        }
        let ctl = &ctl;
        let mut out = std::io::stdout().lock();
        return match meshreg::ctl::run(ctl, &mut out) {
            Ok(()) | Err(meshreg::ctl::CtlError::OutputClosed) => ExitCode::SUCCESS,
            Err(e) => {
                // Never panics, even with stderr closed.
                let _ = writeln!(std::io::stderr(), "meshreg ctl: {e}");
                ExitCode::from(e.exit_code())
            }
        };
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&args.log))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => logs.json().flatten_event(true).init(),
        // Colours for a person at a terminal, plain text for journald and files.
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }

    let mut config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(error) => {
            tracing::error!(%error, "invalid configuration");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(a) = args.xds_listen {
        config.xds.listen = a;
    }
    if let Some(a) = args.http_listen {
        config.http.listen = a;
    }
    if args.check {
        let checked = meshreg::check_sources(&config);
        for w in &checked.warnings {
            println!("warning: {w}");
        }
        let problems = checked.problems;
        for p in &problems {
            println!("{p}");
        }
        if problems.is_empty() {
            println!("configuration ok; every source's objects are valid");
            return ExitCode::SUCCESS;
        }
        println!("configuration ok; {} object problems", problems.len());
        return ExitCode::from(EXIT_DATA);
    }
    raise_fd_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(error) => {
            tracing::error!(%error, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config, args.config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft limit on open files to the hard one: the usual soft
/// limit (1,024) is below what thousands of proxies need, and the xDS
/// port's connection limits (`xds.limits`) are meant to be the binding
/// ones. Envoy raises its own limit the same way.
fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return;
    }
    let before = limit.current;
    limit.current = limit.maximum;
    match setrlimit(Resource::Nofile, limit) {
        Ok(()) => tracing::debug!(?before, now = ?limit.maximum, "raised the open files limit"),
        Err(error) => tracing::warn!(%error, ?before, "cannot raise the open files limit"),
    }
}

async fn serve(config: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    // Handlers first: a SIGHUP during startup must not kill the process.
    let mut reloads = signal::Reload::new();
    let app = App::bind(config, path).await?;
    // One machine-readable line for scripts and tests that bind port 0.
    match app.xds_tls_addr() {
        Some(tls) => println!(
            "meshreg listening xds={} http={} xds_tls={tls}",
            app.xds_addr(),
            app.http_addr()
        ),
        None => println!(
            "meshreg listening xds={} http={}",
            app.xds_addr(),
            app.http_addr()
        ),
    }
    let shutdown = CancellationToken::new();
    let (reload_tx, reload_rx) = mpsc::channel(1);
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let stop = signal::shutdown();
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    () = &mut stop => {
                        shutdown.cancel();
                        return;
                    }
                    () = reloads.next() => {
                        // One pending reload is enough: it reads the file.
                        let _ = reload_tx.try_send(());
                    }
                }
            }
        });
    }
    app.run(shutdown, reload_rx).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// The README's flag table names every flag the binary takes, and
    /// every `ctl` command: they cannot drift apart.
    #[test]
    fn the_readme_documents_every_flag_and_ctl_command() {
        let readme = include_str!("../README.md");
        let cmd = super::Args::command();
        for arg in cmd.get_arguments() {
            if let Some(long) = arg.get_long()
                && long != "help"
                && long != "version"
            {
                assert!(
                    readme.contains(&format!("`--{long}")),
                    "README's flag table lacks --{long}"
                );
            }
        }
        let ctl = cmd.find_subcommand("ctl").expect("ctl");
        for sub in ctl.get_subcommands() {
            assert!(
                readme.contains(&format!("meshreg ctl {}", sub.get_name()))
                    || readme.contains(&format!("`{}", sub.get_name())),
                "README's Operating section lacks ctl {}",
                sub.get_name()
            );
        }
        cmd.debug_assert();
    }
}
