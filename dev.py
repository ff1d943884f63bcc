#!/usr/bin/env python3
"""Set up and run todo-api with nothing but Python >= 3.11.

    python3 dev.py serve [--port 8000 ...]   # the service on the embedded PostgreSQL
    python3 dev.py test  [pytest args ...]   # lint, then the whole test suite
    python3 dev.py todo-api ARGS...          # any other todo-api command (token, migrate, ...)

The first run creates .venv and installs the project into it; later runs reuse it until
pyproject.toml changes.
"""

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")


def ensure_installed() -> None:
    stamp = VENV / ".installed"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted:
        return
    if not (BIN / "python").exists():
        print("creating .venv ...", file=sys.stderr)
        venv.create(VENV, with_pip=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    print("installing todo-api and its test tools into .venv ...", file=sys.stderr)
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[test]"], check=True)
    stamp.write_text(wanted)


def run(*command: str) -> int:
    return subprocess.run(command, cwd=ROOT, check=False).returncode


def main(args: list[str]) -> int:
    if not args or args[0] not in ("serve", "test", "todo-api"):
        print(__doc__, file=sys.stderr)
        return 2
    ensure_installed()
    if args[0] == "serve":
        return run(str(BIN / "todo-api"), *args)
    if args[0] == "todo-api":
        return run(str(BIN / "todo-api"), *args[1:])
    python_sources = ("service", "tests", "db", "dev.py")
    for check in (
        ("ruff", "check", *python_sources),
        ("ruff", "format", "--check", *python_sources),
    ):
        if code := run(str(BIN / check[0]), *check[1:]):
            return code
    return run(str(BIN / "pytest"), *args[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
