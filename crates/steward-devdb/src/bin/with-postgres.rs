//! `with-postgres CMD [ARGS...]`: runs CMD with `DATABASE_URL` pointing at a PostgreSQL server,
//! starting a throwaway cluster first when none is configured or answering on 127.0.0.1:5432,
//! and stopping it afterwards. Exits with CMD's exit code.

use anyhow::{bail, Context};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let Some(program) = args.next() else {
        bail!("usage: with-postgres CMD [ARGS...]");
    };
    let server = steward_devdb::ensure_server().await?;
    eprintln!("with-postgres: using {}", server.describe());
    let mut child = tokio::process::Command::new(&program)
        .args(args)
        .env("DATABASE_URL", server.url())
        .spawn()
        .with_context(|| format!("cannot start {program:?}"))?;
    // Ctrl-C reaches the child through the process group; keep waiting so that the cluster is
    // stopped only after the child has gone.
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            _ = tokio::signal::ctrl_c() => continue,
        }
    };
    drop(server);
    std::process::exit(status.code().unwrap_or(1));
}
