"""Onboard every architecture of ``dockyard.generic_architectures`` with ``--weights dummy`` and record the runs.

Each tiny config (built from its transformers config class) is written to a folder and run through the real
CLI, ``dockyard onboard DIR --weights dummy --device cpu --skip features``; the verdicts are read back from
each run's report.json and saved to ``docs/generic-path-runs.json``, which ``dockyard models`` renders as the
generic-path table of docs/supported-models.md. Run from the repository root:

    OMP_NUM_THREADS=1 python scripts/onboard_generic.py [--workdir DIR] [MODEL_TYPE ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from dockyard.generic_architectures import GENERIC_EXAMPLES, tiny_config
from dockyard.supported_models import GENERIC_RUNS

COMMAND = ["onboard", "--weights", "dummy", "--device", "cpu", "--skip", "features"]


def onboard(model_type: str, workdir: Path) -> dict:
    """One onboarding run of ``model_type``'s tiny config → its row of the record."""
    model_dir = workdir / model_type
    model_dir.mkdir(parents=True, exist_ok=True)
    config = tiny_config(model_type)
    config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    (model_dir / "config.json").write_text(json.dumps(config, indent=1))
    out = workdir / "reports" / model_type
    proc = subprocess.run([sys.executable, "-m", "dockyard.cli", COMMAND[0], str(model_dir), *COMMAND[1:],
                           "--out", str(out)], capture_output=True, text=True)
    report = json.loads((out / "report.json").read_text())
    gates = {g["name"]: g for g in report["gates"]}
    levels = gates["equivalence"]["evidence"].get("levels", [])
    return {
        "model_type": model_type,
        "architecture": config["architectures"][0],
        "path": report["path"]["impl"],
        "exit_code": proc.returncode,
        "verdict": report["overall"]["verdict"],
        "gates": {name: g["status"] for name, g in gates.items()},
        "equivalence_levels": len(levels),
        "worst_rel_err": max((lv["rel_err"] or 0.0 for lv in levels), default=None),
        "dummy": gates["dummy"]["summary"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_types", nargs="*", default=sorted(GENERIC_EXAMPLES))
    parser.add_argument("--workdir", default=None, help="where configs and reports go (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dockyard-generic-") as tmp:
        workdir = Path(args.workdir or tmp)
        rows = []
        for model_type in args.model_types:
            rows.append(onboard(model_type, workdir))
            print(json.dumps(rows[-1]), flush=True)
    # Runs of a subset replace their rows of the existing record; the others stay as recorded.
    fresh = {r["model_type"] for r in rows}
    kept = json.loads(GENERIC_RUNS.read_text())["runs"] if GENERIC_RUNS.exists() else []
    rows = sorted([r for r in kept if r["model_type"] not in fresh] + rows, key=lambda r: r["model_type"])
    record = {"date": datetime.date.today().isoformat(), "transformers": transformers.__version__,
              "command": "dockyard " + " ".join(COMMAND[:1] + ["DIR"] + COMMAND[1:]), "runs": rows}
    GENERIC_RUNS.write_text(json.dumps(record, indent=1) + "\n")
    return 0 if all(r["exit_code"] in (0, 3) and r["path"] == "transformers" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
