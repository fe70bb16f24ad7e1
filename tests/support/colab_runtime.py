"""A Colab-like runtime for the notebook test from zero (tests/test_notebook_from_zero.py).

    colab_venv()      `python -m venv` that has what Colab ships (torch, numpy, pandas, ipykernel, …) and no bridge,
                      MLflow or Ultralytics: those come from the workstation's wheel and the package index
    QuickTunnelEdge   Cloudflare's TLS in front of the stand-in cloudflared: HTTPS on 127.0.0.1 with a certificate
                      for `*.trycloudflare.com` from a test CA, routed by SNI to the tunnel's forwarder
    quick_tunnel_dns  DNS for `*.trycloudflare.com` inside the venv (a sitecustomize.py; quick_tunnel_dns.py)

Colab's packages are the test venv's own, seen through a `.pth` file naming a folder of symlinks to their package
folders and `.dist-info` (so pip counts them installed, as on Colab, and nothing is downloaded for them). Bridge's
code never learns about any of this: pip, urllib and requests in the venv meet a public name, TLS and a CA bundle.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

from packaging.requirements import Requirement

from tests.support.tls_edge import TlsEdge

#: What Colab ships that a bridge notebook touches (its runtime has these and ~600 more); their dependencies come
#: along. Colab's versions differ; what matters is that pip finds them installed and installs only the rest.
COLAB_PACKAGES = (
    "torch", "torchvision", "numpy", "pandas", "matplotlib", "pillow", "scipy", "opencv-python", "pyyaml",
    "requests", "psutil", "polars", "rich", "typer", "platformdirs", "cryptography", "protobuf", "packaging",
    "ipykernel", "ipython", "jupyter_client", "pyarrow", "sqlalchemy", "cachetools", "click", "cloudpickle",
)  # fmt: skip
#: Never in the Colab-like base, whatever depends on them: they come from the served wheel and the index.
NOT_ON_COLAB = frozenset(
    {"bridge", "mlflow", "mlflow-skinny", "mlflow-tracing", "ultralytics", "ultralytics-thop", "ultralytics-platform"}
)
DNS_STANDIN = Path(__file__).with_name("quick_tunnel_dns.py")


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def colab_distributions(roots: tuple[str, ...] = COLAB_PACKAGES) -> list[metadata.Distribution]:
    """`roots` and everything they require (with the extras asked for: torch needs `cuda-toolkit[cudart,…]`), as
    installed in this environment, minus NOT_ON_COLAB."""
    installed = {_key(d.metadata["Name"]): d for d in metadata.distributions()}
    found: dict[str, metadata.Distribution] = {}
    seen: set[tuple[str, str]] = set()
    todo = [(_key(name), "") for name in roots]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen or name in NOT_ON_COLAB or name not in installed:
            continue
        seen.add((name, extra))
        dist = found[name] = installed[name]
        for text in dist.requires or ():
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(_key(req.name), wanted) for wanted in ("", *req.extras)]
    return list(found.values())


def _top_level_entries(dist: metadata.Distribution) -> set[str]:
    """The site-packages entries a distribution owns: package folders, modules, `.libs` folders, its `.dist-info`."""
    entries = set()
    for file in dist.files or ():
        first = file.parts[0]
        if first in ("..", "/") or first == "__pycache__" or first.endswith((".pth", ".data")):
            continue
        entries.add(first)
    return entries


def colab_venv(folder: Path) -> Path:
    """A fresh venv at `folder` with the Colab base visible through `colab-base.pth`; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, capture_output=True, timeout=300)
    python = folder / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout.strip()
    )  # fmt: skip
    source = Path(sysconfig.get_paths()["purelib"])
    base = folder / "colab-base"
    base.mkdir()
    for dist in colab_distributions():
        for entry in _top_level_entries(dist):
            target = source / entry
            if target.exists() and not (base / entry).exists():
                (base / entry).symlink_to(target)
    (site / "colab-base.pth").write_text(str(base) + "\n")
    # venv's own setuptools (65 on Python 3.11) would hide the base's, which torch needs, as on Colab.
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "setuptools"], check=True, timeout=120)
    return python


