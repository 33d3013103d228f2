"""The deployment (docker/, docker-compose*.yml, .dockerignore), checked for real wherever this machine allows.

No test builds the images or starts the compose stack: CI has no Docker daemon, and no base image could be
pulled where these tests run. `docker/smoke_test.py` does that on a Docker host (README: Deployment); the last
section here checks the script itself against a real service. What is checked here:

* the compose files and the Grafana files parse, agree with one another (ports, service names, mounts, the data
  source uid) and reference only files that exist; every `CAPEEN_*` variable they set is a real setting;
* the Dockerfiles follow the conventions (non-root user, health check, exposed port, exec-form `capeen serve`) and
  copy only what the `.dockerignore`d build context holds; that context builds a wheel with the shipped checkpoint;
* the container health check script, against a stub server;
* `promtool check config`, `check rules` and the rules' unit tests;
* every PromQL expression of the dashboards, and every recording rule, returns data from a real Prometheus
  server (`prometheus` on PATH, the Debian package) scraping a live `capeen serve` after a short load.
"""

from __future__ import annotations

import http.server
import io
import json
import math
import os
import posixpath
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]
PROMETHEUS_DIR = ROOT / "docker" / "prometheus"
GRAFANA_DIR = ROOT / "docker" / "grafana"
DASHBOARD_FILES = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"

# The metric families of the service (issue 5): the dashboards may use nothing else (besides Prometheus' `up`).
SERVICE_METRICS = {
    "capeen_requests_total", "capeen_request_duration_seconds", "capeen_queue_duration_seconds", "capeen_batch_size",
    "capeen_queue_depth", "capeen_tokens_generated_total", "capeen_token_exit_layer",
    "capeen_decoder_layers_computed_total", "capeen_decoder_layers_full_total", "capeen_bandit_arm_pulls_total",
    "capeen_bandit_threshold", "capeen_bandit_reward", "capeen_bandit_changes_detected_total", "capeen_errors_total",
    "capeen_engine_restarts_total", "capeen_batch_duration_seconds", "capeen_engine_compute_seconds_total",
    "capeen_model_info", "capeen_captions_total",
}
HISTOGRAMS = {"capeen_request_duration_seconds", "capeen_queue_duration_seconds", "capeen_batch_size",
              "capeen_token_exit_layer", "capeen_bandit_reward", "capeen_batch_duration_seconds"}


# ----------------------------------------------------------------------------------------------- compose files

@dataclass(frozen=True)
class Tagged:
    """A YAML value with a compose tag (`!reset`, `!override`)."""

    tag: str
    value: object


class ComposeLoader(yaml.SafeLoader):
    pass


def _construct_tagged(loader: ComposeLoader, node: yaml.Node) -> Tagged:
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return Tagged(node.tag, value)


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _construct_tagged)

_VARIABLE = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation (`${VAR}`, `${VAR:-default}`, `${VAR-default}`, `$$`) over a whole tree."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if isinstance(value, Tagged):
        return Tagged(value.tag, interpolate(value.value, env))
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        expression = match.group("braced") if match.group("braced") is not None else match.group("plain")
        for separator in (":-", "-", ":?", "?"):
            name, found, rest = expression.partition(separator)
            if found:
                break
        else:
            name, rest = expression, None
        current = env.get(name)
        if separator == ":-" and found:
            return current if current else rest
        if separator == "-" and found:
            return current if current is not None else rest
        if separator in (":?", "?") and found and not current:
            raise ValueError(f"required variable {name}: {rest}")
        return current or ""

    return _VARIABLE.sub(replace, value)


def variable_references(value) -> list[str]:
    """Every `${...}` expression of a tree."""
    if isinstance(value, dict):
        return [ref for item in value.values() for ref in variable_references(item)]
    if isinstance(value, list):
        return [ref for item in value for ref in variable_references(item)]
    if isinstance(value, Tagged):
        return variable_references(value.value)
    if isinstance(value, str):
        return [m.group("braced") or m.group("plain") for m in _VARIABLE.finditer(value) if m.group(0) != "$$"]
    return []


def load_compose(path: Path, env: dict[str, str] | None = None) -> dict:
    return interpolate(yaml.load(path.read_text(encoding="utf-8"), Loader=ComposeLoader), env or {})


def merge_compose(base, override):
    """Compose's merge of an override file into a base: mappings merged, sequences of scalars and scalars replaced
    (ports/volumes are merged by target in real compose; no override here touches them), `!reset` removes."""
    if isinstance(override, Tagged):
        if override.tag == "!reset":
            return None
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            result = merge_compose(base.get(key), value)
            if result is None and isinstance(value, Tagged):
                merged.pop(key, None)
            else:
                merged[key] = result
        return merged
    return override


def environment(service: dict) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) if "=" in item else (item, None) for item in env)
        return {key: value for key, value in pairs}
    return {key: None if value is None else str(value) for key, value in env.items()}


