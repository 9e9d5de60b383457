#!/usr/bin/env python3
"""Checks that the deployment files agree with the code: image, ports, metrics endpoints
and configuration keys. Run by deploy/validate.sh, which provides PyYAML; alone:

    python3 deploy/validate_consistency.py [--verbose]

What the code says is read from:
- docs/configuration.md: every subcommand's options with their environment variables and
  defaults, rendered from the command-line definitions (the unit test `config_reference`
  fails when it differs from them);
- Cargo.toml: the version, which the image tag carries;
- deploy/Dockerfile: the metrics port the image exposes and the user it runs as.

Each failed check prints `FAIL: ...`; the exit status is 1 when any failed.
"""

from __future__ import annotations

import fnmatch
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
VERBOSE = "--verbose" in sys.argv[1:]
# Subcommands that run for good and serve metrics; their Prometheus job has their name
# (the dashboards and alert rules select on job="executor", "capture" and "device").
LONG_RUNNING = ("executor", "capture", "confirm", "device")

passed = 0
failed = 0


def check(cond: bool, what: str, why: str = "") -> bool:
    global passed, failed
    if cond:
        passed += 1
        if VERBOSE:
            print(f"ok: {what}")
    else:
        failed += 1
        print(f"FAIL: {what}" + (f": {why}" if why else ""))
    return cond


# --- what the code says ----------------------------------------------------------------


def reference() -> dict[str, dict[str, dict]]:
    """Options per subcommand from docs/configuration.md: flag -> {env, default, required}."""
    commands: dict[str, dict[str, dict]] = {}
    global_options: dict[str, dict] = {}
    current = None
    for line in (ROOT / "docs/configuration.md").read_text().splitlines():
        if line.startswith("## Global options"):
            current = global_options
        elif m := re.match(r"## `pgfanout (\S+)`", line):
            current = commands.setdefault(m.group(1), {})
        elif line.startswith("| `--") and current is not None:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            flag = re.match(r"`(--[\w-]+)", cells[0]).group(1)
            env = cells[1].strip("`") if cells[1].startswith("`") else None
            current[flag] = {"env": env, "default": cells[2].strip("`"), "required": cells[2] == "required"}
    for options in commands.values():
        options.update(global_options)
    if not commands:
        sys.exit("docs/configuration.md lists no subcommands")
    return commands


REF = reference()
VERSION = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M).group(1)
IMAGE = f"pgfanout:{VERSION}"
DOCKERFILE = (DEPLOY / "Dockerfile").read_text()
EXPOSED = [int(p) for p in re.findall(r"^EXPOSE (\d+)", DOCKERFILE, re.M)]
USER = re.search(r"^USER (\d+)", DOCKERFILE, re.M)
UID = int(USER.group(1)) if USER else 0
ALL_VARS = {o["env"] for options in REF.values() for o in options.values() if o["env"]}


def variables(command: str) -> set[str]:
    return {o["env"] for o in REF.get(command, {}).values() if o["env"]}


def check_settings(where: str, command: str | None, env: set[str], args=(), shared: set[str] = frozenset()) -> None:
    """The subcommand exists, reads every variable set for it (`env`), and gets its required
    options from those, from `shared` variables (a ConfigMap's) or from its arguments."""
    if not check(command in REF, f"{where}: runs `pgfanout {command}`", "no such subcommand"):
        return
    unknown = sorted(n for n in env if n.startswith("PGFANOUT_") and n not in variables(command))
    check(not unknown, f"{where}: every variable is read by `pgfanout {command}`", f"not read: {', '.join(unknown)}")
    missing = [
        flag for flag, o in REF[command].items() if o["required"] and o["env"] not in env | shared and flag not in args
    ]
    check(not missing, f"{where}: required options given", f"missing {', '.join(missing)}")


def metrics_port(where: str, addr: str | None, interfaces: bool = True) -> int | None:
    """The port of a PGFANOUT_METRICS_ADDR that must be reachable from Prometheus."""
    if not check(addr is not None, f"{where}: serves metrics", "PGFANOUT_METRICS_ADDR is not set"):
        return None
    host, _, port = str(addr).rpartition(":")
    if interfaces:
        check(host in ("0.0.0.0", "[::]"), f"{where}: metrics listen on all interfaces", f"{addr}")
    return int(port)


# --- every file --------------------------------------------------------------------------


def descriptor_files() -> list[Path]:
    skip = ("local/", "validate.sh", "validate_consistency.py")
    files = [p for p in sorted(DEPLOY.rglob("*")) if p.is_file() and not str(p.relative_to(DEPLOY)).startswith(skip)]
    return files + [ROOT / ".dockerignore"]