def venv_site(python: Path) -> Path:
    return python.parent.parent / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def install_quick_tunnel_dns(python: Path, state_file: Path, edge_port: int) -> None:
    """Make `*.trycloudflare.com` resolve to the local TLS edge inside the venv of `python` (its sitecustomize)."""
    site = venv_site(python)
    shutil.copyfile(DNS_STANDIN, site / "sitecustomize.py")
    (site / "quick_tunnel_dns.json").write_text(json.dumps({"state": str(state_file), "edge_port": edge_port}))


def kernelspec(folder: Path, python: Path, name: str = "colab-like") -> Path:
    """A Jupyter kernelspec running ipykernel on `python`, under `folder/kernels/` (put `folder` on JUPYTER_PATH)."""
    spec = folder / "kernels" / name
    spec.mkdir(parents=True)
    argv = [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": name, "language": "python"}))
    return folder


# ------------------------------------------------------------------------------------------- TLS of the edge


@dataclass
class EdgeCA:
    """A throwaway CA and a certificate it signed for `*.trycloudflare.com`, as PEM files; `bundle` trusts it and
    whatever this machine trusts (pip still reaches the package index)."""

    folder: Path
    cert: Path = field(init=False)
    leaf_cert: Path = field(init=False)
    leaf_key: Path = field(init=False)
    bundle: Path = field(init=False)

    def __post_init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.timezone.utc)
        valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(hours=2))

        def name(text: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (
            x509.CertificateBuilder().subject_name(name("bridge test CA")).issuer_name(name("bridge test CA"))
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(valid[0]).not_valid_after(valid[1])
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(ca_key, hashes.SHA256())
        )  # fmt: skip
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (
            x509.CertificateBuilder().subject_name(name("*.trycloudflare.com")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(valid[0]).not_valid_after(valid[1])
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("*.trycloudflare.com")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )  # fmt: skip
        self.folder.mkdir(parents=True, exist_ok=True)
        pem = serialization.Encoding.PEM
        self.cert = self.folder / "test-ca.pem"
        self.cert.write_bytes(ca.public_bytes(pem))
        self.leaf_cert = self.folder / "edge-cert.pem"
        self.leaf_cert.write_bytes(leaf.public_bytes(pem))
        self.leaf_key = self.folder / "edge-key.pem"
        self.leaf_key.write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        import certifi

        system = Path(os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE") or certifi.where())
        self.bundle = self.folder / "ca-bundle.pem"
        self.bundle.write_bytes(system.read_bytes().rstrip(b"\n") + b"\n" + self.cert.read_bytes())


@dataclass
class EdgeConnection:
    at: float  # time.monotonic()
    host: str
    routed: bool


class QuickTunnelEdge(TlsEdge):
    """HTTPS for every quick tunnel: terminate TLS on 127.0.0.1, read the SNI name, pass the bytes to the forwarder
    the stand-in's state file lists for `https://<name>` (read per connection, so new tunnels work at once).
    `connections` records each one's time and name: which public URL a client was using, and when."""

    routes_by_name = True

    def __init__(self, state_file: Path, ca: EdgeCA) -> None:
        super().__init__(ca.leaf_cert, ca.leaf_key, name="quick-tunnel-edge")
        self.state_file = state_file
        self.ca = ca
        self.connections: list[EdgeConnection] = []

    def upstream(self, host: str) -> tuple[str, int] | None:
        try:
            forwards = json.loads(self.state_file.read_text() or "{}")
        except (OSError, ValueError):
            forwards = {}
        forwarder = forwards.get(f"https://{host}")
        self.connections.append(EdgeConnection(time.monotonic(), host, forwarder is not None))
        if forwarder is None:
            return None
        parts = urlsplit(forwarder)
        return parts.hostname or "127.0.0.1", parts.port or 80

    def hosts_since(self, since: float) -> list[str]:
        return [c.host for c in list(self.connections) if c.at >= since]

    def first_connection(self, host: str, since: float = 0.0) -> EdgeConnection | None:
        return next((c for c in list(self.connections) if c.host == host and c.at >= since), None)