def mounts(service: dict) -> list[dict]:
    """Volumes in long form: type, source, target, read_only."""
    result = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            parts = volume.split(":")
            source, target = parts[0], parts[1]
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            result.append({"type": kind, "source": source, "target": target,
                           "read_only": len(parts) > 2 and "ro" in parts[2].split(",")})
        else:
            result.append(dict(volume))
    return result


def host_path(service: dict, container_path: str) -> Path | None:
    """Where a path inside the container comes from on the host, through the service's bind mounts."""
    best = None
    for mount in mounts(service):
        target = mount["target"].rstrip("/")
        if mount["type"] == "bind" and (container_path == target or container_path.startswith(target + "/")):
            if best is None or len(target) > len(best[0]):
                best = (target, mount["source"])
    if best is None:
        return None
    return (ROOT / best[1] / container_path[len(best[0]):].lstrip("/")).resolve()


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(COMPOSE)


def test_compose_variables_all_have_defaults():
    """`docker compose up` must work with no .env file: every ${VAR} has a default, and none is required."""
    for path in (COMPOSE, COMPOSE_CPU):
        tree = yaml.load(path.read_text(encoding="utf-8"), Loader=ComposeLoader)
        for reference in variable_references(tree):
            assert ":-" in reference, f"{path.name}: ${{{reference}}} has no default"


