"""Run metadata as MLflow tags: source code version, where and on what the training ran, library versions."""

from __future__ import annotations

import functools
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import bridge

GIT_TIMEOUT_S = 5.0
#: Colab's kernel lists its notebook session (with the notebook's title) on this port of the VM.
COLAB_SESSIONS_PORT = 9000
COLAB_TIMEOUT_S = 1.0


def utc_now() -> str:
    """Now as an ISO-8601 UTC timestamp (second precision)."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def detect_platform() -> str:
    """'colab', 'kaggle' or 'local'."""
    if "google.colab" in sys.modules or os.environ.get("COLAB_RELEASE_TAG") or os.environ.get("COLAB_GPU"):
        return "colab"
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        return "kaggle"
    return "local"


@functools.lru_cache(maxsize=1)
def colab_notebook_name() -> str:
    """The title of the Colab notebook this kernel runs ('' when it cannot be told within a second)."""
    import json
    import urllib.request

    host = os.environ.get("COLAB_JUPYTER_IP") or socket.gethostbyname(socket.gethostname())
    port = os.environ.get("KMP_TARGET_PORT") or COLAB_SESSIONS_PORT
    try:  # the VM's own Jupyter server, not the internet: nothing leaves the runtime
        with urllib.request.urlopen(f"http://{host}:{port}/api/sessions", timeout=COLAB_TIMEOUT_S) as resp:
            sessions = json.loads(resp.read())
        return str(sessions[0].get("name") or "") if sessions else ""
    except Exception:
        return ""


def source_of_training() -> tuple[str, str]:
    """(kind, path) of the code that runs the training: ('script', file), ('notebook', path) or ('interactive', '')."""
    main = sys.modules.get("__main__")
    vsc = getattr(main, "__vsc_ipynb_file__", None)
    if vsc:
        return "notebook", str(vsc)
    if os.environ.get("JPY_SESSION_NAME"):  # Jupyter server >= 2 names the notebook here
        return "notebook", os.environ["JPY_SESSION_NAME"]
    if detect_platform() == "colab":
        return "notebook", colab_notebook_name()
    if "ipykernel" in sys.modules:
        return "notebook", ""
    file = getattr(main, "__file__", None)
    if file:
        path = Path(file).resolve()
        # `python -m pkg` runs <pkg>/__main__.py: name the module, the file is still the code that ran
        return "script", str(path)
    return "interactive", ""


def mlflow_source_tags() -> dict[str, str]:
    """MLflow's `mlflow.source.name/type` (the UI's Source column): the notebook or script that trains.

    MLflow would name `sys.argv[0]`, which is `bridge` for the CLI and the kernel launcher in a notebook.
    """
    kind, path = source_of_training()
    if kind == "notebook":
        return {"mlflow.source.name": path or "notebook", "mlflow.source.type": "NOTEBOOK"}
    if kind == "script" and Path(path).name == "bridge" and len(sys.argv) > 1:  # the `bridge` console script
        return {"mlflow.source.name": f"bridge {sys.argv[1]}", "mlflow.source.type": "LOCAL"}
    if kind == "script":
        return {"mlflow.source.name": path, "mlflow.source.type": "LOCAL"}
    return {"mlflow.source.name": "interactive", "mlflow.source.type": "LOCAL"}


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        proc = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},  # a status check must not take the index lock
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_info(where: Path) -> dict[str, str]:
    """Commit, branch, dirty flag and remote of the repository holding `where`; empty when it is not in one."""
    folder = where if where.is_dir() else where.parent
    if not folder.exists():
        return {}
    commit = _git(["rev-parse", "HEAD"], folder)
    if not commit:
        return {}
    tags = {"git.commit": commit}
    branch = _git(["rev-parse", "--abbrev-ref", "HEAD"], folder)
    if branch:
        tags["git.branch"] = branch
    status = _git(["status", "--porcelain", "--untracked-files=no"], folder)
    if status is not None:
        tags["git.dirty"] = "true" if status else "false"
    root = _git(["rev-parse", "--show-toplevel"], folder)
    if root:
        tags["git.root"] = root
    remote = _git(["config", "--get", "remote.origin.url"], folder)
    # MLflow's UI shows these three reserved tags on the run page.
    tags["mlflow.source.git.commit"] = commit
    if branch:
        tags["mlflow.source.git.branch"] = branch
    if remote and "@" not in remote.split("//", 1)[-1].split("/", 1)[0]:  # never log credentials in a remote URL
        tags["mlflow.source.git.repoURL"] = remote
    return tags


def gpu_info() -> dict[str, str]:
    """GPU name and count, CUDA and cuDNN versions as torch sees them; 'none' without a GPU."""
    try:
        import torch
    except ImportError:
        return {}
    tags = {"version.torch": torch.__version__, "version.cuda": str(torch.version.cuda or "none")}
    try:
        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
            tags["gpu.name"] = ", ".join(names)
            tags["gpu.count"] = str(count)
            cudnn = torch.backends.cudnn.version()
            if cudnn:
                tags["version.cudnn"] = str(cudnn)
        else:
            tags["gpu.name"] = "none"
            tags["gpu.count"] = "0"
    except Exception:  # a broken driver must not stop tracking
        tags.setdefault("gpu.name", "unknown")
    return tags


def run_tags() -> dict[str, str]:
    """All metadata tags of a run starting now, from this process."""
    kind, path = source_of_training()
    tags = {
        "source.kind": kind,
        "host": socket.gethostname(),
        "platform": detect_platform(),
        "os": platform.platform(),
        "version.python": platform.python_version(),
        "version.bridge": bridge.__version__,
    }
    if path:
        tags["source.file"] = path
    tags.update(mlflow_source_tags())
    try:
        import mlflow

        tags["version.mlflow"] = mlflow.__version__
    except ImportError:
        pass
    try:
        import ultralytics

        tags["version.ultralytics"] = ultralytics.__version__
    except ImportError:
        pass
    tags.update(gpu_info())
    # The training code's repository: the script's, else the working directory's (notebooks, `python -c`, pytest).
    git = git_info(Path(path).parent) if kind == "script" and path else {}
    tags.update(git or git_info(Path.cwd()))
    return tags
