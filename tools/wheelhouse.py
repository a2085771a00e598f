"""Install the wheels a machine is missing, from a folder, with no package index.

    python3 tools/wheelhouse.py WHEEL_DIR --target SITE [--dry-run]

For the GPU machine (bench/gpu_suite.sh), which has torch, triton, peft and transformers but no
diffusers and no package registry. A wheel is installed when its distribution is not installed,
or when the installed version fails a requirement of another wheel being installed (repeated until
nothing changes); everything else already there is left alone, so the machine's own torch stack
is never shadowed. Requirements that neither the machine nor the folder satisfies are listed.

Standard library only (plus ``packaging``, or pip's vendored copy), so it runs before anything is
installed. Installs with ``pip install --no-index --no-deps --target``; without pip, unzips.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # a bare interpreter: pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import Version


@dataclass
class Wheel:
    path: Path
    name: str  # canonical distribution name
    version: Version
    requires: list[Requirement] = field(default_factory=list)  # those that apply here, extras dropped


def read_wheel(path: Path) -> Wheel:
    """Name, version and requirements of a wheel, from its ``*.dist-info/METADATA``."""
    with zipfile.ZipFile(path) as zf:
        meta_name = next(n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        meta = Parser().parsestr(zf.read(meta_name).decode("utf-8"))
    requires = []
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            requires.append(req)
    return Wheel(path, canonicalize_name(meta["Name"]), Version(meta["Version"]), requires)


def installed_versions() -> dict[str, Version]:
    """Canonical name -> version of every distribution visible on ``sys.path``, first one wins."""
    out: dict[str, Version] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonicalize_name(name) not in out:
            try:
                out[canonicalize_name(name)] = Version(dist.version)
            except Exception:  # an unparsable local version: treat as present, any version
                out[canonicalize_name(name)] = None
    return out


def plan(wheels: list[Wheel], installed: dict[str, Version]) -> tuple[list[Wheel], list[str]]:
    """(wheels to install, unmet requirements as 'req (needed by name)')."""
    by_name: dict[str, Wheel] = {}
    for w in sorted(wheels, key=lambda w: w.version):  # the newest wheel of a name wins
        by_name[w.name] = w
    chosen = {name for name in by_name if name not in installed}
    while True:
        added = set()
        for name in chosen:
            for req in by_name[name].requires:
                dep = canonicalize_name(req.name)
                have = installed.get(dep)
                if dep in chosen or dep not in installed or dep not in by_name:
                    continue
                if have is not None and not req.specifier.contains(have, prereleases=True):
                    if req.specifier.contains(by_name[dep].version, prereleases=True):
                        added.add(dep)
        if not added:
            break
        chosen |= added
    unmet = []
    for name in sorted(chosen):
        for req in by_name[name].requires:
            dep = canonicalize_name(req.name)
            version = by_name[dep].version if dep in chosen else installed.get(dep, "missing")
            if version == "missing" or (
                version is not None and not req.specifier.contains(version, prereleases=True)
            ):
                unmet.append(f"{req} (needed by {name}; have {version})")
    return [by_name[n] for n in sorted(chosen)], unmet


def install(wheels: list[Wheel], target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    paths = [str(w.path) for w in wheels]
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--upgrade",
    ]
    try:
        subprocess.run([*pip, "--target", str(target), *paths], check=True)
    except (OSError, subprocess.CalledProcessError):
        if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            raise  # pip is there and failed: that is an error to see, not to work around
        for w in wheels:  # no pip: a wheel is a zip laid out for site-packages
            with zipfile.ZipFile(w.path) as zf:
                zf.extractall(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel_dir", type=Path)
    parser.add_argument(
        "--target", type=Path, required=True, help="folder to install into (put it on PYTHONPATH)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan, install nothing")
    args = parser.parse_args(argv)
    wheels = [read_wheel(p) for p in sorted(args.wheel_dir.glob("*.whl"))]
    chosen, unmet = plan(wheels, installed_versions())
    skipped = sorted({w.name for w in wheels} - {w.name for w in chosen})
    print(
        f"wheelhouse: {len(wheels)} wheels in {args.wheel_dir}; installing {len(chosen)}: "
        f"{' '.join(f'{w.name}=={w.version}' for w in chosen) or '-'}"
    )
    print(f"wheelhouse: already satisfied here: {' '.join(skipped) or '-'}")
    for line in unmet:
        print(f"wheelhouse: unmet requirement: {line}")
    if chosen and not args.dry_run:
        install(chosen, args.target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