def test_compose_services_and_references(compose):
    services = compose["services"]
    assert {"capeen", "prometheus", "grafana"} <= set(services)
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        assert service.get("restart") == "unless-stopped", name
        assert service.get("image") or service.get("build"), name
        for mount in mounts(service):
            if mount["type"] == "bind":
                assert (ROOT / mount["source"]).exists(), f"{name}: bind mount source {mount['source']} is missing"
            else:
                assert mount["source"] in declared_volumes, f"{name}: volume {mount['source']} is not declared"
        for env_file in service.get("env_file") or []:
            assert (ROOT / env_file).is_file(), f"{name}: env_file {env_file} is missing"
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        for dependency in service.get("depends_on") or []:
            assert dependency in services, f"{name} depends on unknown service {dependency}"

    capeen = services["capeen"]
    build = capeen["build"]
    assert (ROOT / build["context"]).resolve() == ROOT
    assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILES[0]
    devices = capeen["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and
               (d.get("count") in (1, "all") or d.get("device_ids")) for d in devices), devices
    env = environment(capeen)
    assert env["CAPEEN_HOST"] == "0.0.0.0"
    assert env["CAPEEN_DEVICE"] == "cuda"
    port = int(env["CAPEEN_PORT"])
    assert any(str(p).endswith(f":{port}") for p in capeen["ports"]), capeen["ports"]
    # the bandit snapshot lives on a named volume, the checkpoints folder is mounted read-only
    state_dir = posixpath.dirname(env["CAPEEN_BANDIT_STATE"])
    assert any(m["type"] == "volume" and m["target"] == state_dir for m in mounts(capeen)), state_dir
    assert any(m["target"] == "/checkpoints" and m["read_only"] for m in mounts(capeen))
    assert capeen["healthcheck"]["test"][1:] == ["/opt/venv/bin/python", "/usr/local/bin/capeen-healthcheck"]
    assert capeen.get("init") is True, "capeen should run under an init that forwards SIGTERM"
    # `docker compose stop` must outwait uvicorn's graceful shutdown, or the bandit snapshot is lost to SIGKILL
    from service import cli as service_cli
    from service.settings import Settings

    grace = float(re.fullmatch(r"(\d+)s", capeen["stop_grace_period"]).group(1))
    assert grace > Settings().request_timeout_s + getattr(service_cli, "_SHUTDOWN_GRACE_S", 5.0)

    prometheus = services["prometheus"]
    config_flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    config = host_path(prometheus, config_flag.split("=", 1)[1])
    assert config == (PROMETHEUS_DIR / "prometheus.yml").resolve()
    assert any(str(p).endswith(":9090") for p in prometheus["ports"])

    grafana = services["grafana"]
    genv = environment(grafana)
    assert genv["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and genv["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert genv["GF_SECURITY_ADMIN_USER"] and genv["GF_SECURITY_ADMIN_PASSWORD"]
    assert host_path(grafana, "/etc/grafana/provisioning") == (GRAFANA_DIR / "provisioning").resolve()
    home = host_path(grafana, genv["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home is not None and home.is_file(), genv["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert any(str(p).endswith(":3000") for p in grafana["ports"])


def test_cpu_override(compose):
    override = yaml.load(COMPOSE_CPU.read_text(encoding="utf-8"), Loader=ComposeLoader)
    assert set(override["services"]) <= set(compose["services"]), "the override must not add services"
    merged = merge_compose(compose, interpolate(override, {}))
    capeen = merged["services"]["capeen"]
    assert "deploy" not in capeen, "the CPU override must drop the GPU reservation"
    assert (ROOT / capeen["build"]["context"] / capeen["build"]["dockerfile"]).resolve() == DOCKERFILES[1]
    assert environment(capeen)["CAPEEN_DEVICE"] == "cpu"
    assert capeen["image"] != compose["services"]["capeen"]["image"]
    assert merged["services"]["prometheus"] == compose["services"]["prometheus"]


def test_capeen_variables_are_real_settings(compose, tmp_path):
    """Every CAPEEN_* variable the deployment sets is a field of service.settings.Settings, with a valid value.

    The bandit snapshot's folder exists only in the image: each Dockerfile must create it, writable by the
    service's user, and the rest of the path is checked here against a folder of this machine."""
    from service.settings import Settings

    fields = {f"CAPEEN_{name.upper()}": name for name in Settings.model_fields}
    sources = {"docker-compose.yml": environment(compose["services"]["capeen"]),
               "docker-compose.cpu.yml": environment(load_compose(COMPOSE_CPU)["services"]["capeen"])}
    for dockerfile in DOCKERFILES:
        sources[dockerfile.name] = dockerfile_env(dockerfile)
    for source, env in sources.items():
        values = {}
        for key, value in env.items():
            if key.startswith("CAPEEN_"):
                assert key in fields, f"{source}: {key} is not a setting of the service"
                if value is not None:
                    values[fields[key]] = value
        state = values.pop("bandit_state", None)
        if state is not None:
            folder = str(Path(state).parent)
            for dockerfile in DOCKERFILES:
                text = dockerfile.read_text(encoding="utf-8")
                assert re.search(rf"mkdir -p [^\n]*{folder}", text), f"{dockerfile.name} does not create {folder}"
                assert f"chown capeen:capeen {folder}" in text, f"{dockerfile.name}: {folder} is not the service's"
            values["bandit_state"] = tmp_path / Path(state).name
        Settings(**values)  # raises on an invalid value


# ----------------------------------------------------------------------------------------------- Dockerfiles

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    instructions, pending = [], ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, rest = pending.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, f"{path.name} ends inside a continued line"
    return instructions


def dockerfile_env(path: Path) -> dict[str, str]:
    env = {}
    for keyword, rest in dockerfile_instructions(path):
        if keyword == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def _exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_conventions(dockerfile: Path):
    text = dockerfile.read_text(encoding="utf-8")
    # BuildKit's built-in Dockerfile frontend takes RUN --mount; a `# syntax=` line would instead pull a frontend
    # image from Docker Hub at every build, which fails on a host that reaches only a mirror of the base image
    assert not re.match(r"\s*#\s*syntax\s*=", text, re.I), f"{dockerfile.name}: no syntax directive"
    assert "RUN --mount=type=bind" in text
    instructions = dockerfile_instructions(dockerfile)
    keywords = [k for k, _ in instructions]
    args = {}
    for keyword, rest in instructions:
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args.setdefault(name, value)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], dict(instructions)["FROM"])
    if dockerfile.name == "Dockerfile":
        assert base.startswith("nvidia/cuda:") and "runtime" in base, base
    else:
        assert "cuda" not in base and "/whl/cpu" in args["TORCH_INDEX_URL"], base

    # the pinned torch satisfies the project's requirement
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    torch_requirement = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "torch")
    assert args["TORCH_VERSION"] in torch_requirement.specifier, (args["TORCH_VERSION"], str(torch_requirement))
    assert project["scripts"]["capeen"] == "capeen.cli:console_main"

    env = dockerfile_env(dockerfile)
    assert env["CAPEEN_HOST"] == "0.0.0.0"
    exposed = [rest for keyword, rest in instructions if keyword == "EXPOSE"]
    assert exposed == [env["CAPEEN_PORT"]] == ["8000"]

    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the service must not run as root"
    assert keywords.index("USER") < keywords.index("CMD")
    assert _exec_form(dict(instructions)["CMD"]) == ["capeen", "serve"]

    volumes = _exec_form(next(rest for keyword, rest in instructions if keyword == "VOLUME"))
    assert "/checkpoints" in volumes and posixpath.dirname(env["CAPEEN_BANDIT_STATE"]) in volumes

    healthcheck = dict(instructions)["HEALTHCHECK"]
    options, _, command = healthcheck.partition(" CMD ")
    assert "--start-period=" in options
    command = _exec_form(command)
    copies = {}
    context = build_context()
    for keyword, rest in instructions:
        if keyword == "COPY":
            *sources, destination = shlex.split(rest)
            for source in sources:
                assert source in context, f"COPY {source}: not in the build context (.dockerignore?)"
                copies[destination] = source
    assert copies[command[1]] == "docker/healthcheck.py"
    assert command[0] == "/opt/venv/bin/python" and env["VIRTUAL_ENV"] == "/opt/venv"
    runs = [" ".join(rest.split()) for keyword, rest in instructions if keyword == "RUN"]
    assert any(re.match(r"--mount=type=bind,source=\.,target=(\S+),rw pip install \1 ", run) for run in runs), \
        "the project is installed from the build context"
    assert "default checkpoint missing from the image" in text


