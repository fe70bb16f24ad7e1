"""The client wheel `bridge serve` hands out: the very bridge it runs, built once, cached, served by the entrance.

A notebook installs it with `%pip install "bridge[yolo] @ <URL>/bridge/client/bridge-<version>-py3-none-any.whl"`, so
Colab runs the workstation's version and nothing has to be published anywhere first.

    source checkout ──▶ copy (package, pyproject, README) ──▶ `pip wheel` ──▶ cache/<version>-<hash>/<name>.whl
    installed wheel ──▶ repacked from its installed files and metadata ───────▶ (same cache)

The cache key is the version and a hash of the sources, so an edited checkout gets a new wheel and an unchanged one
is never rebuilt. Only files of the `bridge` package and its metadata go in: no data folder, no config, no secret.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import bridge

log = logging.getLogger(__name__)

#: Where the entrance serves the wheel; the file name follows PEP 427, which pip requires of a direct URL.
PATH_PREFIX = "/bridge/client/"
#: How long a `pip wheel` of the checkout may take (a few seconds normally).
BUILD_TIMEOUT_S = 300.0
#: The zip timestamp of every file in a built wheel (1980-01-01, the earliest a zip can hold).
SOURCE_DATE_EPOCH = 315532800
#: What a checkout contributes besides the package itself (the README is the wheel's long description).
_PROJECT_FILES = ("pyproject.toml", "README.md", "LICENSE")
_SKIPPED_PARTS = {"__pycache__"}
_SKIPPED_SUFFIXES = (".pyc", ".pyo")


def wheel_name(version: str = bridge.__version__) -> str:
    """The PEP 427 file name of bridge's pure-Python wheel at `version`."""
    return "bridge-" + re.sub(r"[^\w\d.]+", "_", version) + "-py3-none-any.whl"


def public_path(version: str = bridge.__version__) -> str:
    """The entrance path of the client wheel at `version`."""
    return PATH_PREFIX + wheel_name(version)


