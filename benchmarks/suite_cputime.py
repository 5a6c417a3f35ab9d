"""CPU time of the test suite, test by test: a pytest plugin and its summary.

Wall-clock time on a shared machine says little about what CI's idle 2-core machine will see; the CPU
time a test costs (its process plus the subprocesses it waited for: CLI runs, parallel ranks, the
server) does not depend on how busy the machine is, so it is the proxy this measures. Run the suite
with the plugin, one file of rows per process (xdist workers included), then summarize:

    PYTHONPATH=$PWD DOCKYARD_CPUTIME_OUT=/tmp/suite python -m pytest -q -p benchmarks.suite_cputime ...
    python benchmarks/suite_cputime.py /tmp/suite          # per directory, per worker, slowest tests

A session-scoped subprocess (the server of tests/server) is counted at the test during which it is
reaped. Measure at ``OMP_NUM_THREADS=1`` (xdist workers get it from tests/conftest.py): with more threads
than free cores, OpenMP's spin-waiting inflates CPU time.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import time
from collections.abc import Generator
from pathlib import Path

import pytest

OUT_ENV = "DOCKYARD_CPUTIME_OUT"


def _cpu_seconds() -> tuple[float, float]:
    """(this process, its reaped children) user + system seconds."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    """Time setup + call + teardown of one test and append a row to ``$DOCKYARD_CPUTIME_OUT.<pid>.jsonl``."""
    wall0, (own0, children0) = time.perf_counter(), _cpu_seconds()
    yield
    own1, children1 = _cpu_seconds()
    prefix = os.environ.get(OUT_ENV)
    if prefix:
        row = {"id": item.nodeid, "wall": time.perf_counter() - wall0, "cpu": own1 - own0,
               "child": children1 - children0, "worker": os.environ.get("PYTEST_XDIST_WORKER", "")}
        with open(f"{prefix}.{os.getpid()}.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")


def summarize(prefix: str, top: int) -> str:
    """Totals per directory and per worker, then the ``top`` tests by CPU seconds, as text."""
    rows = [json.loads(line) for path in sorted(Path(prefix).parent.glob(f"{Path(prefix).name}.*.jsonl"))
            for line in path.read_text().splitlines()]
    if not rows:
        raise SystemExit(f"no rows under {prefix}.*.jsonl: run pytest with -p benchmarks.suite_cputime and "
                         f"{OUT_ENV}={prefix}")
    per_dir: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    per_worker: dict[str, float] = collections.defaultdict(float)
    for r in rows:
        parts = r["id"].split("::")[0].split("/")
        key = "/".join(parts[:2]) if len(parts) > 2 else "tests/*.py"
        per_dir[key][0] += 1
        per_dir[key][1] += r["cpu"] + r["child"]
        per_worker[r["worker"] or "(one process)"] += r["cpu"] + r["child"]
    lines = [f"{len(rows)} tests, {sum(r['cpu'] + r['child'] for r in rows):.0f} CPU s in tests; per worker: "
             + ", ".join(f"{w} {s:.0f} s" for w, s in sorted(per_worker.items())),
             "| directory | tests | CPU s |", "|---|---|---|"]
    lines += [f"| {d} | {int(n)} | {s:.1f} |" for d, (n, s) in sorted(per_dir.items())]
    lines.append(f"slowest {top} (CPU s, of which subprocesses):")
    for r in sorted(rows, key=lambda r: -(r["cpu"] + r["child"]))[:top]:
        lines.append(f"  {r['cpu'] + r['child']:6.1f} ({r['child']:5.1f})  {r['id']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefix", help=f"the {OUT_ENV} the suite ran with")
    parser.add_argument("--top", type=int, default=15, help="how many of the slowest tests to list")
    args = parser.parse_args()
    print(summarize(args.prefix, args.top))


if __name__ == "__main__":
    main()