# ----------------------------------------------------------------------------------------------- build context

def _glob_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regular expression over slash paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out += "(?:.*/)?"
                i += 1
            else:
                out += ".*"
            continue
        char = pattern[i]
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "[":
            end = pattern.index("]", i)
            body = pattern[i + 1:end]
            out += "[" + ("^" + body[1:] if body.startswith("!") else body) + "]"
            i = end
        else:
            out += re.escape(char)
        i += 1
    return re.compile(out)


def dockerignore_rules() -> list[tuple[bool, re.Pattern, str]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = posixpath.normpath(line[1:].strip() if negate else line).lstrip("/")
        rules.append((negate, _glob_regex(pattern), pattern))
    return rules


def ignored(path: str, rules) -> bool:
    """Docker's rule: a pattern that matches the path or one of its parents decides; the last one wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for negate, regex, _ in rules:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            result = not negate
    return result


def build_context() -> set[str]:
    """The files `docker build .` sends, as slash paths relative to the repository root."""
    rules = dockerignore_rules()
    reincluded = [pattern for negate, _, pattern in rules if negate]
    files = set()
    for directory, subdirectories, filenames in os.walk(ROOT):
        relative = Path(directory).relative_to(ROOT).as_posix()
        relative = "" if relative == "." else relative + "/"
        subdirectories[:] = [d for d in subdirectories
                             if not ignored(relative + d, rules)
                             or any(p.startswith(relative + d + "/") for p in reincluded)]
        files.update(relative + f for f in filenames if not ignored(relative + f, rules))
    return files


def test_dockerignore_keeps_sources_and_drops_the_rest():
    context = build_context()
    for needed in ("pyproject.toml", "capeen/cli.py", "service/app.py", "service/settings.py", "models/checkpoint.py",
                   "bandit/__init__.py", "docker/healthcheck.py"):
        assert needed in context, needed
    default = ROOT / "models" / "checkpoints" / "default"
    for file in default.rglob("*") if default.is_dir() else []:
        if file.is_file() and "__pycache__" not in file.parts:
            assert file.relative_to(ROOT).as_posix() in context
    rules = dockerignore_rules()
    for unwanted in (".git/HEAD", "data/train/000001.png", "runs/exp/state.safetensors", "venv/bin/python",
                     ".venv/bin/python", "capeen/__pycache__/cli.cpython-312.pyc", "capeen.egg-info/PKG-INFO",
                     "models/checkpoints/other/model.safetensors", "tests/test_model.py", ".env",
                     "docker/checkpoints/mine/model.safetensors", "docker/smoke_test.py", "artifacts/report.json",
                     "x/y/model.pt", ".pytest_cache/v/cache", "shared/notes.md", "docker-compose.yml"):
        assert ignored(unwanted, rules), unwanted
    assert not ignored("models/checkpoints/default/model.safetensors", rules)
    size = sum((ROOT / f).stat().st_size for f in context)
    assert size < 300 * 2**20, f"build context of {size / 2**20:.0f} MiB: .dockerignore lets too much in"


def test_build_context_makes_a_wheel_with_the_default_checkpoint(tmp_path):
    """What `pip install` does in the image, from exactly the files the build context holds."""
    pytest.importorskip("setuptools")
    context = tmp_path / "context"
    for relative in build_context():
        target = context / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, target)
    wheels = tmp_path / "wheels"
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                             "-w", str(wheels), str(context)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = wheels.glob("capeen-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for package in ("capeen/cli.py", "service/app.py", "models/engine.py", "bandit/__init__.py"):
        assert package in names, package
    assert re.search(r"^capeen\s*=\s*capeen\.cli:console_main$", entry_points, re.M)
    default = sorted(f.relative_to(ROOT).as_posix() for f in (ROOT / "models/checkpoints/default").glob("*")
                     if f.is_file())
    if not default:
        pytest.skip("models/checkpoints/default is not in the repository yet: the image build would fail its check")
    for file in default:
        assert file in names, f"{file} is not in the wheel (package data)"
    assert "models/checkpoints/default/model.safetensors" in names


# ----------------------------------------------------------------------------------------------- health check

class _StubHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        status = {"/readyz": 200, "/loading": 503}.get(self.path, 404)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def _healthcheck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


def test_healthcheck_script():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        assert _healthcheck(env={"CAPEEN_PORT": str(port)}).returncode == 0  # default URL: loopback /readyz
        loading = _healthcheck(f"http://127.0.0.1:{port}/loading")
        assert loading.returncode == 1 and "503" in loading.stdout
        for timeout in ("5s", "0", "nan"):
            bad = _healthcheck(env={"CAPEEN_PORT": str(port), "CAPEEN_HEALTHCHECK_TIMEOUT": timeout})
            assert bad.returncode == 1 and bad.stderr == ""
            assert bad.stdout.strip() == f"CAPEEN_HEALTHCHECK_TIMEOUT must be a number of seconds above 0, got {timeout!r}"
    finally:
        server.shutdown()
        server.server_close()
    refused = _healthcheck(env={"CAPEEN_PORT": str(port)})  # nothing listens there any more
    assert refused.returncode == 1 and "unhealthy" in refused.stdout


# ----------------------------------------------------------------------------------------------- Prometheus config



def _binary(name: str) -> str | None:
    """The Debian package's binary: on PATH, else in /usr/bin."""
    found = shutil.which(name)
    return found or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)


