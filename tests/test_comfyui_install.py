"""The repository installs as a ComfyUI custom node from its git URL (ComfyUI-Manager clones it into
``custom_nodes/<folder>`` and imports ``<folder>/__init__.py`` under the folder's name): the DoRA Loader nodes
register whatever the folder is called, including ``dora_network`` itself, and the node folder carries the
registry's metadata."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: what ComfyUI's nodes.load_custom_node does with a folder (module named after it, registered, executed)
LOADER = """
import importlib.util, os, sys
path = sys.argv[1]
name = os.path.basename(path)
spec = importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"))
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
print(sorted(module.NODE_CLASS_MAPPINGS), module.NODE_DISPLAY_NAME_MAPPINGS["DoRALoader"])
import dora_network
print(callable(dora_network.create_network), os.path.dirname(dora_network.__file__) == os.path.join(path, "dora_network"))
"""


@pytest.mark.parametrize("folder", ["dora_network", "ComfyUI-dora_network"])
def test_cloned_repository_registers_the_nodes_under_any_folder_name(folder, tmp_path):
    custom_nodes = tmp_path / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / folder).symlink_to(ROOT, target_is_directory=True)
    result = subprocess.run([sys.executable, "-c", LOADER, str(custom_nodes / folder)], capture_output=True,
                            text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["['DoRALoader', 'DoRALoaderModelOnly'] DoRA Loader", "True True"]


def test_node_metadata_for_the_comfy_registry():
    """[tool.comfy] and the [project] fields the registry reads; no torch requirement (ComfyUI's torch stays)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy = project["tool"]["comfy"]
    assert comfy["DisplayName"] and comfy["PublisherId"] and "Icon" in comfy
    assert project["project"]["name"] and project["project"]["description"]
    requirements = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    requirements = [r for r in requirements if r]
    assert requirements and not any(r.lower().startswith("torch") for r in requirements)
