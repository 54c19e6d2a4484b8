"""relaytest: the one harness every black-box suite of the repository starts its system with.

The SDK suite (tests-sdk/run.py), upstream's own suite (tests-sdk/upstream/run.py), the fault suite
(tests-faults/) and the browser tests (tests-browser/run.py, which runs the Playwright scripts) import
this package and keep only their scenarios. It owns what they used to write four times over:

- a throwaway database per run or case (created, migrated, dropped also on failure; replication slots
  dropped first where wal capture left some),
- the writer and the connector processes: free ports, environment, log files, /healthz and /readyz,
  SIGTERM with a deadline, SIGKILL as a crash would, process groups,
- throwaway PostgreSQL clusters (initdb / pg_ctl; wal_level = logical where asked),
- the check counter and the `N passed, N failed` closing line that scripts/test adds up,
- the child-scenario protocol (a scenario prints PASS/FAIL lines and `RESULT passed=N failed=N`).

It uses the standard library only, so a suite that has no virtualenv (the browser tests) runs it with
the system's python3.

# Layout
- `process.py`  ports, HTTP probes (blocking and asyncio), log tails, `Service` (one child process)
- `db.py`       psql, database URLs, `Database` (a throwaway database on a server)
- `system.py`   `System`: a database, configuration files, `connector migrate`, writer and connectors
- `cluster.py`  `Cluster`: a throwaway PostgreSQL server of its own
- `results.py`  `Results` (checks and figures, the closing line) and `run_scenario` (a child scenario)
- `tokens.py`   HS256 connection and subscription tokens (standard library only)
"""

from __future__ import annotations

from .cluster import Cluster
from .db import DEFAULT_DATABASE_URL, Database, admin_url, psql, with_database
from .process import (
    ROOT,
    Service,
    free_port,
    http_get,
    http_status,
    install_sigterm,
    kill_group,
    prune_runs,
    require_psql,
    tail,
)
from .results import Results, read_reasons, run_scenario
from .system import System
from .tokens import hs256

__all__ = [
    "Cluster",
    "DEFAULT_DATABASE_URL",
    "Database",
    "ROOT",
    "Results",
    "Service",
    "System",
    "admin_url",
    "free_port",
    "hs256",
    "http_get",
    "http_status",
    "install_sigterm",
    "kill_group",
    "prune_runs",
    "psql",
    "read_reasons",
    "require_psql",
    "run_scenario",
    "tail",
    "with_database",
]