PROMTOOL = _binary("promtool")
PROMETHEUS = _binary("prometheus")
NO_PROMETHEUS = "the Debian package prometheus is not installed (.ci/run installs it: apt-get install prometheus)"


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMETHEUS)
@pytest.mark.parametrize("command", [["check", "config", "prometheus.yml"], ["check", "rules", "rules.yml"],
                                     ["test", "rules", "rules.test.yml"]], ids=" ".join)
def test_promtool(command):
    result = subprocess.run([PROMTOOL, *command], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_the_compose_service(compose):
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "capeen"]
    port = environment(compose["services"]["capeen"])["CAPEEN_PORT"]
    assert job["static_configs"][0]["targets"] == [f"capeen:{port}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["scrape_interval"] == "5s"
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS_DIR / rule_file).is_file(), rule_file


# ----------------------------------------------------------------------------------------------- Grafana

def _panels(dashboard: dict):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries() -> list[tuple[str, str]]:
    """(test id, PromQL) of every query of every dashboard."""
    queries = []
    for path in DASHBOARD_FILES:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        for panel in _panels(dashboard):
            for target in panel.get("targets", []):
                queries.append((f"{dashboard['uid']}/{panel['title']}/{target['refId']}", target["expr"]))
    return queries


def recording_rules() -> list[str]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text(encoding="utf-8"))
    return [rule["record"] for group in rules["groups"] for rule in group["rules"] if "record" in rule]


def test_grafana_provisioning(compose):
    datasources = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    url = urllib.parse.urlsplit(source["url"])
    assert url.hostname in compose["services"] and url.port == 9090
    scrape = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())["scrape_configs"][0]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape
    providers = yaml.safe_load((GRAFANA_DIR / "provisioning/dashboards/capeen.yml").read_text())["providers"]
    for provider in providers:
        folder = host_path(compose["services"]["grafana"], provider["options"]["path"])
        assert folder == (GRAFANA_DIR / "dashboards").resolve()


