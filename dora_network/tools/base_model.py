"""Base models for the tools: loaded from ``--model`` and seen as adaptable layers by canonical ``lora_name``.

``--model`` forms: ``"tiny"`` (the seeded tiny SDXL of ``dora_network.tiny``), a local diffusers folder (a pipeline
with ``unet/`` and ``text_encoder[_2]/``, or a bare UNet folder; read offline), or a ``.safetensors`` checkpoint (SAI
single-file SDXL/SD1 or a diffusers UNet file; only its header is read, weights lazily, see checkpoint_layout).

* :func:`load_model` builds the modules of ``"tiny"`` or a folder (dora-analyze runs a network on them).
* :func:`load_base_model` gives a :class:`BaseModel`: the layers' shapes, their other spellings and their weights
  on demand (dora-inspect matches names against it; dora-convert reads W0 from it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..keys import ModuleSpec
from ..loading import name_aliases
from ..targets import Target
from .checkpoint_layout import read_site, scan_targets
from .safetensors_stream import read_header

__all__ = ["BaseModel", "ModelMatch", "load_base_model", "load_model", "model_parts"]


@dataclass
class ModelMatch:
    """How the file's module names fit a base model.

    Attributes:
        model: what was loaded (``"tiny"``, a path).
        layers: adaptable layers the model has.
        matched: file modules that name one of them (in any accepted spelling) with matching shapes.
        unmatched: file modules that name no layer.
        shape_mismatch: file modules whose tensors do not fit the named layer.
    """

    model: str
    layers: int
    matched: int
    unmatched: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)


class BaseModel:
    """A base model's adaptable layers by canonical ``lora_name``: shapes, other spellings, weights on demand.

    Args:
        description: what was loaded (for reports).
        shapes: canonical ``lora_name`` -> weight shape (out, in[, kh, kw]).
        aliases: other spellings (SAI/diffusers UNet names, short text-encoder names) -> canonical name.
        fetch: canonical name -> the layer's weight tensor (read lazily; checkpoints are not loaded whole).
    """

    def __init__(self, description: str, shapes: Mapping[str, tuple[int, ...]], aliases: Mapping[str, str],
                 fetch: Callable[[str], torch.Tensor]) -> None:
        self.description = description
        self.shapes = dict(shapes)
        self.aliases = {k: v for k, v in aliases.items() if k not in self.shapes}
        self._fetch = fetch

    def resolve(self, file_name: str) -> str | None:
        """The canonical name of the layer a file module names, or None."""
        return file_name if file_name in self.shapes else self.aliases.get(file_name)

    def weight(self, lora_name: str) -> torch.Tensor:
        """W0 of a layer (canonical or alias name), detached, on CPU.

        Raises:
            KeyError: no such layer (use :meth:`resolve` first).
        """
        canonical = self.resolve(lora_name)
        if canonical is None:
            raise KeyError(f"the base model '{self.description}' has no layer '{lora_name}'")
        return self._fetch(canonical).detach().cpu()

    def fits(self, file_name: str, spec: ModuleSpec) -> bool:
        """Whether a file module's tensors fit the layer it names (which must exist: :meth:`resolve` first)."""
        shape = self.shapes[self.resolve(file_name)]
        kernel = None if len(shape) == 2 else tuple(shape[2:])
        return (spec.out_dim, spec.in_dim, spec.kernel) == (shape[0], shape[1], kernel)

    def match(self, specs: Mapping[str, ModuleSpec]) -> ModelMatch:
        """Which of a file's modules (name -> spec) name a layer of this model, with fitting shapes."""
        unmatched, mismatch = [], []
        for name, spec in specs.items():
            if self.resolve(name) is None:
                unmatched.append(name)
            elif not self.fits(name, spec):
                mismatch.append(name)
        matched = len(specs) - len(unmatched) - len(mismatch)
        return ModelMatch(self.description, len(self.shapes), matched, sorted(unmatched), sorted(mismatch))


# -- modules ------------------------------------------------------------------------------------------------------
def model_parts(model: Any) -> tuple[list[nn.Module], nn.Module]:
    """(text encoders, unet) of a ``TinySDXL``, a diffusers pipeline, or a ``(text_encoders, unet)`` pair.

    Raises:
        TypeError: anything else.
    """
    if isinstance(model, tuple):
        return list(model[0]), model[1]
    if hasattr(model, "text_encoders"):
        return list(model.text_encoders), model.unet
    if getattr(model, "unet", None) is None:
        raise TypeError(f"expected a TinySDXL, a diffusers pipeline or (text_encoders, unet), got {type(model)}")
    encoders = [getattr(model, name, None) for name in ("text_encoder", "text_encoder_2")]
    return [te for te in encoders if te is not None], model.unet


