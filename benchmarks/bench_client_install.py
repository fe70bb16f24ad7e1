"""Client install: the wheel `bridge serve` serves, installed into fresh environments, with `mlflow` vs `mlflow-skinny`.

    python benchmarks/bench_client_install.py [--colab-base VENV] [--variants mlflow,skinny] [--extras yolo]

For each variant: a fresh `python -m venv` (its pip upgraded first, not timed), then a timed
`pip install "<wheel>[extras]"` (plus `mlflow` for the `mlflow` variant: what the client required before; the
`skinny` variant is the wheel's own requirements), its wall and CPU time, the size of what it added (`du` of the
venv's site-packages) and the packages it added (`pip list` of that folder).
Then the installed client runs benchmarks/client_features.py against a `bridge serve --tunnel none` started from
this interpreter, and the server is checked: params, metrics, tags, artifacts, the logged and registered model.

`--colab-base VENV` approximates a Colab runtime: a venv that already holds torch and the libraries Colab ships
(numpy, pandas, matplotlib, scipy, scikit-learn, pyarrow, pillow, opencv, …). Each fresh venv sees it through a .pth
file, so pip counts them as installed and adds only what is missing, as on Colab.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from _common import REPO, BridgeServe, argument_parser, clean_env, print_table, scratch_dir

from bridge.serve.wheel import ClientWheel

VARIANTS = {"mlflow": ["mlflow>=3.5"], "skinny": []}


def _children_cpu_s() -> float:
    """CPU seconds (user + system) of finished child processes: a figure the machine's other load barely moves."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def du_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def fresh_venv(root: Path, colab_base: Path | None) -> Path:
    shutil.rmtree(root, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    subprocess.run([str(root / "bin/pip"), "install", "-q", "--upgrade", "pip"], check=True)
    if colab_base is not None:
        (site_packages(root) / "colab_base.pth").write_text(str(site_packages(colab_base)) + "\n")
    return root


def installed(venv: Path) -> list[str]:
    out = subprocess.run(
        [str(venv / "bin/pip"), "list", "--format=json", "--path", str(site_packages(venv))],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return sorted(p["name"] for p in json.loads(out) if p["name"] != "pip")


def check_features(venv: Path, server: BridgeServe) -> dict:
    experiment, model = f"install-{uuid.uuid4().hex[:8]}", f"install-model-{uuid.uuid4().hex[:8]}"
    env = clean_env(BRIDGE_URL=server.entrance_url, BRIDGE_TOKEN=server.token(), BRIDGE_HOME=str(venv / "home"))
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [str(venv / "bin/python"), str(REPO / "benchmarks/client_features.py"), experiment, model],
        capture_output=True, text=True, env=env, timeout=600, cwd=venv,
    )  # fmt: skip
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        return {"ok": False, "error": (done.stderr or done.stdout)[-2000:]}
    result = json.loads(line[len("RESULT ") :])
    from mlflow import MlflowClient

    client = MlflowClient(server.mlflow_url)
    exp = client.get_experiment_by_name(experiment)
    run = client.search_runs([exp.experiment_id])[0]
    files = {f.path for f in client.list_artifacts(run.info.run_id)} | {
        f.path for f in client.list_artifacts(run.info.run_id, "notes")
    }
    versions = client.search_model_versions(f"name='{model}'")
    checks = {
        "params": run.data.params == {"lr": "0.01", "epochs": "3"},
        "metrics": [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [1.0, 0.5, 1 / 3],
        "tags": run.data.tags.get("stage") == "install-check",
        "artifacts": {"notes", "data", "notes/hello.txt"} <= files,
        "logged model": len(client.search_logged_models([exp.experiment_id])) == 1,
        "registered model": len(versions) == 1,
    }
    result.update(checks=checks, ok=all(checks.values()) and result.get("left_after_flush") == 0)
    return result


def main() -> int:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--colab-base", type=Path, help="a venv holding torch and Colab's usual libraries")
    parser.add_argument("--variants", default="mlflow,skinny")
    parser.add_argument("--extras", default="", help="the wheel's extras, e.g. yolo")
    parser.add_argument("--no-features", action="store_true", help="measure the install only")
    args = parser.parse_args()
    work = scratch_dir("client-install")
    wheel = ClientWheel(work / "wheel-cache")
    built = wheel.build()
    spec = f"bridge[{args.extras}] @ {built.as_uri()}" if args.extras else f"bridge @ {built.as_uri()}"
    print(f"Python {sys.version.split()[0]}; wheel {built.name}, {len(wheel.data or b'') / 1e3:.0f} kB; {spec}")
    server = None
    if not args.no_features:
        server = BridgeServe(work / "serve-home", args=["--tunnel", "none"])
        server.start()
    rows, report = [], {}
    try:
        for variant in args.variants.split(","):
            venv = fresh_venv(work / f"venv-{variant}", args.colab_base)
            before = du_bytes(site_packages(venv))
            before_names = set(installed(venv))
            started, cpu_before = time.perf_counter(), _children_cpu_s()
            done = subprocess.run(
                [str(venv / "bin/pip"), "install", "-q", spec, *VARIANTS[variant]],
                capture_output=True, text=True, env={**os.environ, "PIP_NO_CACHE_DIR": "1"},
            )  # fmt: skip
            seconds, cpu_s = time.perf_counter() - started, _children_cpu_s() - cpu_before
            if done.returncode != 0:
                print(done.stderr[-3000:])
                return 1
            added = sorted(set(installed(venv)) - before_names)
            size = du_bytes(site_packages(venv)) - before
            features = check_features(venv, server) if server is not None else {"ok": None}
            report[variant] = {
                "seconds": seconds,
                "cpu_s": cpu_s,
                "bytes": size,
                "packages": added,
                "features": features,
            }
            has_mlflow = "mlflow" in added
            rows.append(
                (variant, f"{seconds:.1f} s", f"{cpu_s:.1f} s", f"{size / 1e6:.0f} MB", len(added),
                 "yes" if has_mlflow else "no", {True: "all pass", False: "FAIL", None: "-"}[features.get("ok")])
            )  # fmt: skip
            if features.get("ok") is False:
                print(json.dumps(features, indent=1)[-3000:])
    finally:
        if server is not None:
            server.stop()
    where = f"Colab-like venv over {args.colab_base}" if args.colab_base else "fresh venv"
    print_table(
        f"Client install ({spec.split(' @ ')[0]}, {where}, Python {sys.version.split()[0]})",
        ("variant", "pip install", "pip CPU", "site-packages", "packages", "full mlflow", "client features"),
        rows,
    )
    for variant, data in report.items():
        print(f"{variant}: {', '.join(data['packages'])}")
        print(f"{variant} features: {json.dumps(data['features'])}")
    out = REPO / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    name = re.sub(r"\W+", "-", f"client-install-{args.extras or 'base'}-{'colab' if args.colab_base else 'fresh'}")
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