def test_dashboards_parse_and_use_the_provisioned_data_source():
    uid = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/prometheus.yml").read_text())["datasources"][0]["uid"]
    assert len(DASHBOARD_FILES) >= 1
    uids = set()
    for path in DASHBOARD_FILES:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        assert dashboard["uid"] not in uids
        uids.add(dashboard["uid"])
        assert dashboard["title"] and dashboard.get("id") is None, path.name  # provisioning assigns the id
        ids = [panel["id"] for panel in _panels(dashboard)]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in _panels(dashboard):
            position = panel["gridPos"]
            assert position["x"] + position["w"] <= 24 and position["h"] > 0, (path.name, panel["title"])
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": uid}, (path.name, panel["title"])
            assert panel["targets"], (path.name, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"] == {"type": "prometheus", "uid": uid}
                assert target["expr"].strip()
                metrics = set(re.findall(r"\b(capeen_[a-z_]+|up)\b", target["expr"]))
                for metric in metrics - {"up"}:
                    family = re.sub(r"_(bucket|sum|count)$", "", metric)
                    assert metric in SERVICE_METRICS or family in HISTOGRAMS, f"{panel['title']}: unknown {metric}"
                variables = set(re.findall(r"\$[A-Za-z_]\w*", target["expr"]))  # not label_replace's $1
                assert variables <= {"$__rate_interval", "$__interval", "$__range"}, variables


def test_bar_gauges_of_buckets_show_the_layers_in_order():
    """Grafana draws a bar gauge's series in the order Prometheus sends them, which sorts `le` as text (layer 10
    before layer 2). Only the Heatmap format makes it sort the buckets by number (and take each bucket's own
    share); it reads the number from the legend, so the legend is the bare bucket."""
    bar_gauges = [panel for path in DASHBOARD_FILES for panel in _panels(json.loads(path.read_text(encoding="utf-8")))
                  if panel["type"] == "bargauge" and any("_bucket" in t["expr"] for t in panel["targets"])]
    assert bar_gauges
    for panel in bar_gauges:
        for target in panel["targets"]:
            assert target["format"] == "heatmap" and target["legendFormat"] == "{{le}}", panel["title"]
            assert "histogram_quantile" not in target["expr"], panel["title"]


def test_dashboards_cover_the_issue():
    """The figures issue 6 asks for, each in some panel."""
    panels = {}
    for path in DASHBOARD_FILES:
        for panel in _panels(json.loads(path.read_text(encoding="utf-8"))):
            panels.setdefault(panel["type"], []).extend(t["expr"] for t in panel.get("targets", []))
    everything = " ".join(expr for exprs in panels.values() for expr in exprs)
    assert any("capeen_token_exit_layer_bucket" in e for e in panels["heatmap"]), "exit layer heatmap"
    # a ratio's denominator is kept above 0: an idle service shows no value, not NaN
    assert "sum(rate(capeen_token_exit_layer_sum[$__rate_interval])) / (sum(rate(capeen_token_exit_layer_count" \
           "[$__rate_interval])) > 0)" in everything, "mean exit layer"
    assert "sum(rate(capeen_decoder_layers_full_total[$__rate_interval])) / " \
           "(sum(rate(capeen_decoder_layers_computed_total[$__rate_interval])) > 0)" in everything, "speedup over time"
    for quantile in ("0.5", "0.95", "0.99"):
        # the latency of captions: refusals are answered in milliseconds and would make it look better
        assert f'histogram_quantile({quantile}, sum by (le) (rate(capeen_request_duration_seconds_bucket' \
               f'{{route=\"/caption\", status=~\"200|499|504\"}}' in everything, f"latency p{quantile}"
    for needle in ("capeen_captions_total", "capeen_queue_depth",
                   "capeen_batch_size", "capeen_bandit_threshold", "capeen_bandit_arm_pulls_total",
                   "sum by (kind) (rate(capeen_errors_total"):
        assert needle in everything, needle


# ----------------------------------------------------------------------------------------------- live check

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _wait(what: str, check, timeout: float, processes: dict[str, tuple[subprocess.Popen, Path]]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, (process, log) in processes.items():
            if process.poll() is not None:
                pytest.fail(f"{name} exited with {process.returncode} while waiting for {what}:\n{_tail(log)}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.25)
    logs = "\n".join(f"--- {name}\n{_tail(log)}" for name, (_, log) in processes.items())
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


def _images() -> list[tuple[str, bytes, str]]:
    from PIL import Image, ImageDraw

    files = []
    for index, (fmt, mime) in enumerate((("PNG", "image/png"), ("JPEG", "image/jpeg"), ("PNG", "image/png"))):
        image = Image.new("RGB", (48, 48), (20 * index, 90, 200 - 40 * index))
        ImageDraw.Draw(image).ellipse((8 + 4 * index, 8, 36, 40), fill=(230, 200 - 60 * index, 30))
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        files.append((f"shape{index}.{fmt.lower()}", buffer.getvalue(), mime))
    return files


# Requests the service must refuse, so that the error metrics have series: (route, expected status).
BAD_REQUESTS = ["not_image", "missing_field", "bad_mode", "threshold_not_fixed", "unknown_route"]


@dataclass
class LiveStack:
    capeen_url: str
    prometheus_url: str
    scraping_since: float
    sent: Counter

    def query(self, expr: str) -> list[dict]:
        window = f"{math.ceil(time.time() - self.scraping_since) + 5}s"
        concrete = (expr.replace("$__rate_interval", window).replace("$__range", window)
                    .replace("$__interval", "2s"))
        assert not re.search(r"\$[A-Za-z_]", concrete), concrete  # every Grafana variable replaced
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": concrete,
                                                                              "time": f"{time.time():.3f}"})
        status, body = _get(url, timeout=10)
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", (concrete, answer)
        data = answer["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        assert data["resultType"] == "vector", data
        return data["result"]


def _send_load(base_url: str, seconds: float, min_rounds: int) -> Counter:
    """A few dozen captions in every mode, 4 at a time, plus refused requests, spread over several scrapes."""
    import httpx

    images = _images()
    sent: Counter = Counter()

    def caption(mode: str, image) -> int:
        response = httpx.post(f"{base_url}/caption", files={"image": image}, data={"mode": mode}, timeout=30)
        assert response.status_code == 200, (mode, response.status_code, response.text)
        body = response.json()
        assert len(body["exit_layers"]) == len(body["tokens"])
        return response.status_code

    def batch(first: int) -> int:
        chosen = [images[(first + i) % len(images)] for i in range(3)]
        response = httpx.post(f"{base_url}/caption/batch", files=[("image", image) for image in chosen],
                              data={"mode": "fixed"}, timeout=30)
        assert response.status_code == 200 and response.json()["captioned"] == 3, response.text
        return response.status_code

    def bad(kind: str) -> int:
        if kind == "not_image":
            response = httpx.post(f"{base_url}/caption", files={"image": ("x.png", b"not an image", "image/png")})
        elif kind == "missing_field":
            response = httpx.post(f"{base_url}/caption", files={"mode": (None, b"full")})  # a form with no image
        elif kind == "bad_mode":
            response = httpx.post(f"{base_url}/caption", files={"image": images[0]}, data={"mode": "fastest"})
        elif kind == "threshold_not_fixed":
            response = httpx.post(f"{base_url}/caption", files={"image": images[0]},
                                  data={"mode": "full", "threshold": "0.5"})
        else:
            response = httpx.get(f"{base_url}/no-such-route")
        assert 400 <= response.status_code < 500, (kind, response.status_code, response.text)
        assert set(response.json()) == {"error", "detail"}
        return response.status_code

    started, rounds = time.monotonic(), 0
    with ThreadPoolExecutor(max_workers=4) as pool:
        while rounds < min_rounds or time.monotonic() - started < seconds:
            futures = [(mode, pool.submit(caption, mode, images[(rounds + i) % len(images)]))
                       for i, mode in enumerate(("adaptive", "adaptive", "fixed", "full"))]
            futures.append(("batch", pool.submit(batch, rounds)))
            kind = BAD_REQUESTS[rounds % len(BAD_REQUESTS)]
            futures.append((kind, pool.submit(bad, kind)))
            for name, future in futures:
                future.result()
                sent[name] += 1
            rounds += 1
            time.sleep(0.3)
    return sent


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory):
    if PROMETHEUS is None:
        pytest.skip(NO_PROMETHEUS)
    from tests.conftest import make_tiny_checkpoint

    work = tmp_path_factory.mktemp("deploy-live")
    checkpoint = make_tiny_checkpoint(work / "checkpoint")
    capeen_port, prometheus_port = _free_port(), _free_port()

    # Prometheus: the deployment's own config, pointed at the local service, scraping every second.
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    for job in config["scrape_configs"]:
        job.update(scrape_interval="1s", scrape_timeout="1s")
        port = capeen_port if job["job_name"] == "capeen" else prometheus_port
        job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    for rule_file in config["rule_files"]:
        shutil.copy(PROMETHEUS_DIR / rule_file, work / rule_file)
    (work / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CAPEEN_HOST": "127.0.0.1", "CAPEEN_PORT": str(capeen_port),
           "CAPEEN_CHECKPOINT": str(checkpoint), "CAPEEN_DEVICE": "cpu", "CAPEEN_LOG_LEVEL": "warning",
           "CAPEEN_BANDIT_STATE": str(work / "bandit.json"), "CAPEEN_MAX_WAIT_MS": "20"}
    processes: dict[str, tuple[subprocess.Popen, Path]] = {}
    try:
        for name, command, process_env in (
            ("capeen serve", [sys.executable, "-m", "capeen", "serve"], env),
            ("prometheus", [PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
                            f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prometheus_port}",
                            "--log.level=warn"], {**os.environ, "GOMAXPROCS": "1"}),
        ):
            log = work / f"{name.split()[0]}.log"
            with open(log, "wb") as handle:
                process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=process_env,
                                           cwd=work, start_new_session=True)
            processes[name] = (process, log)

        capeen_url, prometheus_url = f"http://127.0.0.1:{capeen_port}", f"http://127.0.0.1:{prometheus_port}"
        _wait("Prometheus to be ready", lambda: _get(f"{prometheus_url}/-/ready")[0] == 200, 30, processes)
        scraping_since = time.time()
        _wait("capeen serve to be ready", lambda: _get(f"{capeen_url}/readyz")[0] == 200, 90, processes)
        stack = LiveStack(capeen_url, prometheus_url, scraping_since, Counter())

        def target_up() -> bool:
            result = stack.query('up{job="capeen"}')
            return bool(result) and result[0]["value"][1] == "1"

        _wait("Prometheus to scrape capeen", target_up, 20, processes)
        stack.sent = _send_load(capeen_url, seconds=5.0, min_rounds=10)
        on_caption_routes = sum(n for k, n in stack.sent.items() if k != "unknown_route")

        def scraped_everything() -> bool:
            result = stack.query('sum(capeen_requests_total{route=~"/caption|/caption/batch"})')
            return bool(result) and float(result[0]["value"][1]) == on_caption_routes

        _wait("the last requests to be scraped", scraped_everything, 20, processes)
        time.sleep(1.5)  # one more evaluation of the recording rules
        yield stack
    finally:
        for process, _ in processes.values():
            _stop(process)


