"""The public generation API: load a model once, then make images from text, images and masks.

>>> from ldm.api import Generator
>>> gen = Generator.load()                      # the shipped default model; Generator.load("sd-v1-5.safetensors")
>>> result = gen.txt2img("a red circle on a blue background", steps=20, seed=42, width=256, height=256)
>>> result.images[0].save("out.png"); print(result.parameters[0])

``progress`` is called after every sampler step with a :class:`Progress` (``step``, ``total``, ``preview()``);
``cancel`` is any object with ``is_set()`` (a ``threading.Event``), checked after every step. The scripts and the
server are thin users of this module: one generation path.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from PIL import Image

from ldm.api.generate import Request, Result, generate, random_seed, settings_for
from ldm.api.model import LoadedModel, build, load
from ldm.api.task import LATENTS, Cancelled, Progress, ProgressCallback, Settings, Task

__all__ = ["Cancelled", "Generator", "LATENTS", "LoadedModel", "Progress", "Request", "Result", "Settings", "Task",
           "build", "generate", "load", "random_seed", "settings_for"]


class Generator:
    """A loaded model with txt2img / img2img / inpaint; keyword settings are the fields of :class:`Request`.

    One call at a time: the model is shared state (merged LoRAs, the device); the server runs its calls from one
    worker thread per device.
    """

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded

    @classmethod
    def load(cls, ckpt: Any = None, config: Any = None, **kwargs: Any) -> "Generator":
        """Load a model (see :func:`ldm.api.model.load` for the keywords: vae, loras, device, precision...)."""
        return cls(load(ckpt, config, **kwargs))

    def run(self, request: Request, mode: str = "txt2img", progress: ProgressCallback = None,
            cancel: Any = None) -> Result:
        """Run a prepared :class:`Request` in ``mode`` (txt2img, img2img or inpaint)."""
        return generate(self.loaded, request, mode, progress, cancel)

    def txt2img(self, prompt: str, *, progress: ProgressCallback = None, cancel: Any = None,
                **settings: Any) -> Result:
        """Images [batch_size x n_iter] of ``prompt``; each with its ``parameters`` text and seed."""
        return self.run(_request(prompt, settings), "txt2img", progress, cancel)

    def img2img(self, image: Image.Image, prompt: str, *, strength: float = 0.75, progress: ProgressCallback = None,
                cancel: Any = None, **settings: Any) -> Result:
        """``image`` changed towards ``prompt`` (0 keeps it, 1 replaces it)."""
        return self.run(_request(prompt, settings, init_image=image, strength=strength), "img2img", progress, cancel)

    def inpaint(self, image: Image.Image, mask: Image.Image, prompt: str, *, strength: Optional[float] = None,
                progress: ProgressCallback = None, cancel: Any = None, **settings: Any) -> Result:
        """``image`` repainted where ``mask`` is white (composited back through the blurred mask)."""
        request = _request(prompt, settings, init_image=image, mask=mask, strength=strength)
        return self.run(request, "inpaint", progress, cancel)

    def close(self) -> None:
        """Undo merged LoRAs."""
        self.loaded.close()


_FIELDS = {f.name for f in dataclasses.fields(Request)}


def _request(prompt: str, settings: dict, **extra: Any) -> Request:
    unknown = sorted(set(settings) - _FIELDS)
    if unknown:
        raise TypeError(f"unknown setting(s) {', '.join(unknown)}; the settings are {', '.join(sorted(_FIELDS))}")
    return Request(prompt=prompt, **settings, **extra)
