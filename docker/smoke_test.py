#!/usr/bin/env python3
"""Build and start the compose stack on this Docker host, check it end to end, and take it down again.

    python docker/smoke_test.py                 # GPU host: the images as `docker compose up` builds them
    python docker/smoke_test.py --cpu           # no GPU: with docker-compose.cpu.yml

It runs as a compose project of its own (`capeen-smoke`: its own containers and volumes, ports on 127.0.0.1
that are free), so a stack already running from this folder is left alone. It checks what a user of the
deployment relies on:

1. the images build and every service turns healthy (`docker compose up --build --wait`);
2. `POST /caption` captions each of `examples/*.png`, and `mode=adaptive` requests teach the bandit;
3. Prometheus scrapes the service and records the speedup (`capeen:speedup:rate1m`, above 1);
4. Grafana is up and lists both provisioned dashboards to an anonymous viewer;
5. what the bandit learnt survives a restart of the service (its snapshot on the state volume).

`--services capeen,prometheus` leaves Grafana out (and so on); `--compose-file FILE` adds an override, e.g.
one that points the build at a mirrored base image (`args: {PYTHON_IMAGE: ...}`) on a host without Docker Hub.
Standard library only. Exit status 0 when every check passed, 1 otherwise (the failing service's last log
lines are printed), 2 for bad usage or a missing Docker.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("capeen", "prometheus", "grafana")
MIN_COMPOSE = (2, 24, 4)  # BuildKit builds, `!reset` in the CPU override, `up --wait`
DASHBOARDS = {"CAPEEN — early exit", "CAPEEN — serving"}
ADAPTIVE_REQUESTS = 24


class SmokeFailure(Exception):
    """A check failed: the message says which and what was seen."""


class NoDocker(Exception):
    """Docker or a recent enough Docker Compose is missing: nothing was started."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 30) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (loopback URLs)
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError as error:  # refused or reset while a container starts or stops
        return 0, str(error).encode()


def get_json(url: str) -> tuple[int, object]:
    status, body = http("GET", url)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def post_image(url: str, image: Path, fields: dict[str, str]) -> tuple[int, object]:
    """`POST` one image as the multipart field `image`, with form fields beside it; the JSON answer."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{image.name}"\r\n'
                 f"Content-Type: image/png\r\n\r\n".encode() + image.read_bytes() + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    status, answer = http("POST", url, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        return status, json.loads(answer)
    except ValueError:
        return status, answer.decode(errors="replace")


def wait_for(what: str, check, timeout: float, every: float = 2.0):
    """Poll `check()` until it returns something true (returned) or `timeout` seconds pass (SmokeFailure)."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise SmokeFailure(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)


def compose_version() -> tuple[int, ...]:
    try:
        result = subprocess.run(["docker", "compose", "version", "--short"], capture_output=True, text=True,
                                timeout=30)
    except FileNotFoundError:
        raise NoDocker("docker is not installed (or not on PATH)") from None
    found = re.match(r"v?(\d+)\.(\d+)\.(\d+)", result.stdout.strip())
    if result.returncode != 0 or not found:
        raise NoDocker(f"`docker compose` is not available: {(result.stderr or result.stdout).strip()}")
    return tuple(int(n) for n in found.groups())


