//! TLS to PostgreSQL: a private cluster with a certificate from a test CA; Steward connects in
//! every sslmode, and every session of a running leader is encrypted.

mod support;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::*;

struct TlsCluster {
    server: steward_devdb::Server,
    port: u16,
    dir: tempfile::TempDir,
    ca: PathBuf,
    other_ca: PathBuf,
}

/// A CA and a server certificate valid for the name `localhost` only (not 127.0.0.1).
fn write_certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let ca = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), Issuer::new(params, key))
    };
    let (ca_pem, issuer) = ca("steward test CA");
    let (other_pem, _) = ca("some other CA");
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let write = |name: &str, contents: &str| {
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    };
    (
        write("ca.pem", &ca_pem),
        write("other-ca.pem", &other_pem),
        write("server.crt", &server_cert.pem()),
        write("server.key", &server_key.serialize_pem()),
    )
}

async fn tls_cluster() -> TlsCluster {
    let server = steward_devdb::start_cluster()
        .await
        .expect("a private cluster");
    let port = server.port().expect("a throwaway cluster has a port");
    let dir = tempfile::tempdir().unwrap();
    let (ca, other_ca, cert, key) = write_certificates(dir.path());
    // The server (run as `postgres` when we are root) must read the files; the key must be
    // private to its owner.
    let run = |args: &[&str]| {
        assert!(std::process::Command::new(args[0])
            .args(&args[1..])
            .status()
            .unwrap()
            .success())
    };
    run(&["chmod", "755", dir.path().to_str().unwrap()]);
    run(&["chmod", "600", key.to_str().unwrap()]);
    if std::process::Command::new("id")
        .arg("-u")
        .output()
        .unwrap()
        .stdout
        == b"0\n"
    {
        run(&[
            "chown",
            "postgres",
            cert.to_str().unwrap(),
            key.to_str().unwrap(),
        ]);
    }
    let (admin, connection) = tokio_postgres::connect(server.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    for statement in [
        format!("ALTER SYSTEM SET ssl_cert_file = '{}'", cert.display()),
        format!("ALTER SYSTEM SET ssl_key_file = '{}'", key.display()),
        "ALTER SYSTEM SET ssl = on".to_owned(),
        "SELECT pg_reload_conf()".to_owned(),
        "CREATE DATABASE queue".to_owned(),
    ] {
        admin.batch_execute(&statement).await.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let on: String = admin.query_one("SHOW ssl", &[]).await.unwrap().get(0);
        if on == "on" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "ssl never turned on");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    TlsCluster {
        server,
        port,
        dir,
        ca,
        other_ca,
    }
}

impl TlsCluster {
    /// A URL for the `queue` database; `host` is what the certificate is checked against.
    fn url(&self, host: &str, params: &str) -> String {
        format!(
            "postgres://postgres@{host}:{}/queue?hostaddr=127.0.0.1&{params}",
            self.port
        )
    }
}

#[test]
fn verify_full_works_and_every_session_of_a_leader_is_encrypted() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cluster = runtime.block_on(tls_cluster());
    let url = cluster.url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", cluster.ca.display()),
    );
    let (code, stdout, stderr) = steward(&url, &["migrate"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");

    let leader = Steward::spawn(&url, &[]);
    leader.wait_for("first branch pass of the term", Duration::from_secs(30));
    let (code, stdout, stderr) = steward(&url, &["status"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("leader: "), "{stdout}");

    let (encrypted, total): (i64, i64) = runtime.block_on(async {
        let (client, connection) =
            tokio_postgres::connect(cluster.server.url(), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(connection);
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE s.ssl), count(*)
                 FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                 WHERE a.application_name LIKE 'steward:%'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    });
    assert!(
        total >= 4,
        "the leader session, at least two loops and the health writer: {total}"
    );
    assert_eq!(encrypted, total, "every Steward session uses TLS");
    drop(leader);
    drop(cluster.dir);
}

#[test]
fn certificate_checks_follow_sslmode() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cluster = runtime.block_on(tls_cluster());
    let ca = cluster.ca.display().to_string();
    let other = cluster.other_ca.display().to_string();
    let migrate = |url: String| steward(&url, &["migrate"]);

    // The certificate names localhost, not 127.0.0.1: verify-full refuses, verify-ca accepts.
    let (code, _, stderr) = migrate(cluster.url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
    let (code, _, stderr) =
        migrate(cluster.url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}")));
    assert_eq!(code, Some(0), "{stderr}");
    // A CA that did not sign the server's certificate.
    let (code, _, stderr) = migrate(cluster.url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={other}"),
    ));
    assert_eq!(code, Some(1), "{stderr}");
    // require encrypts without checking (libpq's meaning).
    let (code, _, stderr) = migrate(cluster.url("127.0.0.1", "sslmode=require"));
    assert_eq!(code, Some(0), "{stderr}");
    // A missing CA file is named.
    let (code, _, stderr) = migrate(cluster.url(
        "localhost",
        "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
    ));
    assert_eq!(code, Some(1));
    assert!(stderr.contains("/nonexistent/ca.pem"), "{stderr}");
    drop(cluster.dir);
}