def check_names() -> None:
    for path in descriptor_files():
        unknown = sorted(set(re.findall(r"\bPGFANOUT_[A-Z0-9_]+\b", path.read_text(errors="replace"))) - ALL_VARS)
        check(not unknown, f"{path.relative_to(ROOT)}: every PGFANOUT_* name is an option's variable", ", ".join(unknown))


# --- Dockerfile -------------------------------------------------------------------------


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (last match wins)."""
    excluded = False
    for pattern in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        if any(fnmatch.fnmatch("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def check_dockerfile() -> None:
    check('ENTRYPOINT ["pgfanout"]' in DOCKERFILE, "Dockerfile: the entrypoint is the binary")
    check(UID > 0, f"Dockerfile: runs as non-root uid {UID}")
    check(len(EXPOSED) == 1, f"Dockerfile: exposes the metrics port {EXPOSED}")
    for src in re.findall(r"^COPY (?!--from)(?:--\S+\s+)*(\S+)", DOCKERFILE, re.M):
        check((ROOT / src).exists() and not dockerignore_excludes(src), f"Dockerfile: COPY {src} is in the build context")


# --- compose ----------------------------------------------------------------------------


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(str(item).partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def check_compose() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services: dict = compose["services"]
    volumes = set(compose.get("volumes") or {})
    ours = {n: s for n, s in services.items() if (s.get("build") or {}).get("dockerfile") == "deploy/Dockerfile"}
    command = {n: (s.get("command") or [None])[0] for n, s in ours.items()}
    prometheus = yaml.safe_load((DEPLOY / "prometheus/prometheus.compose.yml").read_text())
    scraped = {
        target: job["job_name"]
        for job in prometheus["scrape_configs"]
        for group in job.get("static_configs", [])
        for target in group.get("targets", [])
    }
    setup = [n for n, c in command.items() if c == "setup"]
    check(len(setup) == 1, "compose: one setup service creates the schema and the topics")
    for name, service in ours.items():
        where = f"compose {name}"
        check(service.get("image") == IMAGE, f"{where}: image {IMAGE}", f"found {service.get('image')}")
        check(
            (DEPLOY / service["build"]["context"]).resolve() == ROOT,
            f"{where}: built from the repository root",
        )
        if service.get("entrypoint"):  # a script: every `pgfanout <command>` in it exists
            script = " ".join(service.get("command") or [])
            for sub in re.findall(r"\bpgfanout (\S+)", script):
                check(sub in REF, f"{where}: its script runs `pgfanout {sub}`", "no such subcommand")
            continue
        if command[name] is None:  # the `run --rm cli <command>` service
            check(service.get("profiles") is not None, f"{where}: without a command, only in a profile")
            continue
        env = env_of(service)
        check_settings(where, command[name], set(env), service["command"])
        if command[name] in LONG_RUNNING:
            depends = service.get("depends_on") or {}
            check(
                all((depends.get(s) or {}).get("condition") == "service_completed_successfully" for s in setup),
                f"{where}: starts after setup has completed",
            )
            port = metrics_port(where, env.get("PGFANOUT_METRICS_ADDR"))
            check(port in EXPOSED, f"{where}: metrics on the image's exposed port {EXPOSED}", f"port {port}")
            check(
                scraped.get(f"{name}:{port}") == command[name],
                f"prometheus.compose.yml: job {command[name]} scrapes {name}:{port}",
                f"found {scraped.get(f'{name}:{port}')}",
            )
    for target in scraped:
        host, _, port = target.rpartition(":")
        check(host in ours and command[host] in LONG_RUNNING, f"prometheus.compose.yml: target {target} is a pgfanout service")

    captures = [n for n, c in command.items() if c == "capture"]
    check(
        len(captures) == 1 and all((ours[n].get("deploy") or {}).get("replicas", 1) == 1 for n in captures),
        "compose: exactly one capture, one replica",
    )
    devices = {n: env_of(s) for n, s in ours.items() if command[n] == "device"}
    ids = [env.get("PGFANOUT_DEVICE_ID") for env in devices.values()]
    check(len(set(ids)) == len(ids), f"compose: device ids {ids} are distinct")
    store_volumes = []
    for name, env in devices.items():
        store = env.get("PGFANOUT_DEVICE_STORE", "")
        holding = [
            str(v).split(":")[0]
            for v in ours[name].get("volumes") or []
            if store.startswith(str(v).split(":")[1].rstrip("/") + "/")
        ]
        check(len(holding) == 1 and holding[0] in volumes, f"compose {name}: store {store} on a named volume")
        store_volumes += holding
    check(len(set(store_volumes)) == len(store_volumes), "compose: every device has its own volume")

    postgres = " ".join(map(str, services["postgres"].get("command") or []))
    check("wal_level=logical" in postgres, "compose postgres: wal_level=logical")
    initdb = " ".join(p.read_text() for p in sorted((DEPLOY / "postgres/initdb").glob("*.sql")))
    default = REF["capture"]["--publication"]["default"]
    for publication in {env_of(s).get("PGFANOUT_PUBLICATION", default) for s in ours.values()}:
        check(f"CREATE PUBLICATION {publication} " in initdb, f"compose postgres: creates publication {publication}")
    check(
        str(env_of(services["kafka"]).get("KAFKA_AUTO_CREATE_TOPICS_ENABLE")).lower() == "false",
        "compose kafka: topics come from setup only (auto-creation off)",
    )
    mounts = [str(v) for v in services["prometheus"].get("volumes", [])]
    check(
        "./prometheus/prometheus.compose.yml:/etc/prometheus/prometheus.yml:ro" in mounts
        and "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts,
        "compose prometheus: the compose scrape configuration and the alert rules",
    )
    grafana = services["grafana"]
    provisioning = "\n".join(p.read_text() for p in sorted((DEPLOY / "grafana/provisioning").rglob("*.yaml")))
    for var in set(re.findall(r"url: \$\{(\w+)\}", provisioning)):
        check(var in env_of(grafana), f"compose grafana: sets {var} for the provisioned data source")
    for path in re.findall(r"^\s+path: (\S+)", provisioning, re.M):
        check(f"../dashboards:{path}:ro" in grafana.get("volumes", []), f"compose grafana: dashboards mounted at {path}")


# --- Kubernetes -------------------------------------------------------------------------


def check_kubernetes() -> None:
    k8s = DEPLOY / "k8s"
    kustomization = yaml.safe_load((k8s / "kustomization.yaml").read_text())
    manifests = sorted(p.name for p in k8s.glob("*.yaml") if p.name not in ("kustomization.yaml", "servicemonitor.yaml"))
    check(sorted(kustomization["resources"]) == manifests, "k8s kustomization: lists every manifest but the ServiceMonitor")
    for image in kustomization.get("images", []):
        check(f"{image['name']}:{image['newTag']}" == IMAGE, f"k8s kustomization: image {IMAGE}")
    objects = [doc for p in sorted(k8s.glob("*.yaml")) for doc in yaml.safe_load_all(p.read_text()) if doc]

    def kinds(*k: str) -> list[dict]:
        return [o for o in objects if o["kind"] in k]

    configmaps = {o["metadata"]["name"]: set((o.get("data") or {}).keys()) for o in kinds("ConfigMap")}
    secrets = {o["metadata"]["name"]: set((o.get("stringData") or o.get("data") or {}).keys()) for o in kinds("Secret")}
    services = kinds("Service")
    configmap_readers: dict[str, set[str]] = {}

    for workload in kinds("Deployment", "StatefulSet", "Job"):
        pod = workload["spec"]["template"]
        labels = pod["metadata"].get("labels", {})
        annotations = pod["metadata"].get("annotations", {})
        check(pod["spec"].get("securityContext", {}).get("runAsUser") == UID, f"k8s {workload['metadata']['name']}: runs as uid {UID}")
        for c in pod["spec"]["containers"]:
            where = f"k8s {workload['kind']}/{workload['metadata']['name']}"
            command = (c.get("args") or [None])[0]
            check(c.get("image") == IMAGE, f"{where}: image {IMAGE}", f"found {c.get('image')}")
            env = {e["name"]: e for e in c.get("env", [])}
            from_maps = set()
            for source in c.get("envFrom", []):
                name = source.get("configMapRef", {}).get("name")
                check(name in configmaps, f"{where}: ConfigMap {name} exists")
                from_maps |= configmaps.get(name, set())
                configmap_readers.setdefault(name, set()).add(command)
            check_settings(where, command, set(env), c.get("args", []), from_maps)
            for e in env.values():
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    check(ref["key"] in secrets.get(ref["name"], set()), f"{where}: Secret {ref['name']} has key {ref['key']}")
            if command not in LONG_RUNNING:
                continue
            port = metrics_port(where, (env.get("PGFANOUT_METRICS_ADDR") or {}).get("value"))
            check(port in EXPOSED, f"{where}: metrics on the image's exposed port {EXPOSED}", f"port {port}")
            ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}
            check(ports.get("metrics") == port, f"{where}: containerPort `metrics` is {port}", f"found {ports.get('metrics')}")
            for probe in ("readinessProbe", "livenessProbe"):
                get = (c.get(probe) or {}).get("httpGet", {})
                check(get.get("port") in ("metrics", port) and get.get("path") == "/metrics", f"{where}: {probe} GETs /metrics")
            check(
                annotations.get("prometheus.io/scrape") == "true"
                and annotations.get("prometheus.io/port") == str(port)
                and annotations.get("prometheus.io/path") == "/metrics",
                f"{where}: prometheus.io annotations name port {port} and /metrics",
            )
            check(
                any(
                    all(labels.get(k) == v for k, v in s["spec"]["selector"].items())
                    and any(p["name"] == "metrics" and p["targetPort"] in ("metrics", port) for p in s["spec"]["ports"])
                    and s["metadata"]["labels"].get("app.kubernetes.io/component") == command
                    for s in services
                ),
                f"{where}: a Service labelled {command} exposes its metrics port",
            )
            if command == "capture":
                check(
                    workload["kind"] == "StatefulSet" and workload["spec"]["replicas"] == 1,
                    f"{where}: a StatefulSet of one replica, so capture never runs twice",
                )
            if command == "device":
                claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                store = (env.get("PGFANOUT_DEVICE_STORE") or {}).get("value", "")
                pod_name = (env.get("PGFANOUT_DEVICE_ID") or {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
                check(
                    workload["kind"] == "StatefulSet"
                    and pod_name == "metadata.name"
                    and any(store.startswith(path.rstrip("/") + "/") and name in claims for path, name in mounts.items()),
                    f"{where}: device id from the pod's name, store {store} on the pod's own claim",
                )
    for name, readers in configmap_readers.items():
        unread = sorted(configmaps[name] - set().union(*(variables(c) for c in readers)))
        check(not unread, f"k8s ConfigMap {name}: every key is read by {', '.join(sorted(map(str, readers)))}", ", ".join(unread))

    for monitor in yaml.safe_load_all((k8s / "servicemonitor.yaml").read_text()):
        selector = monitor["spec"]["selector"]
        selected = [
            s
            for s in services
            if all(s["metadata"]["labels"].get(k) == v for k, v in selector.get("matchLabels", {}).items())
            and all(s["metadata"]["labels"].get(e["key"]) in e["values"] for e in selector.get("matchExpressions", []))
        ]
        jobs = sorted(s["metadata"]["labels"].get(monitor["spec"]["jobLabel"]) for s in selected)
        check(jobs == sorted(LONG_RUNNING), f"k8s ServiceMonitor: jobs {jobs}")
        for endpoint in monitor["spec"]["endpoints"]:
            check(
                endpoint.get("path") == "/metrics"
                and all(any(p["name"] == endpoint["port"] for p in s["spec"]["ports"]) for s in selected),
                f"k8s ServiceMonitor: scrapes port {endpoint['port']} /metrics of every selected Service",
            )


# --- systemd ----------------------------------------------------------------------------


def check_systemd() -> None:
    unit = (DEPLOY / "systemd/pgfanout-device@.service").read_text()
    exec_start = re.search(r"^ExecStart=/usr/local/bin/pgfanout (\S+)", unit, re.M)
    command = exec_start.group(1) if exec_start else None
    example = (DEPLOY / "systemd/device.env.example").read_text()
    unit_env = set(re.findall(r"^Environment=(PGFANOUT_\w+)=", unit, re.M))
    example_env = set(re.findall(r"^#?(PGFANOUT_\w+)=", example, re.M))
    check_settings("systemd pgfanout-device@.service", command, unit_env)
    check_settings("systemd device.env.example", command, example_env | unit_env)
    addr = re.search(r"^PGFANOUT_METRICS_ADDR=(\S+)", example, re.M)
    metrics_port("systemd device.env.example", addr.group(1) if addr else None, interfaces=False)
    check(
        re.search(r"^Environment=PGFANOUT_DEVICE_STORE=/var/lib/pgfanout/%i/", unit, re.M) is not None
        and "StateDirectory=pgfanout/%i" in unit,
        "systemd: the store lives in the instance's state directory",
    )


def main() -> int:
    print(f"code: {IMAGE}; subcommands {', '.join(REF)}; {len(ALL_VARS)} variables; metrics port {EXPOSED}")
    for part in (check_names, check_dockerfile, check_compose, check_kubernetes, check_systemd):
        part()
    print(f"consistency: {passed} passed, {failed} failed" + ("" if VERBOSE else " (--verbose lists every check)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