def test_live_service_exposes_the_metrics(live_stack):
    status, body = _get(f"{live_stack.capeen_url}/metrics")
    assert status == 200
    families = set(re.findall(r"^# TYPE (\S+) (\w+)", body.decode(), re.M))
    names = {name for name, _ in families}
    for metric in SERVICE_METRICS:
        family = metric.removesuffix("_total") if metric.endswith("_total") else metric
        assert metric in names or family in names, f"/metrics has no {metric}"
    for name, kind in families:
        if name in HISTOGRAMS:
            assert kind == "histogram", (name, kind)


def test_live_healthcheck_passes(live_stack):
    port = urllib.parse.urlsplit(live_stack.capeen_url).port
    result = _healthcheck(env={"CAPEEN_PORT": str(port)})
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("expr", [expr for _, expr in dashboard_queries()],
                         ids=[name for name, _ in dashboard_queries()])
def test_dashboard_query_returns_data(live_stack, expr):
    result = live_stack.query(expr)
    assert result, f"no data for {expr}"
    for sample in result:
        value = float(sample["value"][1])
        assert math.isfinite(value), f"{expr}: {sample}"


def test_live_layer_bar_gauge_gets_whole_layers_that_grafana_can_order(live_stack):
    """What Grafana's Heatmap format needs of the bar gauge's answer: a number in each `le`, and cumulative shares
    that grow with it up to 1, so that its per-layer differences are the shares that left at each layer."""
    (expr,) = [expr for name, expr in dashboard_queries() if "/Tokens leaving at each layer/" in name]
    shares = {int(s["metric"]["le"]): float(s["value"][1]) for s in live_stack.query(expr)}
    n_layer = 4  # tests.conftest.tiny_config
    assert sorted(shares) == list(range(1, n_layer + 1))
    cumulative = [shares[layer] for layer in sorted(shares)]
    assert cumulative == sorted(cumulative) and cumulative[-1] == pytest.approx(1.0)


