//! Configuration drift between candidates: the leader compares every candidate's version, loop
//! mode and configuration digest (from the `candidates` table) with its own, so that an operator
//! sees a standby that would lead differently before a failover makes it lead.

use crate::instance::Registration;
use crate::observe::{CandidateSeen, Observer};
use std::collections::HashSet;
use tokio_postgres::Client;

/// Candidates seen recently (standbys refresh their row while they wait). A small table, scanned.
pub const RECENT_CANDIDATES: &str = "
SELECT instance, version, loop_mode, config_digest FROM candidates
WHERE last_seen > now() - interval '2 minutes'";

/// Reads the candidates, reports them to the observer, and warns once per term about each one
/// that differs from this leader (`warned` holds the instances already named).
pub(crate) async fn check(
    client: &Client,
    own: &Registration,
    warned: &mut HashSet<String>,
    observer: &dyn Observer,
) -> Result<(), tokio_postgres::Error> {
    let seen: Vec<CandidateSeen> = client
        .query(RECENT_CANDIDATES, &[])
        .await?
        .iter()
        .map(|row| CandidateSeen {
            instance: row.get(0),
            version: row.get(1),
            loop_mode: row.get(2),
            config_digest: row.get(3),
        })
        .collect();
    for other in &seen {
        let differs = other.version != own.version
            || other.loop_mode != own.loop_mode
            || other.config_digest != own.config_digest;
        if differs && warned.insert(other.instance.clone()) {
            tracing::warn!(
                candidate = %other.instance,
                version = %other.version,
                loop_mode = %other.loop_mode,
                config_digest = %other.config_digest,
                leader_version = %own.version,
                leader_loop_mode = own.loop_mode,
                leader_config_digest = %own.config_digest,
                "a candidate runs another version or configuration: if it takes over, maintenance changes"
            );
        }
    }
    observer.candidates(&seen);
    Ok(())
}
