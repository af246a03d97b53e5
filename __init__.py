"""ComfyUI entry point when this repository is cloned into ``ComfyUI/custom_nodes/`` (ComfyUI-Manager "Install via Git
URL", or ``git clone``): registers the "DoRA Loader" nodes from ``dora_network.integrations.comfyui``.

ComfyUI imports this file as a module named after the clone's folder. The package ``dora_network/`` beside it
needs only torch and safetensors, which ComfyUI has, so nothing is installed. When the folder is itself named
``dora_network`` (the default clone name), this module *is* ``sys.modules["dora_network"]``: it then becomes the
package, by taking the package's folder as its path and running the package's own ``__init__``.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_PACKAGE = os.path.join(_HERE, "dora_network")

if __name__ == "dora_network":
    __path__[:] = [_PACKAGE]  # noqa: F821 - set by the import system for a package's __init__
    __file__ = os.path.join(_PACKAGE, "__init__.py")
    with open(__file__, encoding="utf-8") as _file:
        exec(compile(_file.read(), __file__, "exec"))  # the package's own __init__, in this module
else:
    # any other folder name: this clone's package, importable under its own name (ahead of an installed copy)
    if _HERE not in sys.path:
        sys.path.insert(0, _HERE)

from dora_network.integrations.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
