"""The GPU suite's installer decides from wheel metadata what a machine is missing."""

import importlib.util
import sys
import zipfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "wheelhouse.py"
_spec = importlib.util.spec_from_file_location("wheelhouse", SCRIPT)
wheelhouse = sys.modules["wheelhouse"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wheelhouse)
Version, plan, read_wheel = wheelhouse.Version, wheelhouse.plan, wheelhouse.read_wheel


def fake_wheel(folder, name, version, requires=()):
    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return read_wheel(path)


def test_plan_installs_the_missing_and_the_too_old_only(tmp_path):
    wheels = [
        fake_wheel(
            tmp_path,
            "diffusers",
            "0.42.1",
            ["huggingface-hub>=1.32", "numpy", "importlib_metadata", "pytest; extra == 'test'"],
        ),
        fake_wheel(tmp_path, "huggingface_hub", "2.4.0", ["httpx2>=2"]),
        fake_wheel(tmp_path, "importlib_metadata", "10.2.0", ["zipp>=3.20"]),
        fake_wheel(tmp_path, "zipp", "4.1.2"),
        fake_wheel(tmp_path, "numpy", "2.5.5"),
        fake_wheel(tmp_path, "Pytest", "9.2.0"),
    ]
    installed = {
        "huggingface-hub": Version("1.0.0"),  # too old for diffusers: replaced
        "numpy": Version("2.1.0"),  # fine: left alone
        "pytest": Version("8.0.0"),  # only an extra asks for it: left alone
        "torch": Version("2.11.0"),
    }
    chosen, unmet = plan(wheels, installed)
    assert [w.name for w in chosen] == ["diffusers", "huggingface-hub", "importlib-metadata", "zipp"]
    assert unmet == ["httpx2>=2 (needed by huggingface-hub; have missing)"]


def test_plan_with_everything_present_installs_nothing(tmp_path):
    wheels = [fake_wheel(tmp_path, "diffusers", "0.42.1", ["numpy"])]
    assert plan(wheels, {"diffusers": Version("0.42.1"), "numpy": Version("2.0")}) == ([], [])


def test_newest_wheel_of_a_name_wins(tmp_path):
    old = fake_wheel(tmp_path, "zipp", "3.0")
    new = fake_wheel(tmp_path, "zipp", "4.1.2")
    chosen, _ = plan([new, old], {})
    assert chosen == [new]