@pytest.mark.parametrize("record", recording_rules())
def test_recording_rule_returns_data(live_stack, record):
    result = live_stack.query(record)
    assert result and all(math.isfinite(float(s["value"][1])) for s in result), (record, result)


def test_live_figures_are_consistent(live_stack):
    """A few values that the load fixes: speedup >= 1, exits within the decoder, every refused request counted."""
    speedup = float(live_stack.query("sum(capeen_decoder_layers_full_total) / "
                                     "sum(capeen_decoder_layers_computed_total)")[0]["value"][1])
    assert speedup >= 1.0
    n_layer = 4  # tests.conftest.tiny_config
    mean_exit = float(live_stack.query("sum(capeen_token_exit_layer_sum) / "
                                       "sum(capeen_token_exit_layer_count)")[0]["value"][1])
    assert 1.0 <= mean_exit <= n_layer
    assert speedup == pytest.approx(n_layer / mean_exit, rel=1e-6)
    errors = {s["metric"]["kind"]: float(s["value"][1]) for s in live_stack.query("capeen_errors_total")}
    sent = live_stack.sent
    assert errors.get("not_image") == sent["not_image"]
    assert errors.get("invalid_request") == sent["missing_field"] + sent["bad_mode"] + sent["threshold_not_fixed"]
    assert errors.get("not_found") == sent["unknown_route"]
    pulls = sum(float(s["value"][1]) for s in live_stack.query("capeen_bandit_arm_pulls_total"))
    assert pulls == live_stack.sent["adaptive"]
    captions = float(live_stack.query("sum(capeen_captions_total)")[0]["value"][1])
    assert captions == sum(sent[mode] for mode in ("adaptive", "fixed", "full")) + 3 * sent["batch"]


# ----------------------------------------------------------------------------------------------- smoke test

SMOKE_TEST = ROOT / "docker" / "smoke_test.py"


def _smoke_test_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("capeen_docker_smoke_test", SMOKE_TEST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_test_checks_hold_for_a_running_service(tmp_path):
    """The uploads and reads the smoke test makes of a container, against `capeen serve`'s app on the shipped
    model: a working service passes them, and the bandit counts exactly the adaptive requests it sent."""
    from types import SimpleNamespace

    from service.settings import Settings
    from tests.test_service import running_server

    smoke = _smoke_test_module()
    assert smoke.DASHBOARDS == {json.loads(path.read_text(encoding="utf-8"))["title"] for path in DASHBOARD_FILES}
    settings = Settings(log_level="warning", bandit_state=tmp_path / "bandit.json", max_wait_ms=5)
    with running_server(settings) as server:
        stack = SimpleNamespace(url=lambda service: server.url)
        smoke.check_captions(stack)
        assert smoke.bandit_rounds(stack) == smoke.ADAPTIVE_REQUESTS
        status, answer = smoke.post_image(f"{server.url}/caption", ROOT / "pyproject.toml", {"mode": "fixed"})
        assert status == 415 and answer["error"] == "not_image", answer


def test_smoke_test_refuses_bad_usage_and_a_missing_docker(tmp_path):
    def smoke(*args: str, path: str = os.environ.get("PATH", "")) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SMOKE_TEST), *args], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PATH": path}, stdin=subprocess.DEVNULL)

    without_capeen = smoke("--services", "prometheus,grafana")
    assert without_capeen.returncode == 2 and "--services takes capeen" in without_capeen.stderr
    missing_override = smoke("--compose-file", str(tmp_path / "nope.yml"))
    assert missing_override.returncode == 2 and "nope.yml: no such file" in missing_override.stderr
    no_docker = smoke("--cpu", path=str(tmp_path))  # an empty folder: no docker on PATH
    assert no_docker.returncode == 2 and no_docker.stdout == ""
    assert no_docker.stderr == "smoke test: docker is not installed (or not on PATH)\n"
