#!/usr/bin/env python3
"""Where the CPU goes while writers commit through trigger capture: CPU seconds per process group.

A companion to `scripts/bench` (which reports throughput ratios): for one writer load it tells which
processes spent the machine's CPU. It creates a database of its own (bench_cpu_<random>, dropped at
the end), applies the migrations with the connector binary, starts that connector (trigger mode, one
mapping: `chat_data` INSERTs to `room:{username}`), lets pgbench's 8 clients commit `--rows`-row
INSERT statements (100 rooms, `synchronous_commit = off` unless `--sync`) and, over the middle of the
run, adds up each process's user + system CPU time (/proc/PID/stat) by group:

  writers' backends       the PostgreSQL backends serving pgbench (the INSERTs and their triggers)
  connector's backends    the backends serving the connector, by the query each was running
                          (the sequencer's relay.sequence_batch(), the reader's history read, LISTEN)
  connector process       the connector itself (Rust: reading, fan-out, HTTP)
  pgbench, walwriter, ... the rest

It also prints the database's function statistics (`track_functions = 'pl'` is set on its own
database only): calls and total time of the capture trigger and of relay.sequence_batch().

Usage: bench/cpu_by_process.py [--connector target/release/connector] [--rows 10] [--secs 16] [--sync]
                               [--rate TX_PER_S]
Needs psql, pgbench and PostgreSQL at DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres)
as a role that may create databases. Linux only (/proc). Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK


def processes() -> dict[int, str]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                out[int(entry)] = Path(f"/proc/{entry}/cmdline").read_text().replace("\0", " ").strip()
            except OSError:
                pass
    return out


def psql(url: str, sql: str) -> str:
    return subprocess.run(["psql", "-X", "-At", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-c", sql, url],
                          check=True, capture_output=True, text=True).stdout


def local_ports(pid: int) -> set[int]:
    """The local ports of the TCP connections process `pid` holds."""
    out = subprocess.run(["ss", "-tnpH"], capture_output=True, text=True).stdout
    ports = set()
    for line in out.splitlines():
        if f"pid={pid}," in line:
            ports.add(int(line.split()[3].rsplit(":", 1)[1]))
    return ports


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connector", default="target/release/connector")
    ap.add_argument("--rows", type=int, default=10, help="rows per INSERT statement (one per transaction)")
    ap.add_argument("--secs", type=int, default=16, help="pgbench's run; CPU is summed over all but 2 s at each end")
    ap.add_argument("--sync", action="store_true", help="synchronous_commit = on for the writers")
    ap.add_argument("--rate", type=int, default=0, help="transactions per second in all (pgbench -R); 0: as fast as they can")
    args = ap.parse_args()
    if not 1 <= args.rows <= 1000 or not 8 <= args.secs <= 600:
        ap.error("--rows 1..1000, --secs 8..600")
    admin = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    name = f"bench_cpu_{secrets.token_hex(4)}"
    parts = urlsplit(admin)
    url = urlunsplit(parts._replace(path="/" + name))
    psql(admin, f'CREATE DATABASE "{name}"')
    connector = None
    try:
        psql(admin, f"ALTER DATABASE \"{name}\" SET track_functions = 'pl'")
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "config.json"
            config.write_text(json.dumps({
                "capture": {"mode": "trigger"},
                "listen": "127.0.0.1:0",
                "database": {"url": url, "pool_size": 4},
                "stream": {"poll_interval_ms": 250, "batch_size": 1000},
                "client": {"allow_anonymous": True},
                "mappings": [{"table": "chat_data", "operations": ["INSERT"], "channel": "room:{username}"}],
            }))
            log = open(Path(tmp) / "connector.log", "w")
            connector = subprocess.Popen([args.connector, "--config", str(config)], stdout=log,
                                         stderr=subprocess.STDOUT, env=dict(os.environ, RUST_LOG="warn"))
            for _ in range(100):
                if psql(url, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'relay_%'").strip() not in ("", "0"):
                    break
                time.sleep(0.1)
            else:
                print("the connector did not install its capture trigger", file=sys.stderr)
                return 1
            time.sleep(1)
            script = Path(tmp) / "insert.sql"
            script.write_text(
                "\\set room random(1, 100)\n"
                "INSERT INTO chat_data (msg_id, username, msg_data, client_id, created_at_timestamp) "
                "SELECT :client_id || '-' || random() || '-' || g, :room, "
                "'hello world, a chat message of a typical length for a benchmark', 'bench-client', "
                f"1700000000000 FROM generate_series(1, {args.rows}) g;\n")
            psql(url, "SELECT pg_stat_reset()")
            env = dict(os.environ, PGOPTIONS=f"-c synchronous_commit={'on' if args.sync else 'off'}")
            host, port = parts.hostname or "127.0.0.1", str(parts.port or 5432)
            bench = subprocess.Popen(["pgbench", "-h", host, "-p", port, "-U", parts.username or "postgres",
                                      "-n", "-c", "8", "-j", "2", "-T", str(args.secs), "-f", str(script),
                                      *(["-R", str(args.rate)] if args.rate > 0 else []), name],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            time.sleep(2)
            ours = local_ports(connector.pid)
            backends = {}
            for line in psql(url, "SELECT pid, coalesce(client_port, -1), regexp_replace(query, '\\s+', ' ', 'g') "
                                  "FROM pg_stat_activity WHERE datname = current_database()").splitlines():
                pid, port_, query = (line.split("\t") + ["", ""])[:3]
                backends[int(pid)] = (int(port_), query)
            procs = processes()
            before = {p: cpu_seconds(p) for p in procs}
            t0 = time.monotonic()
            time.sleep(args.secs - 4)
            after = {p: cpu_seconds(p) for p in procs}
            window = time.monotonic() - t0
            out = bench.communicate()[0]
            groups: dict[str, float] = {}
            for p, cmd in procs.items():
                spent = after[p] - before[p]
                if spent <= 0:
                    continue
                if p == connector.pid:
                    group = "connector process"
                elif p in backends and backends[p][0] in ours:
                    query = backends[p][1]
                    kind = ("sequencer" if "sequence_batch" in query else "reader" if "FROM relay.publications" in query
                            else "LISTEN" if query.startswith("LISTEN") else "other")
                    group = f"connector's backends: {kind}"
                elif p in backends:
                    group = "writers' backends"
                elif cmd.startswith(("pgbench", "/usr/lib/postgresql")) and "pgbench" in cmd:
                    group = "pgbench"
                elif cmd.startswith("postgres:"):
                    group = "postgres: " + re.sub(r"^postgres: (\S+: )?", "", cmd).split()[0]
                else:
                    group = "other processes"
                groups[group] = groups.get(group, 0.0) + spent
            tps = re.search(r"tps = ([0-9.]+)", out)
            print(f"{args.rows}-row INSERT statements, 8 pgbench clients, synchronous_commit "
                  f"{'on' if args.sync else 'off'}: {float(tps.group(1)) if tps else 0:.0f} transactions/s")
            print(f"CPU seconds over {window:.1f} s (the machine has {os.cpu_count()} CPUs: "
                  f"{window * (os.cpu_count() or 1):.1f} s):")
            for group, spent in sorted(groups.items(), key=lambda kv: -kv[1]):
                if spent >= 0.05:
                    print(f"  {spent:7.2f} s  {100 * spent / (window * (os.cpu_count() or 1)):5.1f} %  {group}")
            print("function statistics over the whole run (calls, total ms, ms per call):")
            for line in psql(url, "SELECT funcname, calls, round(total_time::numeric), round((total_time / calls)::numeric, 3) "
                                  "FROM pg_stat_user_functions WHERE calls > 0 ORDER BY total_time DESC").splitlines():
                print("  " + "  ".join(line.split("\t")))
        return 0
    finally:
        if connector is not None:
            connector.terminate()
            try:
                connector.wait(timeout=10)
            except subprocess.TimeoutExpired:
                connector.kill()
        subprocess.run(["psql", "-X", "-q", "-c", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', admin],
                       capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
