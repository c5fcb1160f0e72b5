#!/usr/bin/env python3
"""Checks that the operations assets agree with each other and with the steward binary,
without Docker.

    python3 dashboards/check.py STEWARD_BINARY EXPORTED_METRICS

STEWARD_BINARY     the steward binary, e.g. target/debug/steward (its --help is read)
EXPORTED_METRICS   the metric names Steward exports: a scrape of a running steward
                   (curl -s localhost:9464/metrics > exported.txt), or one name per line
                   (then label matchers cannot be checked, and that check is skipped)

Checked: docker-compose.yml (services, depends_on, mounts, ports, DATABASE_URL against the
postgres service, the image's Dockerfile and .dockerignore); every STEWARD_* variable and
steward flag it uses against `steward --help` / `steward <command> --help`;
dashboards/prometheus.yml targets against compose services and their metrics ports;
the OTLP endpoint and protocol (grpc only) against dashboards/otel-collector.yml; Grafana
provisioning against the dashboard; every metric name (and label matcher, when the scrape has samples) in
dashboards/steward.json and dashboards/alerts.yml against EXPORTED_METRICS; the alert rules'
labels, annotations and unit-test coverage. With promtool on PATH it also runs
`promtool check rules`, `promtool test rules`, `promtool check config` and parses every
dashboard expression; without it those are reported as skipped.

Needs Python 3.8+ and PyYAML. Exits 1 if anything fails, 2 on bad usage.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

try:
    import yaml
except ImportError:  # pragma: no cover
    sys.exit("check.py needs PyYAML: pip install pyyaml (or apt-get install python3-yaml)")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE_DEFAULT = "Dockerfile"
PROMETHEUS = HERE / "prometheus.yml"
ALERTS = HERE / "alerts.yml"
ALERT_TESTS = HERE / "alerts.test.yml"
DASHBOARD = HERE / "steward.json"
COLLECTOR = HERE / "otel-collector.yml"

DEFAULT_METRICS_ADDR = "127.0.0.1:9464"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
REQUIRED_ALERTS = {
    "StewardSloBranchOverrun",
    "StewardSloBranchNoSuccess",
    "StewardNoLeader",
    "StewardLeaderFlapping",
}
SEVERITIES = {"critical", "warning", "info"}
GRAFANA_BUILTIN_VARS = {
    "__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms",
    "__from", "__to", "__all", "__name", "__org", "__user", "__dashboard", "__timeFilter",
    "timeFilter", "__auto", "__series", "__field", "__value", "__data", "__cell",
}
# The variables choosing the OTLP transport; steward accepts only grpc.
OTLP_PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                           "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0
        self.skipped = 0

    def ok(self, name):
        self.passed += 1
        print(f"ok    {name}")

    def fail(self, name, message):
        self.failed += 1
        print(f"FAIL  {name}\n      {message}")

    def skip(self, name, why):
        self.skipped += 1
        print(f"skip  {name}: {why}")

    def check(self, name, problems):
        """problems: list of strings; empty means pass."""
        if problems:
            self.fail(name, "\n      ".join(problems))
        else:
            self.ok(name)


C = Checks()


def rel(path):
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def load_yaml(path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


# --------------------------------------------------------------------------- PromQL

PROMQL_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "atan2", "inf", "nan", "start", "end",
}


def strip_strings(expr):
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)


def metric_names(expr):
    """Metric names selected by a PromQL expression (function and keyword names excluded)."""
    e = re.sub(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]", " 0 ", expr)  # Grafana variables
    e = strip_strings(e)
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges and subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", e)
    e = re.sub(r"(?<![\w:.])\d+(\.\d+)?([eE][+-]?\d+)?", " ", e)  # numbers
    names = []
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = m.group(0)
        after = e[m.end():].lstrip()
        if after.startswith("("):
            continue  # a function or an aggregation
        if word.lower() in PROMQL_KEYWORDS:
            continue
        names.append(word)
    return names


def selectors(expr):
    """(metric name, [label names]) for every `name{...}` selector."""
    e = re.sub(r"\$\{[^}]*\}|\$\w+", "x", expr)
    e = strip_strings(e)
    found = []
    for m in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}", e):
        labels = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2))
        found.append((m.group(1), labels))
    return found


def grafana_vars(text):
    """Names of the Grafana variables ($name, ${name}, ${name:fmt}, [[name]]) used in text."""
    return {next(g for g in groups if g)
            for groups in re.findall(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", text)}


def substitute_grafana(expr):
    e = expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
    e = e.replace("$__range", "1h")
    return re.sub(r"\$\{\w+(?::\w+)?\}|\$\w+", ".*", e)


# --------------------------------------------------------------------------- exported metrics

class Exported:
    def __init__(self, path):
        self.names = set()
        self.histograms = set()
        self.typed = False
        self.labels = {}  # sample name -> set of label names
        for raw in Path(path).read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if not line:
                continue
            if line.startswith("#"):
                m = re.match(r"#\s*TYPE\s+(\S+)\s+(\S+)", line)
                if m:
                    self.typed = True
                    self.names.add(m.group(1))
                    if m.group(2) in ("histogram", "summary", "gaugehistogram"):
                        self.histograms.add(m.group(1))
                continue
            m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{(.*)\})?", line)
            if not m:
                continue
            name = m.group(1)
            self.names.add(name)
            # A sample (`name{labels} value`, or `name value` without labels) tells its labels;
            # a bare name (a file of names) tells nothing.
            if m.group(3) is not None or line[m.end():].strip():
                labels = set(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"', m.group(3) or ""))
                self.labels.setdefault(name, set()).update(labels)
            if name.endswith("_bucket"):
                self.histograms.add(name[: -len("_bucket")])

    def knows(self, name):
        if name in self.names:
            return True
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix):
                base = name[: -len(suffix)]
                if base in self.histograms or (not self.typed and base in self.names):
                    return True
        return False

    def sample_labels(self, name):
        """Label names seen on samples of `name`, or None when the file has none."""
        if name in self.labels:
            return self.labels[name]
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] in self.histograms:
                base = name[: -len(suffix)]
                for candidate in (name, base + "_bucket", base + "_count"):
                    if candidate in self.labels:
                        return self.labels[candidate] - {"le"} | ({"le"} if suffix == "_bucket" else set())
        return None


# --------------------------------------------------------------------------- compose helpers

def parse_port(spec):
    """(host_ip, host_port or None, container_port) from a compose port entry."""
    if isinstance(spec, dict):
        return (spec.get("host_ip", ""), str(spec["published"]) if spec.get("published") else None,
                str(spec["target"]))
    parts = str(spec).split("/")[0].split(":")
    if len(parts) == 1:
        return ("", None, parts[0])
    if len(parts) == 2:
        return ("", parts[0], parts[1])
    return (":".join(parts[:-2]), parts[-2], parts[-1])


def env_of(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        out = {}
        for item in env:
            key, _, value = str(item).partition("=")
            out[key] = value
        return out
    return {k: ("" if v is None else str(v)) for k, v in env.items()}


def command_of(service, dockerfile_cmd):
    cmd = service.get("command")
    if cmd is None:
        return list(dockerfile_cmd)
    if isinstance(cmd, str):
        return cmd.split()
    return [str(c) for c in cmd]


def mounts_of(service):
    """[(host Path or None for a named volume, container target, read_only)]"""
    out = []
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            source, target, kind = v.get("source"), v.get("target"), v.get("type")
            host = (COMPOSE.parent / source) if kind == "bind" else None
            out.append((host, target, bool(v.get("read_only"))))
            continue
        parts = str(v).split(":")
        if len(parts) == 1:
            out.append((None, parts[0], False))
            continue
        source, target = parts[0], parts[1]
        bind = source.startswith((".", "/", "~"))
        host = (COMPOSE.parent / os.path.expanduser(source)) if bind else None
        out.append((host, target, len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def host_file(service, container_path):
    """The host file a container path comes from through a bind mount, or None."""
    best = None
    for host, target, _ in mounts_of(service):
        if host is None:
            continue
        t = target.rstrip("/")
        if container_path == t or container_path.startswith(t + "/"):
            if best is None or len(t) > len(best[1]):
                best = (host, t)
    if best is None:
        return None
    host, t = best
    rest = container_path[len(t):].lstrip("/")
    return (host / rest) if rest else host


def host_files_under(service, container_dir, suffixes):
    """Host files visible in a container directory through bind mounts."""
    d = container_dir.rstrip("/")
    files = []
    for host, target, _ in mounts_of(service):
        if host is None:
            continue
        t = target.rstrip("/")
        if t == d or t.startswith(d + "/"):
            if host.is_file():
                files.append(host)
            elif host.is_dir():
                files.extend(p for p in host.rglob("*") if p.suffix in suffixes)
        elif d.startswith(t + "/") and host.is_dir():
            sub = host / d[len(t) + 1:]
            if sub.is_dir():
                files.extend(p for p in sub.rglob("*") if p.suffix in suffixes)
    return [f for f in files if f.suffix in suffixes]


def flag_value(args, flag):
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a[len(flag) + 1:]
    return None


def split_host_port(addr):
    if "://" in addr:
        u = urlparse(addr)
        return u.hostname, str(u.port) if u.port else None
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), port


# --------------------------------------------------------------------------- Dockerfile

def parse_dockerfile(path):
    """Stages: [{'from': image, 'name': alias, 'lines': [instruction lines]}]"""
    text = Path(path).read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", text)
    stages = []
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        m = re.match(r"FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", s, re.I)
        if m:
            stages.append({"from": m.group(1), "name": m.group(2), "lines": []})
        elif stages:
            stages[-1]["lines"].append(s)
    return stages


def instruction(stage, name):
    return [l[len(name):].strip() for l in stage["lines"] if l.upper().startswith(name + " ")]


def exec_form(value):
    try:
        v = json.loads(value)
        if isinstance(v, list):
            return [str(x) for x in v]
    except ValueError:
        pass
    return value.split()


def dockerfile_env(stage):
    env = {}
    for value in instruction(stage, "ENV"):
        pairs = re.findall(r'(\w+)=("[^"]*"|\S+)', value)
        if pairs:
            env.update({k: v.strip('"') for k, v in pairs})
        else:
            k, _, v = value.partition(" ")
            env[k] = v.strip()
    return env


# --------------------------------------------------------------------------- steward CLI

class Cli:
    def __init__(self, binary):
        self.binary = binary
        self._help = {}

    def help(self, *sub):
        if sub not in self._help:
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith("STEWARD_") and k != "DATABASE_URL"}
            r = subprocess.run([self.binary, *sub, "--help"], capture_output=True, text=True,
                               env=env, timeout=60)
            if r.returncode != 0:
                raise RuntimeError(f"`{self.binary} {' '.join(sub)} --help` exited {r.returncode}: {r.stderr.strip()}")
            self._help[sub] = r.stdout
        return self._help[sub]

    def commands(self):
        text = self.help()
        section = text.split("Commands:", 1)[1] if "Commands:" in text else ""
        section = re.split(r"\n\S", section, maxsplit=1)[0]
        return set(re.findall(r"^\s{2}(\S+)", section, re.M))

    def flags(self, sub):
        return set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", self.help(sub)))

    def env_vars(self, sub):
        # `[env: NAME=value]`, or `[env: NAME]` for a variable whose value is hidden (a secret)
        return set(re.findall(r"\[env:\s*([A-Za-z_][A-Za-z0-9_]*)[=\]]", self.help(sub)))


# --------------------------------------------------------------------------- the checks

def main(argv):
    if len(argv) != 3 or argv[1] in ("-h", "--help"):
        print(__doc__)
        return 2
    binary, exported_path = argv[1], argv[2]
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        print(f"check.py: {binary} is not an executable file")
        return 2
    if not os.path.isfile(exported_path):
        print(f"check.py: {exported_path} does not exist")
        return 2
    exported = Exported(exported_path)
    if not exported.names:
        print(f"check.py: no metric names in {exported_path}")
        return 2
    cli = Cli(binary)

    # ---- files parse
    docs = {}
    for path in (COMPOSE, PROMETHEUS, ALERTS, ALERT_TESTS, COLLECTOR):
        try:
            docs[path] = load_yaml(path)
            C.check(f"{rel(path)} parses", [] if isinstance(docs[path], dict) else ["not a YAML mapping"])
        except (OSError, yaml.YAMLError) as e:
            C.fail(f"{rel(path)} parses", str(e))
            docs[path] = None
    try:
        dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
        C.ok(f"{rel(DASHBOARD)} parses")
    except (OSError, ValueError) as e:
        C.fail(f"{rel(DASHBOARD)} parses", str(e))
        dashboard = None

    compose = docs[COMPOSE] or {}
    services = compose.get("services") or {}
    C.check("compose has services", [] if services else ["no services in docker-compose.yml"])

    steward_services, dockerfile_cmd, dockerfile_env_vars = check_image(compose, services)
    check_depends_on(services)
    check_mounts(compose, services)
    check_ports(services)
    check_database_url(services, steward_services)
    check_cli(cli, services, steward_services, dockerfile_cmd, dockerfile_env_vars)
    metrics_ports = steward_metrics_ports(services, steward_services, dockerfile_cmd, dockerfile_env_vars)
    collector_service = check_collector(services, docs[COLLECTOR])
    check_otlp_endpoints(services, steward_services, docs[COLLECTOR], collector_service)
    prom_service = check_prometheus(services, docs[PROMETHEUS], metrics_ports, docs[COLLECTOR],
                                    collector_service)
    check_grafana(services, dashboard, prom_service)
    expressions = []
    if dashboard is not None:
        expressions += check_dashboard(dashboard, docs[PROMETHEUS])
    if docs[ALERTS] is not None:
        expressions += check_alerts(docs[ALERTS], docs[ALERT_TESTS], docs[PROMETHEUS])
    check_metric_names(expressions, exported)
    run_promtool(expressions, docs[PROMETHEUS])

    summary = f"{C.passed} passed, {C.failed} failed"
    if C.skipped:
        summary += f", {C.skipped} skipped"
    print(summary)
    return 1 if C.failed else 0


def check_image(compose, services):
    """Services running the image built from the repository's Dockerfile."""
    built = {}
    for name, svc in services.items():
        build = svc.get("build")
        if build is None:
            continue
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = DOCKERFILE_DEFAULT if isinstance(build, str) else build.get("dockerfile", DOCKERFILE_DEFAULT)
        built[name] = (COMPOSE.parent / context).resolve() / dockerfile
    images = {services[n].get("image") for n in built if services[n].get("image")}
    steward = set(built) | {n for n, s in services.items() if s.get("image") in images}

    problems = []
    dockerfiles = set(built.values())
    if not built:
        problems.append("no service builds the steward image (build: .)")
    if len(dockerfiles) > 1:
        problems.append(f"services build from different Dockerfiles: {sorted(map(rel, dockerfiles))}")
    for n, path in built.items():
        if not path.is_file():
            problems.append(f"service {n}: {rel(path)} does not exist")
    C.check("compose: the steward image is built from the repository's Dockerfile", problems)
    for required in ("migrate", "steward-a", "steward-b"):
        C.check(f"compose: {required} runs the steward image",
                [] if required in steward else [f"service {required} missing or not on the steward image"])

    cmd, env = [], {}
    path = next(iter(dockerfiles), None)
    if path is None or not path.is_file():
        return steward, cmd, env
    stages = parse_dockerfile(path)
    problems = []
    if len(stages) < 2:
        problems.append("expected a multi-stage build (builder, runtime)")
    else:
        builder, runtime = stages[0], stages[-1]
        if not builder["from"].startswith("rust:"):
            problems.append(f"builder stage is {builder['from']}, expected rust:1-bookworm")
        runs = " ".join(instruction(builder, "RUN"))
        if not re.search(r"cargo build\b[^&;]*--release[^&;]*-p steward\b", runs):
            problems.append("builder stage does not run `cargo build --release -p steward`")
        if not runtime["from"].startswith("debian:"):
            problems.append(f"runtime stage is {runtime['from']}, expected debian:bookworm-slim")
        if "ca-certificates" not in " ".join(instruction(runtime, "RUN")):
            problems.append("runtime stage does not install ca-certificates")
        copies = " ".join(instruction(runtime, "COPY"))
        if f"--from={builder['name'] or 0}" not in copies or "steward" not in copies:
            problems.append("runtime stage does not copy the steward binary from the builder")
        entry = instruction(runtime, "ENTRYPOINT")
        entry = exec_form(entry[-1]) if entry else []
        if not entry or os.path.basename(entry[0]) != "steward":
            problems.append(f"ENTRYPOINT is {entry}, expected [\"steward\"]")
        cmds = instruction(runtime, "CMD")
        cmd = exec_form(cmds[-1]) if cmds else []
        env = dockerfile_env(runtime)
    C.check(f"{rel(path)}: multi-stage build, ENTRYPOINT steward", problems)

    ignore = ROOT / ".dockerignore"
    problems = []
    if not ignore.is_file():
        problems.append(".dockerignore does not exist")
    else:
        patterns = {l.strip().rstrip("/").lstrip("/") for l in ignore.read_text().splitlines()
                    if l.strip() and not l.startswith("#")}
        for needed in ("target", ".git"):
            if needed not in patterns:
                problems.append(f".dockerignore does not exclude {needed}")
        for needed in ("Cargo.toml", "Cargo.lock", "crates"):
            if needed in patterns:
                problems.append(f".dockerignore excludes {needed}, which the build needs")
    C.check(".dockerignore excludes target/ and .git", problems)
    return steward, cmd, env


