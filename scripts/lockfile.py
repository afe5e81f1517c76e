"""The lock files under requirements/: write one from a pip resolution, check or sync a venv against one.

Stdlib only: it runs inside a venv before (sync) and after (check) the project is installed.

    python scripts/lockfile.py write REPORT.json LOCK --source "cpu,train,dev,loadtest"
    python scripts/lockfile.py sync LOCK     # uninstall what the venv holds beyond the lock
    python scripts/lockfile.py check LOCK    # exit 1, with the differences, unless the venv equals the lock
    python scripts/lockfile.py diff OLD NEW  # which versions moved between two locks
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# The installer itself is not part of what the project runs on; the project is installed from the
# working tree, not from the lock.
NOT_LOCKED = {"pip", "dare-serve"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def canonical(name: str) -> str:
    """PEP 503 normalised name: `Foo_Bar.baz` and `foo-bar-baz` are the same distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    if not pins:
        raise SystemExit(f"{path}: no `name==version` lines")
    return pins


def installed() -> dict[str, str]:
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[canonical(name)] = dist.version
    return {name: version for name, version in found.items() if name not in NOT_LOCKED}


def write(report_path: Path, lock_path: Path, source: str) -> None:
    """A hash-pinned requirements file from `pip install --dry-run --report`'s resolution."""
    report = json.loads(report_path.read_text())
    env = report["environment"]
    lines = [
        "# The exact set `scripts/test` and CI install (pip install --no-deps --require-hashes -r THIS).",
        f"# Resolved by scripts/upgrade-deps from pyproject.toml, extras: {source}",
        f"# for {env['implementation_name']} {env['python_version']} on {env['sys_platform']} "
        f"{env['platform_machine']}. Do not edit by hand: rerun scripts/upgrade-deps.",
    ]
    entries = []
    for item in report["install"]:
        info = item["download_info"]
        if "dir_info" in info:  # the project's own working tree
            continue
        name, version = canonical(item["metadata"]["name"]), item["metadata"]["version"]
        hashes = info.get("archive_info", {}).get("hashes", {})
        if "sha256" not in hashes:
            raise SystemExit(f"{name} {version}: pip reported no sha256 for {info.get('url')}")
        entries.append((name, version, hashes["sha256"]))
    for name, version, sha in sorted(entries):
        lines.append(f"{name}=={version} \\\n    --hash=sha256:{sha}")
    lock_path.write_text("\n".join(lines) + "\n")
    print(f"wrote {lock_path}: {len(entries)} packages")


def sync(lock_path: Path) -> None:
    extra = sorted(set(installed()) - set(read_lock(lock_path)))
    if extra:
        print(f"[setup] removing what {lock_path.name} does not list: {' '.join(extra)}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "--yes", "--quiet", *extra], check=True)


def differences(want: dict[str, str], have: dict[str, str]) -> list[str]:
    out = []
    for name in sorted(set(want) | set(have)):
        if name not in have:
            out.append(f"  missing   {name}=={want[name]}")
        elif name not in want:
            out.append(f"  unlocked  {name}=={have[name]}")
        elif want[name] != have[name]:
            out.append(f"  differs   {name}: lock {want[name]}, installed {have[name]}")
    return out


def check(lock_path: Path) -> int:
    diff = differences(read_lock(lock_path), installed())
    if diff:
        print(f"the environment at {sys.prefix} differs from {lock_path}:", file=sys.stderr)
        print("\n".join(diff), file=sys.stderr)
        print("rebuild it: rm -rf .venv, then rerun the script", file=sys.stderr)
        return 1
    return 0


def diff_locks(old_path: Path, new_path: Path) -> None:
    old, new = read_lock(old_path), read_lock(new_path)
    moved = [f"  {n}: {old[n]} -> {new[n]}" for n in sorted(set(old) & set(new)) if old[n] != new[n]]
    added = [f"  + {n}=={new[n]}" for n in sorted(set(new) - set(old))]
    removed = [f"  - {n}=={old[n]}" for n in sorted(set(old) - set(new))]
    print(f"{new_path.name}: {len(moved)} moved, {len(added)} added, {len(removed)} removed")
    for line in moved + added + removed:
        print(line)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("report", type=Path)
    w.add_argument("lock", type=Path)
    w.add_argument("--source", required=True)
    sub.add_parser("sync").add_argument("lock", type=Path)
    sub.add_parser("check").add_argument("lock", type=Path)
    d = sub.add_parser("diff")
    d.add_argument("old", type=Path)
    d.add_argument("new", type=Path)
    args = parser.parse_args()
    if args.command == "write":
        write(args.report, args.lock, args.source)
    elif args.command == "sync":
        sync(args.lock)
    elif args.command == "check":
        return check(args.lock)
    else:
        diff_locks(args.old, args.new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