def source_checkout() -> Path | None:
    """The project folder when bridge runs from a checkout (editable install or PYTHONPATH), else None."""
    root = Path(bridge.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    try:
        text = pyproject.read_text()
    except OSError:
        return None
    return root if re.search(r'^name\s*=\s*"bridge"\s*$', text, re.MULTILINE) else None


def _package_files(root: Path) -> list[Path]:
    """The checkout's files that go into the wheel, relative to `root`, sorted."""
    files = [Path(name) for name in _PROJECT_FILES if (root / name).is_file()]
    for path in sorted((root / "bridge").rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not _SKIPPED_PARTS.intersection(rel.parts) and not path.name.endswith(_SKIPPED_SUFFIXES):
            files.append(rel)
    return files


def fingerprint(root: Path) -> str:
    """A hash of every file a wheel of the checkout at `root` is built from (names and contents)."""
    digest = hashlib.sha256()
    for rel in _package_files(root):
        digest.update(rel.as_posix().encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return digest.hexdigest()


def _installed_fingerprint(dist: metadata.Distribution) -> str:
    return hashlib.sha256((dist.read_text("RECORD") or "").encode()).hexdigest()


def build_requirements_met(pyproject: Path) -> bool:
    """True when `[build-system] requires` is installed in this environment (e.g. not a venv's old setuptools)."""
    from packaging.requirements import Requirement

    try:
        tomllib = importlib.import_module("tomllib")  # by name: mypy checks this module as Python 3.10
    except ModuleNotFoundError:  # Python 3.10: let pip build in isolation
        return False

    try:
        requires = tomllib.loads(pyproject.read_text()).get("build-system", {}).get("requires", [])
    except (OSError, ValueError):
        return False
    for text in requires:
        requirement = Requirement(text)
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            return False
        if not requirement.specifier.contains(installed, prereleases=True):
            return False
    return True


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop a build: pip and the backend it started, then reap pip."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone
    proc.wait()


def build_from_checkout(root: Path, out_dir: Path, on_start: Callable[[subprocess.Popen], None] | None = None) -> Path:
    """`pip wheel` a copy of the checkout's package (never the checkout itself: a stale build/ folder there would
    end up in the wheel) into `out_dir`; returns the wheel. Raises `WheelError` with pip's output. `on_start` is
    given pip's process (for `ClientWheel.stop()`)."""
    with tempfile.TemporaryDirectory(prefix="bridge-wheel-src-") as tmp:
        src = Path(tmp) / "src"
        for rel in _package_files(root):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, src / rel)
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--quiet", "-w", str(out_dir)]
        if build_requirements_met(root / "pyproject.toml"):  # the build backend is here: no index needed
            command.append("--no-build-isolation")
        else:
            del command[command.index("--no-index")]  # pip fetches the backend into an isolated build
        # Fixed zip timestamps: the same source makes the same bytes (and ETag) on every build and machine.
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)}
        try:
            # A session of its own, so stopping `bridge serve` stops pip and its build backend together (`stop()`).
            proc = subprocess.Popen(
                [*command, str(src)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            raise WheelError(f"pip wheel did not run: {exc}") from None
        if on_start is not None:
            on_start(proc)
        try:
            output, _ = proc.communicate(timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise WheelError(f"pip wheel took more than {BUILD_TIMEOUT_S:.0f} s") from None
        if proc.returncode != 0:
            raise WheelError(f"pip wheel failed ({proc.returncode}): {(output or '').strip()[-800:]}")
    built = sorted(out_dir.glob("bridge-*.whl"))
    if not built:
        raise WheelError(f"pip wheel wrote no wheel into {out_dir}")
    return built[0]


def repack_installed(dist: metadata.Distribution, target: Path) -> Path:
    """Rebuild the wheel an installed (non-editable) bridge came from, from its installed files and metadata."""
    skip = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    info_dir = None
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as wheel:
        for file in dist.files or ():
            name = file.as_posix()
            if name.startswith(("..", "/")) or "__pycache__" in file.parts or name.endswith(_SKIPPED_SUFFIXES):
                continue  # scripts in bin/ are made by the installer; byte code by the interpreter
            if file.parts[0].endswith(".dist-info"):
                info_dir = file.parts[0]
                if file.name in skip:
                    continue
            elif file.parts[0] != "bridge":
                continue
            data = Path(str(file.locate())).read_bytes()
            _write(wheel, name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            writer.writerow((name, f"sha256={digest}", len(data)))
        if info_dir is None:
            raise WheelError("the installed bridge has no .dist-info listing its files")
        writer.writerow((f"{info_dir}/RECORD", "", ""))
        _write(wheel, f"{info_dir}/RECORD", record.getvalue().encode())
    return target


def _write(wheel: zipfile.ZipFile, name: str, data: bytes) -> None:
    """One member with the fixed timestamp and mode of a built wheel, so a repack is reproducible too."""
    member = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    member.external_attr = 0o644 << 16
    wheel.writestr(member, data, compress_type=zipfile.ZIP_DEFLATED)


class WheelError(Exception):
    """The client wheel could not be built; the message says why."""


class ClientWheel:
    """The client wheel of this bridge: `start()` builds it in the background; `data` is its bytes once `ready`.

    `error` says why a build failed (then the entrance answers 500 with it, and `bridge serve` runs on).
    """

    def __init__(self, cache_dir: Path, version: str = bridge.__version__) -> None:
        self.cache_dir = cache_dir
        self.version = version
        self.name = wheel_name(version)
        self.path: Path | None = None
        self.data: bytes | None = None
        self.etag: str | None = None
        self.error: str | None = None
        self.ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._build_process: subprocess.Popen | None = None
        self._stopped = False

    def __repr__(self) -> str:
        state = "ready" if self.data is not None else self.error or "building"
        return f"ClientWheel(name={self.name!r}, cache_dir={str(self.cache_dir)!r}, state={state!r})"

    @property
    def public_path(self) -> str:
        return PATH_PREFIX + self.name

    def start(self) -> None:
        """Build (or find in the cache) in a daemon thread, so `bridge serve` starts without waiting for it."""
        self._thread = threading.Thread(target=self._build_quietly, name="bridge-client-wheel", daemon=True)
        self._thread.start()

    def wait(self, timeout_s: float | None = None) -> bool:
        return self.ready.wait(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop a build still running (with `bridge serve`): no pip is left behind; the cache keeps no half wheel."""
        self._stopped = True
        proc = self._build_process
        if proc is not None and proc.poll() is None:
            _kill_group(proc)
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _started(self, proc: subprocess.Popen) -> None:
        self._build_process = proc
        if self._stopped:  # stop() came first
            _kill_group(proc)

    def _build_quietly(self) -> None:
        try:
            self.build()
        except Exception as exc:  # the wheel is a convenience: MLflow and the entrance serve on without it
            self.error = str(exc) if isinstance(exc, WheelError) else f"{type(exc).__name__}: {exc}"
            if self._stopped:
                return  # stopped on purpose: nothing to report
            log.warning("The client wheel could not be built, so Colab cannot install from here: %s", self.error)
        finally:
            self.ready.set()

    def build(self) -> Path:
        """The cached wheel, built first when this version and source are not in the cache yet."""
        root = source_checkout()
        dist = None
        if root is not None:
            key = fingerprint(root)
        else:
            dist = metadata.distribution("bridge")
            key = _installed_fingerprint(dist)
        folder = self.cache_dir / f"{self.version}-{key[:16]}"
        target = folder / self.name
        if not target.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".build-", dir=folder) as tmp:
                if root is not None:
                    built = build_from_checkout(root, Path(tmp), on_start=self._started)
                else:
                    assert dist is not None
                    built = repack_installed(dist, Path(tmp) / self.name)
                if built.name != self.name:
                    raise WheelError(f"the build made {built.name}, not {self.name}: is the version {self.version}?")
                os.replace(built, target)  # whole or absent: a reader never sees half a wheel
            log.info("Built the client wheel %s", target)
        self._forget_others(folder)
        data = target.read_bytes()
        self.etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
        self.path, self.data = target, data
        return target

    def _forget_others(self, keep: Path) -> None:
        """Remove wheels of other versions or sources: only the running one is ever served."""
        for folder in self.cache_dir.iterdir():
            if folder != keep and folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