def check_depends_on(services):
    problems = []
    for name, svc in services.items():
        deps = svc.get("depends_on") or []
        items = deps.items() if isinstance(deps, dict) else [(d, {}) for d in deps]
        for dep, spec in items:
            if dep not in services:
                problems.append(f"{name} depends on {dep}, which is not a service")
                continue
            condition = (spec or {}).get("condition", "service_started")
            target = services[dep]
            if condition == "service_healthy" and not target.get("healthcheck"):
                problems.append(f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck")
            if condition == "service_completed_successfully" and \
                    str(target.get("restart", "no")) not in ("no", "on-failure"):
                problems.append(f"{name} waits for {dep} to complete, but {dep} restarts ({target.get('restart')})")
            if condition not in ("service_started", "service_healthy", "service_completed_successfully"):
                problems.append(f"{name}: unknown depends_on condition {condition}")
    C.check("compose: every depends_on names a service, with a condition it can meet", problems)
    for svc_name, dep, condition in (("migrate", "postgres", "service_healthy"),
                                     ("steward-a", "migrate", "service_completed_successfully"),
                                     ("steward-b", "migrate", "service_completed_successfully")):
        deps = (services.get(svc_name) or {}).get("depends_on") or {}
        got = (deps.get(dep) or {}).get("condition") if isinstance(deps, dict) else None
        C.check(f"compose: {svc_name} waits for {dep} ({condition})",
                [] if got == condition else [f"{svc_name}.depends_on.{dep}.condition is {got}"])


def check_mounts(compose, services):
    problems = []
    declared = set((compose.get("volumes") or {}).keys())
    for name, svc in services.items():
        for v in svc.get("volumes") or []:
            spec = v if isinstance(v, str) else f"{v.get('source')}:{v.get('target')}"
            parts = spec.split(":")
            source = parts[0]
            if len(parts) == 1:
                continue  # anonymous volume
            if source.startswith((".", "/", "~")):
                host = COMPOSE.parent / os.path.expanduser(source)
                if not host.exists():
                    problems.append(f"{name} mounts {source}, which does not exist")
            elif source not in declared:
                problems.append(f"{name} uses volume {source}, not declared under volumes:")
    C.check("compose: every mounted file exists", problems)


def check_ports(services):
    problems, seen = [], {}
    for name, svc in services.items():
        for spec in svc.get("ports") or []:
            try:
                ip, host, container = parse_port(spec)
            except (KeyError, ValueError) as e:
                problems.append(f"{name}: cannot read port {spec!r}: {e}")
                continue
            if host is None:
                continue
            key = (ip or "0.0.0.0", host)
            if key in seen:
                problems.append(f"host port {host} published by both {seen[key]} and {name}")
            seen[key] = name
    C.check("compose: no host port is published twice", problems)
    expected = {"grafana": ("3000", "3000"), "prometheus": ("9090", "9090"),
                "steward-a": ("9464", "9464"), "steward-b": ("9465", "9464")}
    for name, (host, container) in expected.items():
        ports = [parse_port(p) for p in (services.get(name) or {}).get("ports") or []]
        C.check(f"compose: {name} is on host port {host}",
                [] if any(h == host and c == container for _, h, c in ports)
                else [f"{name} publishes {[(h, c) for _, h, c in ports]}, expected {host}->{container}"])


def check_database_url(services, steward_services):
    problems = []
    for name in sorted(steward_services):
        url = env_of(services[name]).get("DATABASE_URL")
        if not url:
            problems.append(f"{name} has no DATABASE_URL")
            continue
        u = urlparse(url)
        db = services.get(u.hostname)
        if db is None:
            problems.append(f"{name}: DATABASE_URL host {u.hostname} is not a service")
            continue
        denv = env_of(db)
        if (u.port or 5432) != 5432:
            problems.append(f"{name}: DATABASE_URL port {u.port}, postgres listens on 5432")
        user = denv.get("POSTGRES_USER", "postgres")
        if (u.username or "") != user:
            problems.append(f"{name}: DATABASE_URL user {u.username}, POSTGRES_USER is {user}")
        dbname = denv.get("POSTGRES_DB", user)
        if u.path.lstrip("/") != dbname:
            problems.append(f"{name}: DATABASE_URL database {u.path.lstrip('/')}, POSTGRES_DB is {dbname}")
        if denv.get("POSTGRES_HOST_AUTH_METHOD") != "trust" and (u.password or "") != denv.get("POSTGRES_PASSWORD"):
            problems.append(f"{name}: DATABASE_URL password does not match POSTGRES_PASSWORD")
    C.check("compose: DATABASE_URL points at the postgres service with its user, password, database",
            problems)


def check_cli(cli, services, steward_services, dockerfile_cmd, dockerfile_env_vars):
    try:
        commands = cli.commands()
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
        C.fail("steward --help runs", str(e))
        return
    C.check("steward --help lists commands", [] if commands else ["no Commands: section"])
    runs = []
    for name in sorted(steward_services):
        svc = services[name]
        runs.append((f"service {name}", command_of(svc, dockerfile_cmd), env_of(svc)))
    if dockerfile_cmd:
        runs.append(("Dockerfile CMD/ENV", dockerfile_cmd, dockerfile_env_vars))
    for who, args, env in runs:
        problems = []
        if not args:
            C.fail(f"{who}: steward command", "no command (and no CMD in the Dockerfile)")
            continue
        sub = args[0]
        if sub not in commands:
            C.fail(f"{who}: `steward {sub}` exists", f"`{sub}` is not in `steward --help` ({sorted(commands)})")
            continue
        try:
            flags, env_names = cli.flags(sub), cli.env_vars(sub)
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
            C.fail(f"{who}: steward {sub} --help runs", str(e))
            continue
        for arg in args[1:]:
            if arg.startswith("--"):
                flag = arg.split("=", 1)[0]
                if flag not in flags:
                    problems.append(f"flag {flag} is not in `steward {sub} --help`")
        for key in sorted(env):
            if key.startswith("STEWARD_") and "__" in key:
                continue  # a config-file key (STEWARD_<SECTION>__<KEY>), read by the config loader
            if key.startswith("STEWARD_") or key == "DATABASE_URL":
                if key not in env_names:
                    problems.append(f"{key} is not in `steward {sub} --help` (no `[env: {key}=`)")
        C.check(f"{who}: `steward {' '.join(args)}` flags and STEWARD_* variables are in --help",
                problems)


def metrics_addr(svc, dockerfile_cmd, dockerfile_env_vars):
    args = command_of(svc, dockerfile_cmd)
    return (flag_value(args, "--metrics-addr") or env_of(svc).get("STEWARD_METRICS_ADDR")
            or dockerfile_env_vars.get("STEWARD_METRICS_ADDR") or DEFAULT_METRICS_ADDR)


def steward_metrics_ports(services, steward_services, dockerfile_cmd, dockerfile_env_vars):
    """service -> metrics port, for services running `steward run`."""
    ports, problems = {}, []
    for name in sorted(steward_services):
        svc = services[name]
        args = command_of(svc, dockerfile_cmd)
        if not args or args[0] != "run":
            continue
        addr = metrics_addr(svc, dockerfile_cmd, dockerfile_env_vars)
        host, port = split_host_port(addr)
        ports[name] = port
        if host not in ("0.0.0.0", "::", ""):
            problems.append(f"{name} serves metrics on {addr}: not reachable from other containers (use 0.0.0.0)")
        published = [parse_port(p) for p in svc.get("ports") or []]
        for _, _, container in published:
            if container != port:
                problems.append(f"{name} publishes container port {container}, but serves metrics on {port}")
    C.check("compose: steward run instances serve metrics on 0.0.0.0 and publish that port", problems)
    return ports


def collector_ports(collector):
    """(grpc port, http port, prometheus exporter port, problems)"""
    problems = []
    receivers = (collector or {}).get("receivers") or {}
    otlp = next((v for k, v in receivers.items() if k.split("/")[0] == "otlp"), None) or {}
    protocols = otlp.get("protocols") or {}
    ports = {}
    for proto, default in (("grpc", "4317"), ("http", "4318")):
        if proto not in protocols:
            problems.append(f"the otlp receiver has no {proto} protocol")
            continue
        endpoint = (protocols[proto] or {}).get("endpoint")
        if not endpoint:
            problems.append(f"otlp {proto} has no endpoint: recent collectors then listen on localhost only")
            ports[proto] = default
            continue
        host, port = split_host_port(endpoint)
        if host not in ("0.0.0.0", "::", ""):
            problems.append(f"otlp {proto} listens on {endpoint}: not reachable from other containers")
        ports[proto] = port
    exporters = (collector or {}).get("exporters") or {}
    prom = next((v for k, v in exporters.items() if k.split("/")[0] == "prometheus"), None)
    prom_port = None
    if prom is None:
        problems.append("no prometheus exporter")
    else:
        host, prom_port = split_host_port((prom or {}).get("endpoint", ""))
        if host not in ("0.0.0.0", "::", ""):
            problems.append(f"prometheus exporter listens on {prom.get('endpoint')}: not reachable from Prometheus")
    if not any(k.split("/")[0] == "debug" for k in exporters):
        problems.append("no debug exporter")
    pipelines = ((collector or {}).get("service") or {}).get("pipelines") or {}
    used_receivers = {r for p in pipelines.values() for r in (p or {}).get("receivers", [])}
    used_exporters = {e for p in pipelines.values() for e in (p or {}).get("exporters", [])}
    for r in receivers:
        if r not in used_receivers:
            problems.append(f"receiver {r} is in no pipeline")
    for e in exporters:
        if e not in used_exporters:
            problems.append(f"exporter {e} is in no pipeline")
    for pname, p in pipelines.items():
        for kind, declared in (("receivers", receivers), ("exporters", exporters),
                               ("processors", (collector or {}).get("processors") or {})):
            for item in (p or {}).get(kind, []):
                if item not in declared:
                    problems.append(f"pipeline {pname} uses {kind[:-1]} {item}, which is not declared")
    return ports.get("grpc"), ports.get("http"), prom_port, problems


def check_collector(services, collector):
    name = next((n for n, s in services.items()
                 if "opentelemetry-collector" in str(s.get("image", ""))), None)
    problems = []
    if name is None:
        C.fail("compose: an OpenTelemetry collector service exists", "no service runs an opentelemetry-collector image")
        return None
    svc = services[name]
    args = command_of(svc, [])
    config = flag_value(args, "--config") or "/etc/otelcol-contrib/config.yaml"
    host = host_file(svc, config)
    if host is None or host.resolve() != COLLECTOR.resolve():
        problems.append(f"{name} reads {config}, which is not mounted from {rel(COLLECTOR)}")
    C.check(f"compose: {name} runs with {rel(COLLECTOR)}", problems)
    *_, problems = collector_ports(collector)
    C.check(f"{rel(COLLECTOR)}: OTLP grpc+http on 0.0.0.0, debug and prometheus exporters in pipelines",
            problems)
    return name


def check_otlp_endpoints(services, steward_services, collector, collector_service):
    grpc, _, _, _ = collector_ports(collector)
    problems = []
    for name in sorted(steward_services):
        env = env_of(services[name])
        # Steward exports over gRPC only and refuses to start with any other protocol.
        for variable in OTLP_PROTOCOL_VARIABLES:
            protocol = env.get(variable, "").strip()
            if protocol and protocol != "grpc":
                problems.append(f"{name}: {variable}={protocol}: steward exports OTLP over grpc only "
                                f"(and exits at start otherwise); use grpc and the collector's grpc port {grpc}")
        endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if not endpoint:
            continue
        u = urlparse(endpoint)
        if u.hostname != collector_service:
            problems.append(f"{name}: OTEL_EXPORTER_OTLP_ENDPOINT host {u.hostname} is not the collector service {collector_service}")
        if str(u.port) != str(grpc):
            problems.append(f"{name}: OTLP endpoint port {u.port}, the collector's grpc receiver is on {grpc}")
    if not any(env_of(services[n]).get("OTEL_EXPORTER_OTLP_ENDPOINT") for n in steward_services):
        problems.append("no steward service sets OTEL_EXPORTER_OTLP_ENDPOINT")
    C.check("compose: OTLP over grpc (the only protocol steward speaks) to the collector's grpc port",
            problems)


def check_prometheus(services, prom, metrics_ports, collector, collector_service):
    name = next((n for n, s in services.items() if "prom/prometheus" in str(s.get("image", ""))), None)
    if name is None:
        C.fail("compose: a Prometheus service exists", "no service runs prom/prometheus")
        return None
    svc = services[name]
    args = command_of(svc, [])
    config = flag_value(args, "--config.file") or "/etc/prometheus/prometheus.yml"
    host = host_file(svc, config)
    C.check(f"compose: {name} reads {rel(PROMETHEUS)}",
            [] if host is not None and host.resolve() == PROMETHEUS.resolve()
            else [f"{config} is not mounted from {rel(PROMETHEUS)}"])
    if prom is None:
        return name
    problems = []
    rule_files = prom.get("rule_files") or []
    for rf in rule_files:
        path = rf if rf.startswith("/") else str(Path(config).parent / rf)
        h = host_file(svc, path)
        if h is None or not h.exists():
            problems.append(f"rule file {rf} is not mounted into {name}")
    if not any((host_file(svc, rf if rf.startswith("/") else str(Path(config).parent / rf)) or Path("/nonexistent")).resolve()
               == ALERTS.resolve() for rf in rule_files):
        problems.append(f"{rel(ALERTS)} is not among the rule files")
    C.check(f"{rel(PROMETHEUS)}: rule_files are {rel(ALERTS)}, mounted", problems)

    problems = []
    _, _, exporter_port, _ = collector_ports(collector)
    scraped = set()
    for job in prom.get("scrape_configs") or []:
        for sc in job.get("static_configs") or []:
            for target in sc.get("targets") or []:
                host, port = split_host_port(target)
                if host in ("localhost", "127.0.0.1"):
                    continue
                if host not in services:
                    problems.append(f"job {job.get('job_name')}: target {target}: {host} is not a compose service")
                    continue
                scraped.add(host)
                if host in metrics_ports and port != metrics_ports[host]:
                    problems.append(f"target {target}: {host} serves metrics on port {metrics_ports[host]}")
                if host == collector_service and port != exporter_port:
                    problems.append(f"target {target}: the collector's prometheus exporter is on {exporter_port}")
    for s in sorted(metrics_ports):
        if s not in scraped:
            problems.append(f"steward service {s} is not scraped")
    if collector_service and collector_service not in scraped:
        problems.append(f"the collector {collector_service} is not scraped")
    C.check(f"{rel(PROMETHEUS)}: targets are compose services on their metrics ports", problems)
    return name


def prometheus_port(services, name):
    args = command_of(services.get(name) or {}, [])
    addr = flag_value(args, "--web.listen-address") or ":9090"
    return split_host_port(addr)[1]


def check_grafana(services, dashboard, prom_service):
    name = next((n for n, s in services.items() if "grafana/grafana" in str(s.get("image", ""))), None)
    if name is None:
        C.fail("compose: a Grafana service exists", "no service runs grafana/grafana")
        return
    svc = services[name]
    prov = env_of(svc).get("GF_PATHS_PROVISIONING", "/etc/grafana/provisioning")
    ds_files = host_files_under(svc, prov + "/datasources", {".yml", ".yaml"})
    problems, uids = [], set()
    if not ds_files:
        problems.append(f"no datasource provisioning file mounted into {prov}/datasources")
    for f in ds_files:
        for ds in (load_yaml(f) or {}).get("datasources") or []:
            if ds.get("type") != "prometheus":
                continue
            uids.add(ds.get("uid"))
            host, port = split_host_port(ds.get("url", ""))
            if host != prom_service:
                problems.append(f"{rel(f)}: url {ds.get('url')} is not the Prometheus service {prom_service}")
            elif port != prometheus_port(services, prom_service):
                problems.append(f"{rel(f)}: url port {port}, Prometheus listens on {prometheus_port(services, prom_service)}")
    if not uids:
        problems.append("no prometheus datasource provisioned")
    C.check("grafana: a Prometheus datasource is provisioned at the prometheus service", problems)

    problems = []
    provider_files = host_files_under(svc, prov + "/dashboards", {".yml", ".yaml"})
    if not provider_files:
        problems.append(f"no dashboard provider mounted into {prov}/dashboards")
    found = False
    for f in provider_files:
        for p in (load_yaml(f) or {}).get("providers") or []:
            path = ((p or {}).get("options") or {}).get("path")
            if not path:
                problems.append(f"{rel(f)}: provider {p.get('name')} has no options.path")
                continue
            for j in host_files_under(svc, path, {".json"}):
                if j.resolve() == DASHBOARD.resolve():
                    found = True
    if not found:
        problems.append(f"{rel(DASHBOARD)} is not mounted into any dashboard provider's path")
    home = env_of(svc).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        h = host_file(svc, home)
        if h is None or h.resolve() != DASHBOARD.resolve():
            problems.append(f"GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH={home} is not {rel(DASHBOARD)}")
    C.check(f"grafana: the dashboard provider loads {rel(DASHBOARD)}", problems)

    if dashboard is None:
        return
    problems = []
    variables = {v.get("name"): v for v in (dashboard.get("templating") or {}).get("list") or []}
    for ref in iter_datasources(dashboard):
        uid = ref.get("uid") if isinstance(ref, dict) else ref
        if uid in ("-- Grafana --", "grafana") or (isinstance(ref, dict) and ref.get("type") == "grafana"):
            continue
        m = re.fullmatch(r"\$\{?(\w+)\}?", str(uid))
        if m:
            var = variables.get(m.group(1))
            if var is None or var.get("type") != "datasource" or var.get("query") != "prometheus":
                problems.append(f"datasource {uid}: no datasource variable {m.group(1)} of type prometheus")
            else:
                current = (var.get("current") or {}).get("value")
                if current and current not in uids:
                    problems.append(f"variable {m.group(1)} defaults to {current}, provisioned uids are {sorted(uids)}")
        elif uid not in uids:
            problems.append(f"datasource uid {uid} is not provisioned ({sorted(uids)})")
    C.check("grafana: every datasource in the dashboard resolves to the provisioned Prometheus",
            list(dict.fromkeys(problems)))


def iter_datasources(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "datasource" and v is not None:
                yield v
            else:
                yield from iter_datasources(v)
    elif isinstance(node, list):
        for item in node:
            yield from iter_datasources(item)


def all_panels(dashboard):
    for p in dashboard.get("panels") or []:
        yield p
        for sub in p.get("panels") or []:
            yield sub


def check_dashboard(dashboard, prom):
    """Checks the dashboard's structure; returns [(where, expr)] for the metric checks."""
    problems = []
    sv = dashboard.get("schemaVersion")
    if not isinstance(sv, int) or sv < 36:
        problems.append(f"schemaVersion {sv}, expected 36 or later (39)")
    if not dashboard.get("uid"):
        problems.append("no uid (links to the dashboard would change on every import)")
    C.check("dashboard: schemaVersion and uid", problems)

    panels = list(all_panels(dashboard))
    problems, ids, boxes = [], {}, []
    for p in panels:
        pid = p.get("id")
        if pid in ids:
            problems.append(f"panel id {pid} used by {ids[pid]!r} and {p.get('title')!r}")
        ids[pid] = p.get("title")
        gp = p.get("gridPos") or {}
        if not all(k in gp for k in ("x", "y", "w", "h")):
            problems.append(f"panel {p.get('title')!r} has no complete gridPos")
            continue
        if gp["x"] < 0 or gp["x"] + gp["w"] > 24:
            problems.append(f"panel {p.get('title')!r} is outside the 24-column grid")
        for other, ob in boxes:
            if gp["x"] < ob["x"] + ob["w"] and ob["x"] < gp["x"] + gp["w"] and \
                    gp["y"] < ob["y"] + ob["h"] and ob["y"] < gp["y"] + gp["h"]:
                problems.append(f"panels {other!r} and {p.get('title')!r} overlap")
        boxes.append((p.get("title"), gp))
        if p.get("type") != "row":
            if not p.get("targets"):
                problems.append(f"panel {p.get('title')!r} has no query")
            if not p.get("datasource"):
                problems.append(f"panel {p.get('title')!r} has no datasource")
    C.check("dashboard: unique panel ids, panels on the grid without overlap, every panel queries", problems)

    exprs = []
    for p in panels:
        for t in p.get("targets") or []:
            if t.get("expr"):
                exprs.append((f"dashboard panel {p.get('title')!r} ({t.get('refId')})", t["expr"]))
    for a in (dashboard.get("annotations") or {}).get("list") or []:
        if a.get("expr"):
            exprs.append((f"dashboard annotation {a.get('name')!r}", a["expr"]))
    variables = (dashboard.get("templating") or {}).get("list") or []
    var_exprs = []
    for v in variables:
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", q or "")
        if m:
            var_exprs.append((f"dashboard variable {v.get('name')}", m.group(1), m.group(2)))
        elif q and q.strip().startswith("query_result("):
            var_exprs.append((f"dashboard variable {v.get('name')}", q.strip()[len("query_result"):], None))

    required = {
        "leader": ["steward_leader"], "epoch": ["steward_leader_epoch"],
        "transitions": ["steward_leader_transitions_total"],
        "branch duration quantiles": ["steward_maintenance_branch_duration_seconds_bucket"],
        "start delay quantiles": ["steward_maintenance_branch_start_delay_seconds_bucket"],
        "overruns": ["steward_maintenance_branch_overrun_total"],
        "SLO branches delayed now": ["steward_maintenance_branch_delayed"],
        "runs by outcome": ["steward_maintenance_branch_runs_total"],
        "rows": ["steward_maintenance_branch_rows_total"],
        "promotion lag quantiles": ["steward_promotion_lag_seconds_bucket"],
        "rescues": ["steward_rescued_jobs_total"],
        "queue depth": ["steward_queue_jobs"],
        "oldest available age": ["steward_queue_oldest_available_age_seconds"],
        "loop restarts": ["steward_maintenance_loop_restarts_total"],
    }
    used = {n for _, e in exprs for n in metric_names(e)}
    problems = [f"no panel for {what} ({', '.join(names)})" for what, names in required.items()
                if not all(n in used for n in names)]
    for where, e in exprs:
        if "_bucket" in e and "histogram_quantile" not in e:
            problems.append(f"{where}: uses _bucket without histogram_quantile")
        if "histogram_quantile" in e and not re.search(r"\bby\s*\([^)]*\ble\b", e):
            problems.append(f"{where}: histogram_quantile without `by (le, ...)`")
    C.check("dashboard: panels for leader, epoch, transitions, duration, start delay, overruns, delayed, runs, "
            "rows, promotion lag, rescues, queue depth, oldest age, loop restarts", problems)

    defined = {v.get("name") for v in variables}
    problems = []
    text = json.dumps(dashboard)
    for var in sorted(grafana_vars(text)):
        if var not in defined and var not in GRAFANA_BUILTIN_VARS:
            problems.append(f"${var} is used but not defined under templating")
    C.check("dashboard: every $variable is defined", problems)

    jobs = {j.get("job_name") for j in (prom or {}).get("scrape_configs") or []}
    problems = []
    for v in variables:
        if v.get("name") == "job":
            current = (v.get("current") or {}).get("value")
            if current and current not in jobs:
                problems.append(f"variable job defaults to {current}, not a job in {rel(PROMETHEUS)} ({sorted(jobs)})")
    C.check("dashboard: the job variable defaults to a scrape job", problems)
    return exprs + [(w, e) for w, e, _ in var_exprs]


def check_alerts(alerts, tests, prom):
    exprs, problems, names = [], [], set()
    for group in alerts.get("groups") or []:
        for rule in group.get("rules") or []:
            if "alert" not in rule:
                if rule.get("expr"):
                    exprs.append((f"recording rule {rule.get('record')}", rule["expr"]))
                continue
            name = rule["alert"]
            names.add(name)
            exprs.append((f"alert {name}", rule.get("expr", "")))
            labels, ann = rule.get("labels") or {}, rule.get("annotations") or {}
            if labels.get("severity") not in SEVERITIES:
                problems.append(f"{name}: severity {labels.get('severity')!r} not in {sorted(SEVERITIES)}")
            for key in ("summary", "description"):
                if not ann.get(key):
                    problems.append(f"{name}: no {key} annotation")
            if not (ann.get("runbook") or ann.get("runbook_url")):
                problems.append(f"{name}: no runbook or runbook_url annotation")
    missing = REQUIRED_ALERTS - names
    if missing:
        problems.append(f"missing alerts: {sorted(missing)}")
    C.check(f"{rel(ALERTS)}: the four alerts, each with severity, summary, description, runbook", problems)

    jobs = {j.get("job_name") for j in (prom or {}).get("scrape_configs") or []}
    problems = []
    for where, e in exprs:
        for job in re.findall(r'\bjob\s*=\s*"([^"]*)"', e):
            if job not in jobs:
                problems.append(f"{where} selects job=\"{job}\", not a job in {rel(PROMETHEUS)} ({sorted(jobs)})")
    C.check(f"{rel(ALERTS)}: job selectors name jobs in {rel(PROMETHEUS)}", problems)

    rules = {r["alert"]: r for g in alerts.get("groups") or [] for r in g.get("rules") or [] if "alert" in r}
    problems = []
    expectations = [
        ("StewardSloBranchOverrun", [r"steward_maintenance_branch_delayed\{[^}]*loop\s*=\s*\"slo\"",
                                     r"\bor\b",
                                     r"increase\(\s*steward_maintenance_branch_overrun_total\{[^}]*loop\s*=\s*\"slo\"", r">\s*0\b"]),
        ("StewardSloBranchNoSuccess", [r"steward_maintenance_branch_last_success_timestamp_seconds",
                                       r"3\s*\*\s*steward_maintenance_branch_interval_seconds\{[^}]*loop\s*=\s*\"slo\"",
                                       r"steward_leader\b"]),
        ("StewardNoLeader", [r"steward_leader\b"]),
        ("StewardLeaderFlapping", [r"increase\(\s*steward_leader_transitions_total\{[^}]*event\s*=\s*\"acquired\"[^\]]*\[10m\]"]),
    ]
    for name, patterns in expectations:
        rule = rules.get(name)
        if rule is None:
            continue
        for pat in patterns:
            if not re.search(pat, rule.get("expr", "")):
                problems.append(f"{name}: expression does not match /{pat}/")
    if rules.get("StewardNoLeader") and rules["StewardNoLeader"].get("for") != "1m":
        problems.append("StewardNoLeader: expected for: 1m")
    C.check(f"{rel(ALERTS)}: expressions match their intent", problems)

    problems = []
    if tests is None:
        problems.append(f"{rel(ALERT_TESTS)} did not parse")
    else:
        rf = [str((ALERT_TESTS.parent / f).resolve()) for f in tests.get("rule_files") or []]
        if str(ALERTS.resolve()) not in rf:
            problems.append(f"{rel(ALERT_TESTS)} does not load {rel(ALERTS)}")
        firing, quiet = set(), set()
        for t in tests.get("tests") or []:
            for case in t.get("alert_rule_test") or []:
                (firing if case.get("exp_alerts") else quiet).add(case.get("alertname"))
        for name in sorted(names):
            if name not in firing:
                problems.append(f"no test where {name} fires")
            if name not in quiet:
                problems.append(f"no test where {name} does not fire")
    C.check(f"{rel(ALERT_TESTS)}: every alert tested firing and not firing", problems)
    return exprs


def check_metric_names(exprs, exported):
    problems, label_problems, used = [], [], set()
    labels_checked, labels_unchecked = 0, set()
    for where, e in exprs:
        for name in metric_names(e):
            used.add(name)
            if not exported.knows(name):
                problems.append(f"{where}: {name} is not exported")
        for name, labels in selectors(e):
            seen = exported.sample_labels(name)
            if seen is None:
                labels_unchecked.add(name)
                continue
            labels_checked += 1
            allowed = seen | TARGET_LABELS | ({"exported_instance"} if "instance" in seen else set())
            for label in labels:
                if label not in allowed:
                    label_problems.append(f"{where}: {name} has no label {label} (it has {sorted(seen)})")
    if problems:
        problems.append("(a labelled counter or histogram that never moved may be missing from a "
                        "scrape: create its series at start-up, e.g. with 0)")
    C.check("every metric in the dashboard and the alerts is exported", problems)
    if labels_checked == 0:
        C.skip("every label matcher names a label its metric has",
               "EXPORTED_METRICS has no labelled samples (names only): pass a /metrics scrape")
    else:
        C.check("every label matcher names a label its metric has (where the scrape shows samples)",
                label_problems)
        if labels_unchecked:
            print(f"note  label matchers not checked (no samples in the scrape): {', '.join(sorted(labels_unchecked))}")
    base = lambda n: next((n[: -len(s)] for s in HISTOGRAM_SUFFIXES
                           if n.endswith(s) and n[: -len(s)] in exported.histograms), n)
    used_bases = {base(n) for n in used}
    unused = sorted(n for n in exported.names
                    if n.startswith("steward_") and base(n) not in used_bases and n not in used_bases
                    and not n.endswith("_created"))
    if unused:
        print(f"note  exported but on no panel or alert: {', '.join(unused)}")


def run_promtool(exprs, prom):
    promtool = shutil.which("promtool")
    names = ["promtool check rules alerts.yml", "promtool test rules alerts.test.yml",
             "promtool check config prometheus.yml", "promtool parses every dashboard expression"]
    if promtool is None:
        for n in names:
            C.skip(n, "promtool is not on PATH (apt-get install prometheus)")
        return

    def run(name, args, cwd=HERE):
        r = subprocess.run([promtool, *args], capture_output=True, text=True, cwd=cwd, timeout=120)
        C.check(name, [] if r.returncode == 0 else [(r.stdout + r.stderr).strip()])

    run(names[0], ["check", "rules", str(ALERTS)])
    run(names[1], ["test", "rules", str(ALERT_TESTS)])
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dict(prom or {})
        cfg["rule_files"] = [str(ALERTS)]
        path = Path(tmp) / "prometheus.yml"
        path.write_text(yaml.safe_dump(cfg))
        run(names[2], ["check", "config", str(path)])
        rules = {"groups": [{"name": "dashboard", "rules": [
            {"record": f"dashboard:expr_{i}", "expr": substitute_grafana(e)}
            for i, (w, e) in enumerate(exprs) if w.startswith("dashboard")]}]}
        rpath = Path(tmp) / "dashboard-rules.yml"
        rpath.write_text(yaml.safe_dump(rules))
        r = subprocess.run([promtool, "check", "rules", str(rpath)], capture_output=True, text=True, timeout=120)
        if r.returncode == 0:
            C.ok(names[3])
        else:
            where = [w for w, _ in exprs if w.startswith("dashboard")]
            out = (r.stdout + r.stderr).strip()
            out = re.sub(r"dashboard:expr_(\d+)",
                         lambda m: f"{where[int(m.group(1))]}" if int(m.group(1)) < len(where) else m.group(0), out)
            C.fail(names[3], out)



if __name__ == "__main__":
    sys.exit(main(sys.argv))