def _diffusers_folder(folder: Path) -> tuple[list[nn.Module], nn.Module]:
    """A diffusers pipeline folder (``unet/``, ``text_encoder/``, ``text_encoder_2/``) or a bare UNet folder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if (folder / "unet").is_dir():
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
        encoders = [cls.from_pretrained(folder / sub, local_files_only=True)
                    for sub, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection))
                    if (folder / sub).is_dir()]
        return encoders, unet
    if (folder / "config.json").is_file():
        return [], UNet2DConditionModel.from_pretrained(folder, local_files_only=True)
    raise ValueError(f"--model '{folder}' is a folder but neither a diffusers pipeline (no unet/) nor a UNet "
                     f"folder (no config.json)")


def load_model(model: str, seed: int = 0, model_config: str | None = None) -> tuple[list[nn.Module], nn.Module]:
    """(text encoders, unet) of ``"tiny"`` (seeded, from ``model_config`` or the default) or a diffusers folder.

    Raises:
        FileNotFoundError: ``model`` is neither. ValueError: a folder that is not a diffusers model.
    """
    if model == "tiny":
        from ..tiny import build_tiny_sdxl, load_tiny_config

        return model_parts(build_tiny_sdxl(load_tiny_config(model_config), seed=seed))
    folder = Path(model)
    if not folder.is_dir():
        raise FileNotFoundError(f"--model '{model}' is neither 'tiny' nor a diffusers folder")
    return _diffusers_folder(folder)


# -- layers -------------------------------------------------------------------------------------------------------
def _from_targets(description: str, targets: Sequence[Target], fetch: Callable[[str], torch.Tensor]) -> BaseModel:
    return BaseModel(description, {t.lora_name: tuple(t.module.weight.shape) for t in targets},
                     name_aliases(targets), fetch)


def _from_modules(description: str, text_encoders: Sequence[Any], unet: Any) -> BaseModel:
    from ..targets import find_targets

    targets = find_targets(list(text_encoders), unet, with_conv_blocks=True)
    by_name = {t.lora_name: t for t in targets}
    return _from_targets(description, targets, lambda name: by_name[name].module.weight)


def _from_checkpoint(path: Path) -> BaseModel:
    """Layers of a single-file SD checkpoint (SAI keys) or a diffusers UNet safetensors, from its header only."""
    targets, sites = scan_targets({path: None})
    if not targets:
        raise ValueError(f"--model '{path}': no UNet or text-encoder weights found (expected SAI keys "
                         f"'model.diffusion_model.*' / 'conditioner.embedders.*' or diffusers UNet keys)")
    header = read_header(path)  # once: read_site would parse it for every weight
    return _from_targets(str(path), targets, lambda name: read_site(sites[name][0], header))


def load_base_model(model: Any) -> BaseModel:
    """Resolve ``--model``: ``"tiny"`` (our seeded tiny SDXL), a diffusers folder (offline, ``local_files_only``),
    a ``.safetensors`` checkpoint (SAI single-file SDXL/SD1 or a diffusers UNet file; header read, weights lazily),
    a built model with ``.unet`` and ``.text_encoders`` (``TinySDXL``) or ``.text_encoder[_2]`` (a pipeline), a
    ``(text_encoders, unet)`` pair, or a :class:`BaseModel`.

    Raises:
        ValueError / FileNotFoundError: anything else.
    """
    if isinstance(model, BaseModel):
        return model
    if isinstance(model, tuple) or hasattr(model, "unet"):
        return _from_modules(type(model).__name__, *model_parts(model))
    text = str(model)
    path = Path(text)
    if text == "tiny" or path.is_dir():
        return _from_modules("tiny" if text == "tiny" else str(path), *load_model(text))
    if path.is_file() and path.suffix.lower() == ".safetensors":
        return _from_checkpoint(path)
    if not path.exists():
        raise FileNotFoundError(f"--model '{text}' not found; pass 'tiny', a diffusers folder or a .safetensors "
                                f"checkpoint")
    raise ValueError(f"--model '{text}': only 'tiny', a diffusers folder or a .safetensors checkpoint are supported")
