"""Refresh the lock files: the exact version of every package, for Python 3.11 on Linux x86_64.

    python tools/lock.py

Each lock is what pip resolves from pyproject.toml's ranges in a new, empty virtual environment:

    requirements/run.lock   the package itself: what the README's first command installs
    requirements/dev.lock   plus the extras hf, ja and chips and the test tools: what the tests use

The README's commands and .ci/run install from these files (`pip install -r ...`), so every
machine gets the same environment. Run this after changing a dependency in pyproject.toml (or to
move to newer releases), check that the tests pass, and commit the locks with the change.
A plain `pip install kinoe_jax` still resolves the loose ranges, for library users.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCKS = {"run": "", "dev": "[dev]"}
TARGET = ("3.11", "Linux", "x86_64")


def resolve(extras: str) -> list[str]:
    """`pip freeze` of a fresh environment holding the project with `extras` (the project left out)."""
    with tempfile.TemporaryDirectory(prefix="kinoe_lock_") as tmp:
        venv = os.path.join(tmp, "venv")
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        pip = [os.path.join(venv, "bin", "python"), "-m", "pip"]
        subprocess.run(pip + ["install", "--quiet", "--upgrade", "pip"], check=True)
        subprocess.run(pip + ["install", "--quiet", f"{REPO}{extras}"], check=True)
        frozen = subprocess.run(pip + ["freeze", "--all"], check=True, capture_output=True, text=True).stdout
    return sorted((line for line in frozen.splitlines()
                   if line.strip() and not line.lower().startswith(("kinoe_jax", "kinoe-jax"))), key=str.lower)


def write(name: str, lines: list[str], extras: str) -> str:
    path = os.path.join(REPO, "requirements", f"{name}.lock")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    header = [f"# kinoe_jax{extras or ''}: every package, exactly as pip resolved pyproject.toml's ranges",
              f"# for Python {TARGET[0]} on {TARGET[1]} {TARGET[2]} ({time.strftime('%Y-%m-%d')}).",
              "# Regenerate with `python tools/lock.py`; do not edit by hand."]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(header + lines) + "\n")
    os.replace(tmp, path)
    return path


def main() -> int:
    here = (f"{sys.version_info.major}.{sys.version_info.minor}", platform.system(), platform.machine())
    if here != TARGET:
        print(f"lock.py: the locks are for Python {TARGET[0]} on {TARGET[1]} {TARGET[2]}; this is "
              f"Python {here[0]} on {here[1]} {here[2]}", file=sys.stderr)
        return 2
    for name, extras in LOCKS.items():
        started = time.time()
        lines = resolve(extras)
        print(f"{write(name, lines, extras)}: {len(lines)} packages ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
