"""sana_core is pure PyTorch + transformers: it never imports ComfyUI (or diffusers, the test oracle)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib, pkgutil, sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("comfy", "comfy_api", "comfy_extras", "folder_paths", "diffusers", "nodes"):
            raise ImportError(f"sana_core must not import {name}")

sys.meta_path.insert(0, Block())
import sana_core
mods = [m.name for m in pkgutil.walk_packages(sana_core.__path__, "sana_core.")]
for m in mods:
    importlib.import_module(m)
print(len(mods))
"""


def test_sana_core_imports_without_comfy_or_diffusers():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 8  # every module was imported (dit, dcae, samplers, pipeline, cli, ...)


def test_block_is_effective():
    """The probe really blocks: importing diffusers under it fails."""
    out = subprocess.run([sys.executable, "-c", PROBE + "\nimport diffusers\n"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and "must not import diffusers" in out.stderr


def test_the_pack_imports_its_engine_relatively():
    """nodes/ imports sana_core as `..sana_core` and nothing adds the pack to sys.path, so another package named
    sana_core (or a second copy of the pack) cannot shadow it."""
    import re

    absolute = [f"{p.name}:{n}" for p in (ROOT / "nodes").glob("*.py")
                for n, line in enumerate(p.read_text().splitlines(), 1)
                if re.match(r"\s*(from|import) sana_core\b", line)]
    assert absolute == []
    assert not re.search(r"sys\.path\.(append|insert)", (ROOT / "__init__.py").read_text())


def test_pyproject_dependencies_agree_with_the_requirements_files():
    """pip install . (and its train/test extras) asks for what the requirements files ask for."""
    import re
    import tomllib

    def read(name: str) -> set[str]:
        out = set()
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("-r "):
                out |= read(line[3:])
            elif line:
                out.add(re.sub(r"\s+", "", line))
        return out

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert set(project["dependencies"]) == read("requirements.txt")
    assert set(project["dependencies"]) | set(extras["train"]) == read("requirements.txt") | read("requirements-train.txt")
    assert set(project["dependencies"]) | set(extras["test"]) == read("requirements-test.txt")
