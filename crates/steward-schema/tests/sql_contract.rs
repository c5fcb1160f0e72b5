//! docs/sql-contract.md's statements, run as written, in order, from a plain `psql` session whose
//! search_path does not name the schema: the contract for producers and workers in other
//! languages stays true.

use steward_testkit::TestDb;

fn sql_blocks(markdown: &str) -> Vec<&str> {
    markdown
        .split("```sql\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("```").map(|(block, _)| block))
        .collect()
}

#[tokio::test]
async fn every_statement_of_the_sql_contract_runs_from_psql() {
    let doc = include_str!("../../../docs/sql-contract.md");
    let blocks = sql_blocks(doc);
    assert!(blocks.len() >= 6, "the page's SQL blocks: {}", blocks.len());
    let script = format!("SET search_path = public;\n{}", blocks.join("\n"));
    let db = TestDb::new().await;
    let psql = steward_devdb::pg_binary("psql").expect("psql is installed with PostgreSQL");
    // As a script on stdin: `-c` takes no backslash commands (the page's `\gset`).
    let mut child = std::process::Command::new(psql)
        .args([
            "--no-psqlrc",
            "-v",
            "ON_ERROR_STOP=1",
            "-qtAX",
            "-f",
            "-",
            "-d",
        ])
        .arg(db.url())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("psql runs");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client = db.client().await;
    let states: Vec<(String, String, serde_json::Value)> = client
        .query(
            "SELECT kind, state::text, errors FROM jobs ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(states[0].0, "email.send");
    assert_eq!(states[0].1, "completed", "{states:?}");
    assert_eq!(states[1].0, "email.digest");
    assert_eq!(states[1].1, "retryable", "{states:?}");
    assert_eq!(states[1].2[0]["error"], "SMTP server refused");
}
