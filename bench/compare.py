#!/usr/bin/env python3
"""Paired comparison of service configurations, for measuring levers on a busy machine.

    python3 bench/compare.py --config "workers=2" --config "workers=2 DB_POOL_SIZE=20"

Every configuration is started at once on one database (seeded once, as in run.py); then
the wrk runs take turns, configuration after configuration, round after round (the order
rotates every round), so that a neighbour's load falls on all of them alike. Only the service
being driven does any work meanwhile. Prints, per workload and configuration, the median of the
rounds for req/s, p50, p99 and the service's CPU ms per request, and req/s relative to the
first configuration.

A configuration is space-separated tokens: `workers=N`, `loop=asyncio|uvloop`, `server=granian`,
`http=h11|httptools`, `variant=NAME` (repeatable, see variant_app.py), `tree=PATH` (another
checkout of the project, with its own .venv: `git worktree add /tmp/base <commit>`, then
`python3 -c "import dev; dev.ensure_installed()"` there; compares commits in one run), and any
service setting as `UPPER_CASE=value` (e.g. `DB_PREPARED_STATEMENTS=true`).
"""

import argparse
import contextlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

BENCH = Path(__file__).resolve().parent
PYTHON = BENCH.parent / ".venv" / "bin" / "python"
OUTSIDE_VENV = Path(sys.prefix).resolve() != PYTHON.parent.parent.resolve()
if __name__ == "__main__" and OUTSIDE_VENV and PYTHON.exists():  # as run.py does
    os.execv(str(PYTHON), [str(PYTHON), *sys.argv])  # noqa: S606
sys.path.insert(0, str(BENCH))

import run  # noqa: E402


def checked_tree(tree: Path) -> Path:
    """A checkout whose own .venv imports its own `service` (a copied .venv would not)."""
    python = tree / ".venv" / "bin" / "python"
    if not (tree / ".venv" / "bin" / "todo-api").exists():
        raise SystemExit(f"compare: {tree} has no .venv with todo-api installed")
    where = subprocess.run(  # noqa: S603 (that checkout's own interpreter)
        [str(python), "-c", "import service; print(service.__file__)"],
        cwd="/",
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(where).resolve().is_relative_to(tree):
        raise SystemExit(f"compare: {tree}/.venv imports service from {where}, not from the tree")
    return tree


def parse_config(spec: str) -> run.ServiceConfig:
    config = run.ServiceConfig(workers=2)
    variants: list[str] = []
    for token in spec.split():
        key, _, value = token.partition("=")
        if key == "workers":
            config.workers = int(value)
        elif key in ("loop", "http", "server"):
            setattr(config, key, value)
        elif key == "variant":
            variants.append(value)
        elif key == "tree":
            config.tree = checked_tree(Path(value).resolve())
        elif key.isupper():
            config.env[key] = value
        else:
            raise SystemExit(f"compare: unknown token {token!r}")
    config.variants = tuple(variants)
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="repeatable")
    parser.add_argument("--workloads", default="read,mixed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--server-url", default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    server_url = (
        args.server_url
        or os.environ.get("BENCH_DATABASE_URL")
        or os.environ.get("TEST_DATABASE_URL")
        or run.DEFAULT_SERVER
    )
    workloads = [w for w in args.workloads.split(",") if w]
    configs = [parse_config(spec) for spec in args.config]
    os.environ.pop("TEST_POOLER_URL", None)
    samples: dict[tuple[int, str], list[run.WrkResult]] = {}
    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="todo-api-compare-"))
        stack.callback(shutil.rmtree, workdir, True)
        database = stack.enter_context(run.migrated_database(server_url))
        secret = secrets.token_urlsafe(48)
        users = [
            run.User(f"bench-user-{n}", run.make_token(f"bench-user-{n}", secret=secret, ttl=7200))
            for n in range(1, run.USERS + 1)
        ]
        env = {"DATABASE_URL": database.url, "JWT_SECRET": secret, "APP_DB_ROLE": database.app_role}
        services = []
        for n, config in enumerate(configs):
            run.log(f"starting [{n}] {config.describe()}")
            service = run.Service(config, env, workdir, f"service-{n}")
            stack.callback(service.stop)
            service.wait_ready()
            services.append(service)
        run.seed(services[0].port, users)
        scripts = {w: run.write_lua(workdir / f"{w}.lua", users, w) for w in workloads}
        for service in services:
            run.run_wrk(service.port, scripts[workloads[-1]], "warm-up", args.connections, 2)
        for round_ in range(args.rounds):
            for workload in workloads:
                order = list(range(len(services)))
                shift = round_ % len(order)
                for n in order[shift:] + order[:shift]:
                    run.log(f"round {round_ + 1}: {workload} on [{n}]")
                    result = run.run_wrk(
                        services[n].port,
                        scripts[workload],
                        workload,
                        args.connections,
                        args.duration,
                        service=services[n],
                    )
                    samples.setdefault((n, workload), []).append(result)
        run.log("stopping and dropping the database")
    print_table(configs, workloads, samples)
    if args.json:
        data = {f"{n}:{w}": [asdict(r) for r in results] for (n, w), results in samples.items()}
        args.json.write_text(
            json.dumps({"configs": args.config, "samples": data}, indent=2, default=str)
        )
    return 0


def print_table(
    configs: list[run.ServiceConfig],
    workloads: list[str],
    samples: dict[tuple[int, str], list[run.WrkResult]],
) -> None:
    print(
        f"\n{'workload':<8} {'configuration':<74} {'req/s':>6} {'p50':>6} {'p99':>6}"
        f" {'CPU ms':>6} {'non2xx':>6} {'vs [0]':>7}  req/s per round"
    )
    for workload in workloads:
        reference = statistics.median(r.rps for r in samples[(0, workload)])
        for n, config in enumerate(configs):
            results = samples[(n, workload)]
            rps = statistics.median(r.rps for r in results)
            cpu = statistics.median(r.service_cpu_ms_per_request or 0 for r in results)
            rounds = "/".join(f"{r.rps:.0f}" for r in results)
            print(
                f"{workload:<8} [{n}] {config.describe()[:70]:<70}"
                f" {rps:>6.0f} {statistics.median(r.p50_ms for r in results):>6.1f}"
                f" {statistics.median(r.p99_ms for r in results):>6.1f} {cpu:>6.2f}"
                f" {sum(r.non2xx + r.socket_errors for r in results):>6}"
                f" {rps / reference - 1:>+7.0%}  {rounds}"
            )
    loads = [r.load_before for results in samples.values() for r in results]
    print(f"load average during the runs: {min(loads):.1f} to {max(loads):.1f}")


if __name__ == "__main__":
    run.stop_on_sigterm()
    sys.exit(main())
