//! The complete worker shown in the README (kept compiling by `cargo build --examples`).

use steward_connection::Target;
use steward_worker::{Done, Worker};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let target = Target::new(&std::env::var("DATABASE_URL")?, Default::default())?;
    let worker = Worker::builder(target)
        .queue("default", 20) // at most 20 jobs of this queue at once
        .handler("email.send", |job, _ctx| async move {
            let to = job.args["to"].as_str().ok_or("no recipient")?;
            println!("sending to {to}"); // Err(..) retries with backoff; a panic fails the attempt
            Ok(Done::Complete)
        })
        .start()
        .await?; // refuses a heartbeat interval over a third of the leader's staleness
    tokio::signal::ctrl_c().await?;
    worker.shutdown().await; // runs still going after the grace period are handed back
    Ok(())
}
