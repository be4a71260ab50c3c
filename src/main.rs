//! `meshreg`: the daemon binary. Parses flags and the config (exit 64 on a
//! bad one; `--check` also validates the sources' objects, exit 65), builds
//! the [`App`], wires SIGTERM/SIGINT to its shutdown and SIGHUP to its
//! reloads, and runs it.

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
#[command(version, about)]
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
    /// default silences the `kube` client's own log of every reconnection
    /// attempt: the Kubernetes source logs an outage once.
    #[arg(long, default_value = "info,kube_client::client::builder=off")]
    log: String,
    /// Validate the config and every source's objects (like `istioctl
    /// validate`), then exit: 0 valid, 64 bad config, 65 invalid objects.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&args.log))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours for a person at a terminal, plain text for journald and files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

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
        let problems = meshreg::check_sources(&config);
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

async fn serve(config: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    // Handlers first: a SIGHUP during startup must not kill the process.
    let mut reloads = signal::Reload::new();
    let app = App::bind(config, path).await?;
    // One machine-readable line for scripts and tests that bind port 0.
    println!(
        "meshreg listening xds={} http={}",
        app.xds_addr(),
        app.http_addr()
    );
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
