"""Installs a built wheel into a fresh venv and proves that its own files import and run the quick start.

Usage: ``python scripts/check_wheel.py dist/nir_loss-*.whl``

The fresh venv gets the wheel with ``--no-deps``; its dependencies (torch, PML, normflows) come
from the running interpreter's site-packages through a ``.pth`` line, appended after the venv's
own site-packages, so nothing large is installed again. That directory may hold an editable
install of the checkout: a plain path line does not process its ``.pth`` files, and the check
also verifies that every ``nir_loss`` module imported is the wheel's file, byte for byte. The
quick start (``docs/quickstart.py``) then runs in isolated mode (``python -I``: no PYTHONPATH, no
current directory, no user site) from a temporary directory.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

_PROBE = r"""
import hashlib, importlib.metadata, pathlib, runpy, sys, zipfile
wheel, site, quickstart = sys.argv[1:4]
import nir_loss, nir_loss.testing
pkg = pathlib.Path(nir_loss.__file__).parent
assert pkg == pathlib.Path(site) / "nir_loss", f"nir_loss imported from {pkg}, not from the wheel in {site}"
with zipfile.ZipFile(wheel) as zf:
    names = [n for n in zf.namelist() if n.startswith("nir_loss/")]
    for name in names:
        assert (pathlib.Path(site) / name).read_bytes() == zf.read(name), f"{name} differs from the wheel"
assert "nir_loss/py.typed" in names, "py.typed missing from the wheel"
version = importlib.metadata.version("nir-loss")
assert version == nir_loss.__version__, f"metadata version {version} != nir_loss.__version__ {nir_loss.__version__}"
runpy.run_path(quickstart, run_name="__main__")
from nir_loss import ProxyConditionedFlow
nir_loss.testing.check_flow(ProxyConditionedFlow(4, num_blocks=1, hidden_features=8, num_layers=2))
for mod in [m for m in list(sys.modules.values()) if getattr(m, "__name__", "").startswith("nir_loss")]:
    path = pathlib.Path(mod.__file__).resolve()
    assert path.is_relative_to(pathlib.Path(site).resolve()), f"{mod.__name__} came from {path}"
print(f"wheel OK: nir-loss {version}, {len(names)} files, imported from {pkg}")
"""


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    wheel = pathlib.Path(sys.argv[1]).resolve()
    deps_site = sysconfig.get_paths()["purelib"]
    # PYTHONPATH could point at the checkout (and the egg-info `build` leaves there), which would make
    # pip believe nir-loss is already installed; the venv must see only the wheel.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="nir-wheel-"))
    try:
        venv = tmp / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=env)
        python = venv / "bin" / "python"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "--python",
                str(python),
                "install",
                "-q",
                "--no-deps",
                "--no-index",
                "--ignore-installed",
                str(wheel),
            ],
            check=True,
            env=env,
        )
        site = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout.strip()
        (pathlib.Path(site) / "_nir_wheel_check_deps.pth").write_text(deps_site + "\n")
        probe = tmp / "probe.py"
        probe.write_text(_PROBE)
        subprocess.run(
            [str(python), "-I", str(probe), str(wheel), site, str(ROOT / "docs" / "quickstart.py")],
            check=True,
            cwd=tmp,
            env=env,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
