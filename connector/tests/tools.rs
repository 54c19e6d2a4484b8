//! Tools that cannot surprise: `connector check` checks the mappings against the database when it can
//! and says what it could not check; `migrate`, `triggers sync` and `run` refuse the `postgres`
//! maintenance database unless told; errors name host, port and their cause once; the connector's
//! PostgreSQL sessions carry `application_name`; the tests' own database helper cleans up on panic.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::PathBuf;
use std::process::Output;

use serde_json::{Value, json};
use support::{Server, TestDb, config_json};

fn write_config(name: &str, config: &Value) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("relay-tools-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

fn connector(config: &PathBuf, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_connector"));
    cmd.arg("--config").arg(config).args(args);
    cmd.env_remove("DATABASE_URL")
        .env_remove("RELAY_ALLOW_POSTGRES_DB");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn mapping(table: &str, channel: &str, columns: Option<Vec<&str>>) -> Value {
    let mut m = json!({"table": table, "operations": ["INSERT"], "channel": channel});
    if let Some(c) = columns {
        m["columns"] = json!(c);
    }
    m
}

#[tokio::test]
async fn check_checks_the_mappings_against_the_database_and_says_what_it_could_not() {
    let db = TestDb::new().await;
    sqlx::query("CREATE TABLE rooms (id int, room text)")
        .execute(&db.pool)
        .await
        .unwrap();
    let with = |mappings: Vec<Value>| json!({"database": {"url": db.url}, "mappings": mappings});

    let good = write_config("good", &with(vec![mapping("rooms", "room:{room}", None)]));
    let out = connector(&good, &["check"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("channel-template columns of all 1 mappings exist"),
        "{}",
        text(&out)
    );

    // Every problem, not only the first: a missing table, a template column, a listed column.
    let bad = write_config(
        "bad",
        &with(vec![
            mapping("no_such_table", "a", None),
            mapping("rooms", "x:{nope}", Some(vec!["id", "zz"])),
        ]),
    );
    let out = connector(&bad, &["check"], &[]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("mapping 0 (public.no_such_table): table does not exist"),
        "{t}"
    );
    assert!(
        t.contains(r#"column "nope" (channel template) does not exist"#),
        "{t}"
    );
    assert!(t.contains(r#"column "zz" (columns) does not exist"#), "{t}");

    // A duplicated mapping is refused by the file's checks (and so by `run`).
    let dup = write_config(
        "dup",
        &with(vec![
            mapping("rooms", "r", None),
            mapping("rooms", "r", None),
        ]),
    );
    let out = connector(&dup, &["check"], &[]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("mappings[1]: duplicates mappings[0]"),
        "{}",
        text(&out)
    );

    // No database reachable: the file is valid, and the output names the checks that did not run,
    // with host, port and the cause.
    let out = connector(
        &good,
        &["check"],
        &[("DATABASE_URL", "postgres://postgres@127.0.0.1:1/relay")],
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("NOT CHECKED against the database"), "{t}");
    assert!(
        t.contains("127.0.0.1:1/relay") && t.contains("refused"),
        "{t}"
    );
    // `check` wrote nothing.
    let relay_schema: Option<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname = 'relay'")
            .fetch_optional(&db.pool)
            .await
            .unwrap();
    assert_eq!(relay_schema, None);
    db.drop_db().await;
}

#[test]
fn the_postgres_database_is_refused_unless_allowed_and_errors_name_host_port_and_cause_once() {
    // Port 1: nothing listens there, so a refusal that comes before any connection is visible as
    // such (nothing could have been written).
    let cfg = write_config(
        "maintenance",
        &json!({"database": {"url": "postgres://postgres@127.0.0.1:1/postgres", "connect_timeout_secs": 2}}),
    );
    for args in [&["migrate"][..], &["triggers", "sync"], &["run"]] {
        let out = connector(&cfg, args, &[]);
        let t = text(&out);
        assert!(!out.status.success(), "{args:?}: {t}");
        assert!(t.contains("refusing to write the relay's schema into the \"postgres\" maintenance database at 127.0.0.1:1/postgres"), "{args:?}: {t}");
        assert!(
            !t.contains("Connection refused"),
            "refused before connecting: {t}"
        );
    }
    // Allowed (flag or environment): it goes on, and the failure names host, port and cause once.
    for (args, env) in [
        (&["migrate", "--allow-postgres-db"][..], &[][..]),
        (&["migrate"], &[("RELAY_ALLOW_POSTGRES_DB", "1")][..]),
    ] {
        let out = connector(&cfg, args, env);
        let t = text(&out);
        assert!(!out.status.success());
        assert!(
            t.contains("cannot connect to PostgreSQL at 127.0.0.1:1/postgres"),
            "{t}"
        );
        assert_eq!(t.matches("Connection refused").count(), 1, "{t}");
    }
    // A database that does not exist: said once.
    let cfg = write_config(
        "missing",
        &json!({"database": {"url": "postgres://postgres@127.0.0.1:5432/relay_tools_no_such_db"}}),
    );
    let out = connector(&cfg, &["migrate"], &[]);
    let t = text(&out);
    assert!(!out.status.success());
    assert!(t.contains("127.0.0.1:5432/relay_tools_no_such_db"), "{t}");
    assert_eq!(t.matches("does not exist").count(), 1, "{t}");
}

#[tokio::test]
async fn the_connectors_sessions_carry_application_name() {
    let db = TestDb::new().await;
    let server = Server::start(&config_json(&db.url, json!({}))).await;
    let names: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()
           AND pid <> pg_backend_pid()",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let ours = names
        .iter()
        .filter(|n| n.as_deref() == Some("pg-relay connector"))
        .count();
    // The pools' connections and both LISTEN connections (change stream, presence).
    assert!(ours >= 3, "{names:?}");
    // Every other session is the test's own pool (no application_name).
    assert!(
        names
            .iter()
            .all(|n| n.as_deref() == Some("pg-relay connector") || n.as_deref() == Some("")),
        "{names:?}"
    );
    server.stop().await;
    db.drop_db().await;
}

/// The test database helper cleans up after a test that never reaches `drop_db` (a failed assert
/// panics past it): dropping the value drops the database.
#[tokio::test]
async fn a_test_database_is_dropped_even_without_drop_db() {
    let db = TestDb::new().await;
    let name = db.name.clone();
    let admin = sqlx::PgPool::connect(&support::admin_url()).await.unwrap();
    let count = |admin: sqlx::PgPool, name: String| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM pg_database WHERE datname = $1")
            .bind(name)
            .fetch_one(&admin)
            .await
            .unwrap()
    };
    assert_eq!(count(admin.clone(), name.clone()).await, 1);
    drop(db);
    assert_eq!(count(admin.clone(), name).await, 0);
    admin.close().await;
}