class Stack:
    """One compose project, with its published ports on 127.0.0.1."""

    def __init__(self, project: str, files: list[Path], services: list[str]) -> None:
        self.project, self.files, self.services = project, files, services
        self.ports = {"capeen": free_port(), "prometheus": free_port(), "grafana": free_port()}
        self.env = {"CAPEEN_PUBLISH_PORT": f"127.0.0.1:{self.ports['capeen']}",
                    "PROMETHEUS_PUBLISH_PORT": f"127.0.0.1:{self.ports['prometheus']}",
                    "GRAFANA_PUBLISH_PORT": f"127.0.0.1:{self.ports['grafana']}"}

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def compose(self, *args: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
        command = ["docker", "compose", "--project-name", self.project, "--project-directory", str(ROOT)]
        for file in self.files:
            command += ["-f", str(file)]
        result = subprocess.run(command + list(args), env={**os.environ, **self.env}, cwd=ROOT, timeout=timeout)
        if check and result.returncode != 0:
            raise SmokeFailure(f"`docker compose {' '.join(args)}` exited with status {result.returncode}")
        return result

    def logs(self) -> None:
        self.compose("logs", "--no-color", "--tail", "40", *self.services, check=False, timeout=60)


def check_captions(stack: Stack) -> None:
    url = stack.url("capeen")
    examples = sorted((ROOT / "examples").glob("*.png"))
    if not examples:
        raise SmokeFailure("no examples/*.png to caption")
    for image in examples:
        status, answer = post_image(f"{url}/caption", image, {"mode": "fixed"})
        if status != 200 or not isinstance(answer, dict) or not str(answer.get("caption", "")).strip():
            raise SmokeFailure(f"POST /caption with {image.name}: HTTP {status}: {answer}")
        print(f"ok  POST /caption {image.name}: {answer['caption']!r} "
              f"(mean exit layer {answer['mean_exit_layer']:.1f}, {answer['timings']['total_ms']:.0f} ms)")
    for i in range(ADAPTIVE_REQUESTS):
        status, answer = post_image(f"{url}/caption", examples[i % len(examples)], {"mode": "adaptive"})
        if status != 200:
            raise SmokeFailure(f"POST /caption mode=adaptive: HTTP {status}: {answer}")
    print(f"ok  {ADAPTIVE_REQUESTS} adaptive requests answered")


def bandit_rounds(stack: Stack) -> int:
    status, answer = get_json(f"{stack.url('capeen')}/v1/bandit")
    if status != 200 or not isinstance(answer, dict):
        raise SmokeFailure(f"GET /v1/bandit: HTTP {status}: {answer}")
    return int(answer["rounds"])


def prometheus_value(stack: Stack, query: str) -> float | None:
    status, answer = get_json(f"{stack.url('prometheus')}/api/v1/query?{urllib.parse.urlencode({'query': query})}")
    if status != 200 or not isinstance(answer, dict) or not answer.get("data", {}).get("result"):
        return None
    return float(answer["data"]["result"][0]["value"][1])


def check_prometheus(stack: Stack) -> None:
    wait_for("Prometheus to scrape capeen", lambda: prometheus_value(stack, 'up{job="capeen"}') == 1, 60)
    print("ok  Prometheus scrapes capeen")
    speedup = wait_for("Prometheus to record capeen:speedup:rate1m",
                       lambda: prometheus_value(stack, "capeen:speedup:rate1m"), 120)
    if not speedup > 1:
        raise SmokeFailure(f"capeen:speedup:rate1m is {speedup}: early exit saved no decoder layers")
    print(f"ok  Prometheus records the speedup: capeen:speedup:rate1m = {speedup:.2f}")


def check_grafana(stack: Stack) -> None:
    url = stack.url("grafana")
    status, health = get_json(f"{url}/api/health")
    if status != 200 or not isinstance(health, dict) or health.get("database") != "ok":
        raise SmokeFailure(f"Grafana /api/health: HTTP {status}: {health}")

    def titles():
        status, found = get_json(f"{url}/api/search?type=dash-db")
        names = {d.get("title") for d in found} if status == 200 and isinstance(found, list) else set()
        return names if DASHBOARDS <= names else None

    wait_for(f"Grafana to list the dashboards {sorted(DASHBOARDS)}", titles, 60)
    print(f"ok  Grafana {health.get('version', '')} lists {', '.join(sorted(DASHBOARDS))} to an anonymous viewer")


def check_restart_keeps_bandit(stack: Stack, timeout: float) -> None:
    before = bandit_rounds(stack)
    if before < ADAPTIVE_REQUESTS:
        raise SmokeFailure(f"the bandit counts {before} rounds after {ADAPTIVE_REQUESTS} adaptive requests")
    stack.compose("restart", "capeen", timeout=timeout)
    wait_for("capeen to be ready after the restart",
             lambda: http("GET", f"{stack.url('capeen')}/readyz", timeout=5)[0] == 200, timeout)
    after = bandit_rounds(stack)
    if after != before:
        raise SmokeFailure(f"the bandit counted {before} rounds before a restart and {after} after it")
    print(f"ok  the bandit's {after} rounds survive a restart (snapshot on the state volume)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="add docker-compose.cpu.yml (hosts without a GPU)")
    parser.add_argument("--compose-file", "-f", action="append", type=Path, default=[], metavar="FILE",
                        help="a further compose override (repeatable)")
    parser.add_argument("--services", default=",".join(SERVICES),
                        help=f"services to start and check, comma-separated (default {','.join(SERVICES)})")
    parser.add_argument("--project", default="capeen-smoke", help="compose project name (default capeen-smoke)")
    parser.add_argument("--timeout", type=float, default=900,
                        help="seconds for the build and start, and for each later wait (default 900)")
    parser.add_argument("--keep", action="store_true", help="leave the stack running (and its volumes) at the end")
    args = parser.parse_args(argv)
    services = [s for s in (s.strip() for s in args.services.split(",")) if s]
    unknown = sorted(set(services) - set(SERVICES))
    if unknown or "capeen" not in services:
        parser.error(f"--services takes capeen and any of prometheus, grafana (got {args.services!r})")
    for file in args.compose_file:
        if not file.is_file():
            parser.error(f"--compose-file {file}: no such file")
    try:
        version = compose_version()
        if version < MIN_COMPOSE:
            raise NoDocker(f"Docker Compose {'.'.join(map(str, version))} is too old; "
                           f"{'.'.join(map(str, MIN_COMPOSE))} or later is needed")
    except NoDocker as missing:
        print(f"smoke test: {missing}", file=sys.stderr)
        return 2

    files = [ROOT / "docker-compose.yml"] + ([ROOT / "docker-compose.cpu.yml"] if args.cpu else [])
    stack = Stack(args.project, files + [f.resolve() for f in args.compose_file], services)
    started = time.monotonic()
    try:
        stack.compose("up", "--detach", "--build", "--wait", "--wait-timeout", str(int(args.timeout)), *services,
                      timeout=args.timeout + 60)
        print(f"ok  {', '.join(services)} built, started and healthy in {time.monotonic() - started:.0f} s")
        check_captions(stack)
        if "prometheus" in services:
            check_prometheus(stack)
        if "grafana" in services:
            check_grafana(stack)
        check_restart_keeps_bandit(stack, args.timeout)
    except (SmokeFailure, subprocess.TimeoutExpired) as failure:
        stack.logs()
        print(f"smoke test failed: {failure}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            stack.compose("down", "--volumes", "--remove-orphans", check=False, timeout=180)
    print(f"smoke test passed in {time.monotonic() - started:.0f} s"
          + (f" (left running: {stack.url('capeen')})" if args.keep else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
