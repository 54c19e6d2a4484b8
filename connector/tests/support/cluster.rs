//! A throwaway PostgreSQL cluster for tests that need settings the shared server does not have
//! (`wal_level = logical`, small `max_slot_wal_keep_size`): initdb + pg_ctl in a temporary
//! directory, on a free port of 55400-55499, trust auth, stopped (immediate) and removed on drop.
//! Run as the `postgres` user when the test runs as root (initdb refuses root). A missing initdb
//! fails the test: it never skips.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running throwaway cluster.
pub struct Cluster {
    dir: PathBuf,
    bindir: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

fn bindir() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BINDIR") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    if let Some((_, bin)) = found.pop() {
        return bin;
    }
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .expect("no initdb under /usr/lib/postgresql/*/bin and no pg_config: install PostgreSQL");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn run(bindir: &Path, args: &[&str]) {
    let program = bindir.join(args[0]);
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&program);
        c
    } else {
        Command::new(&program)
    };
    let out = cmd
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} failed: {}{}",
        args[0],
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    // Start at a random point of the range so parallel tests rarely race for the same port.
    let start = (std::process::id() as u16).wrapping_add(rand::random::<u16>()) % 100;
    for i in 0..100 {
        let port = 55400 + (start + i) % 100;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 55400-55499");
}

impl Cluster {
    /// Starts a cluster with `wal_level = logical` and the extra `-c` settings given.
    pub fn start(settings: &[&str]) -> Self {
        let bindir = bindir();
        assert!(
            bindir.join("initdb").exists(),
            "initdb not found in {}",
            bindir.display()
        );
        let dir = std::env::temp_dir().join(format!("relay-wal-pg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the cluster directory");
        }
        let data = dir.join("data");
        let data_s = data.to_str().unwrap().to_owned();
        run(
            &bindir,
            &[
                "initdb",
                "-D",
                &data_s,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ],
        );
        for attempt in 0..5 {
            let port = free_port();
            let mut opts = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c wal_level=logical \
                 -c max_wal_senders=20 -c max_replication_slots=20 -c max_connections=200",
                dir.display()
            );
            for s in settings {
                opts.push_str(" -c ");
                opts.push_str(s);
            }
            let log = dir.join("postgres.log");
            let program = bindir.join("pg_ctl");
            let mut cmd = if is_root() {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(&program);
                c
            } else {
                Command::new(&program)
            };
            let ok = cmd
                .args([
                    "-D",
                    &data_s,
                    "-l",
                    log.to_str().unwrap(),
                    "-w",
                    "-t",
                    "60",
                    "-o",
                ])
                .arg(&opts)
                .arg("start")
                .output()
                .unwrap()
                .status
                .success();
            if ok {
                return Self { dir, bindir, port };
            }
            assert!(
                attempt < 4,
                "pg_ctl start failed: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        unreachable!()
    }

    /// The URL of database `db` on this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::env::var_os("RELAY_KEEP_CLUSTER").is_some() {
            eprintln!(
                "kept cluster on port {} in {}",
                self.port,
                self.dir.display()
            );
            return;
        }
        let data = self.dir.join("data");
        let _ = std::panic::catch_unwind(|| {
            run(
                &self.bindir,
                &[
                    "pg_ctl",
                    "-D",
                    data.to_str().unwrap(),
                    "-w",
                    "-t",
                    "30",
                    "-m",
                    "immediate",
                    "stop",
                ],
            );
        });
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
