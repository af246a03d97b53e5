"""ComfyUI custom node package for dora_network: "DoRA Loader" and "DoRA Loader (model only)" under loaders.

Install (README, "ComfyUI"): ``pip install --no-deps -e /path/to/dora_network`` with ComfyUI's Python, then link or
copy this folder into ``ComfyUI/custom_nodes/``. The nodes' code lives in ``dora_network.integrations.comfyui``.
"""

try:
    from dora_network.integrations.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as error:  # ComfyUI logs this and starts without the nodes
    raise ImportError(
        "the DoRA Loader nodes need the dora_network package in ComfyUI's Python: run "
        "`python -m pip install --no-deps -e /path/to/dora_network` with the Python that runs ComfyUI "
        f"(portable builds: python_embeded\\python.exe) ({error})"
    ) from error

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
