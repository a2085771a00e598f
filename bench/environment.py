"""What makes a measurement comparable later: when, on what device, with which versions, at which commit.

Every record the bench scripts write carries :func:`environment` (docs/design.md §7: results as JSON
lines with device, versions, commit and config).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

PACKAGES = ("torch", "triton", "diffusers", "peft", "transformers", "cat-engine")
# Set where the source tree has no .git (a copy on the GPU machine): the commit it was copied from.
COMMIT_ENV = "CAT_ENGINE_GIT_COMMIT"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["torch"] = torch.__version__  # the running one, whatever the metadata says
    out["cuda"] = torch.version.cuda
    return out


def git_info() -> dict:
    """Commit of the source tree and whether tracked files differ from it; ``$CAT_ENGINE_GIT_COMMIT``
    (dirty unknown) where the tree has no .git."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.SubprocessError):
        return {"commit": os.environ.get(COMMIT_ENV), "dirty": None}


def device_info(device: torch.device | str) -> dict:
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info = {
            "type": "cuda",
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "total_memory_bytes": props.total_memory,
        }
        try:
            import pynvml

            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:  # NVML missing or not permitted: the driver version is only context
            pass
        return info
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "type": device.type,
        "name": name,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }


def environment(device: torch.device | str) -> dict:
    """``time`` (UTC), ``device``, ``versions``, ``git`` and the machine's ``load_average`` (1, 5 and
    15 minutes; how busy the machine was, which timings on a shared CPU depend on) of a measurement
    made now on ``device``."""
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(device),
        "versions": versions(),
        "git": git_info(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
