"""Golden runs: a few short trainings through the command line, recorded so that a refactoring can show that the
same commands give the same parameters (bit for bit) and the same metrics.

    python benchmarks/golden.py record golden-before.json
    python benchmarks/golden.py record golden-after.json
    python benchmarks/golden.py compare golden-before.json golden-after.json

Each case is one ``iwae train`` command line (with ``IWAE_FAST`` as given: ``0`` is the autograd reference path,
unset the fast path), run in a temporary folder. What is kept of a run: the SHA-256 of every tensor of its
``model.safetensors`` and ``checkpoint.safetensors`` (parameters, optimiser state, generator state) and its metrics
without the timings. ``compare`` prints one line per case and run, and exits 1 where anything differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

SMALL = ["--epochs", "2", "--train-limit", "300", "--device", "cpu", "--no-progress"]
CASES: dict[str, tuple[dict[str, str], list[str]]] = {}
for fast_name, env in (("fast", {}), ("reference", {"IWAE_FAST": "0"})):
    for protocol in ("default", "authors"):
        for model in (["--objective", "vae", "--k", "1"], ["--objective", "iwae", "--k", "5", "--estimator", "dreg"]):
            label = f"{fast_name}/{protocol}/{model[1]}"
            CASES[label] = (env, [*model, "--protocol", protocol, *SMALL])
            CASES[f"{label}/seeds"] = (env, [*model, "--protocol", protocol, "--seeds", "0,1", *SMALL])
# A partial last minibatch (310 = 15 * 20 + 10) stopped after one epoch and resumed.
CASES["fast/default/iwae/resumed"] = ({}, ["--k", "5", *SMALL[:2], "--train-limit", "310", *SMALL[4:]])


def tensor_digests(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    with safe_open(str(path), framework="pt") as handle:
        return {
            name: hashlib.sha256(handle.get_tensor(name).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            .hexdigest()[:16]
            for name in sorted(handle.keys())
        }


def metrics(path: Path) -> list[dict]:
    timing = ("seconds", "examples_per_second")
    lines = path.read_text().splitlines() if path.is_file() else []
    return [{key: value for key, value in json.loads(line).items() if key not in timing} for line in lines]


def record_run(run_dir: Path) -> dict:
    return {
        "model": tensor_digests(run_dir / "model.safetensors"),
        "checkpoint": tensor_digests(run_dir / "checkpoint.safetensors"),
        "metrics": metrics(run_dir / "metrics.jsonl"),
    }


def run_case(name: str, env: dict[str, str], args: list[str], work: Path) -> dict:
    out = work / name.replace("/", "-")
    command = [sys.executable, "-m", "iwae", "train", *args, "--out", str(out)]
    environment = {**os.environ, **env}
    if name.endswith("/resumed"):
        subprocess.run([*command, "--max-epochs", "1"], check=True, env=environment, capture_output=True)
        command.append("--resume")
    done = subprocess.run(command, check=True, env=environment, capture_output=True, text=True)
    summaries = [json.loads(line) for line in done.stdout.strip().splitlines()[-1:]]
    summary = summaries[0] if isinstance(summaries[0], list) else [summaries[0]]
    runs = sorted(path.parent for path in out.rglob("config.json"))
    return {
        "gradients": [entry.get("gradients") for entry in summary],
        "runs": {str(run.relative_to(work)): record_run(run) for run in runs},
    }


def record(path: str) -> None:
    result = {}
    with tempfile.TemporaryDirectory() as work:
        for name, (env, args) in CASES.items():
            result[name] = run_case(name, env, args, Path(work))
            print(name, result[name]["gradients"], flush=True)
    Path(path).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


def compare(before_path: str, after_path: str) -> int:
    before, after = json.loads(Path(before_path).read_text()), json.loads(Path(after_path).read_text())
    failures = 0
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if old is None or new is None:
            print(f"{name}: only in {'the second' if old is None else 'the first'}")
            failures += 1
            continue
        for run in sorted(set(old["runs"]) | set(new["runs"])):
            a, b = old["runs"].get(run), new["runs"].get(run)
            parts = [part for part in ("model", "checkpoint", "metrics") if not (a and b and a[part] == b[part])]
            print(f"{name} {run}: {'same' if not parts else 'DIFFERS in ' + ', '.join(parts)}"
                  f" ({old['gradients'][0]} -> {new['gradients'][0]})")  # fmt: skip
            failures += bool(parts)
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "record":
        record(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
