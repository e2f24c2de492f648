"""Textual-inversion embeddings in the web UI's formats, used by writing their file name in a prompt.

A file ``models/embeddings/<name>.pt`` / ``.safetensors`` / ``.bin`` holds learned token-embedding vectors
[n, width]; wherever the tokens of ``<name>`` appear in a prompt, the n vectors take their place (see
``prompt_chunks``). Formats: the web UI's ``.pt`` (``string_to_param`` with one entry), ``.safetensors`` /
``.pt`` with ``emb_params``, the diffusers concept file (one tensor under the token's name) and SDXL files with one
tensor per text encoder (``clip_l`` [n, 768], ``clip_g`` [n, 1280]; each SDXL encoder reads its own part). Pickled
files are
read as checkpoints are (``torch.load(weights_only=True)`` via ``ldm.checkpoint``): a file can never run code.
Files are read when a prompt first names them, so an unrelated broken file in the folder does no harm.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ldm.modules.encoders.prompt_chunks import EmbeddingFinder

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDINGS_DIR = Path(__file__).resolve().parents[3] / "models" / "embeddings"
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")  # first wins when two files share a name
MAX_VECTORS = 75
_FAMILY_BY_WIDTH = {768: "SD 1 or SDXL clip_l", 1024: "SD 2", 1280: "SDXL clip_g"}


class EmbeddingError(ValueError):
    """A textual-inversion embedding file cannot be read or does not fit the model's text encoder."""


def _read_file(path: Path) -> Mapping[str, Any]:
    """The top-level mapping of an embedding file, read safely (no code runs)."""
    from ldm.checkpoint_files import CheckpointError, _read_pickle

    if path.stat().st_size == 0:
        raise EmbeddingError(f"embedding file '{path}' is empty (0 bytes): copy it again or remove it")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file
            try:
                data = load_file(str(path), device="cpu")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"cannot read '{path}': {e}") from None
        else:
            data = _read_pickle(path)
    except CheckpointError as e:
        raise EmbeddingError(f"textual-inversion embedding: {e} (or remove the file from {path.parent})") from None
    if not isinstance(data, Mapping):
        raise EmbeddingError(f"embedding file '{path}' holds a {type(data).__name__}, not an embedding")
    return data


SDXL_PARTS = ("clip_l", "clip_g")  # SDXL embedding files: vectors for CLIP-L and for OpenCLIP-bigG


def _vectors_of(data: Mapping[str, Any], path: Path, part: Optional[str] = None) -> torch.Tensor:
    """The vectors tensor in the web-UI / diffusers / SDXL layouts of an embedding file (``part``: the SDXL text
    encoder asking, ``clip_l`` or ``clip_g``; None for SD 1 / SD 2)."""
    if part is not None and any(k in data for k in SDXL_PARTS):
        found = data.get(part)
        if found is None:
            raise EmbeddingError(f"SDXL embedding file '{path}' has no '{part}' vectors (it has "
                                 f"{', '.join(k for k in SDXL_PARTS if k in data)})")
    elif "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise EmbeddingError(f"embedding file '{path}' must hold exactly one term in string_to_param")
        found = next(iter(params.values()))
    elif "emb_params" in data:
        found = data["emb_params"]
    elif "clip_l" in data or "clip_g" in data:
        raise EmbeddingError(f"embedding file '{path}' is an SDXL embedding (clip_l/clip_g); this model is SD 1/2")
    else:
        tensors = [v for v in data.values() if torch.is_tensor(v)]
        if len(tensors) != 1 or len(data) != 1:
            raise EmbeddingError(f"'{path}' is not a textual-inversion embedding: expected 'string_to_param', "
                                 f"'emb_params' or a single tensor, found keys {sorted(map(str, data))[:5]}")
        found = tensors[0]
    if not torch.is_tensor(found) or not found.is_floating_point():
        raise EmbeddingError(f"embedding file '{path}' holds no floating-point vectors")
    return found


def read_embedding(path: str | Path, part: Optional[str] = None) -> torch.Tensor:
    """Vectors [n, width] float32 (CPU) of an embedding file in the web-UI, diffusers or SDXL format (``part``:
    ``clip_l`` / ``clip_g`` for an SDXL text encoder)."""
    path = Path(path)
    vectors = _vectors_of(_read_file(path), path, part).detach().to("cpu", torch.float32).clone()  # not file-backed
    if vectors.dim() == 1:
        vectors = vectors[None]
    if vectors.dim() != 2 or not 1 <= vectors.shape[0] <= MAX_VECTORS or vectors.shape[1] == 0:
        raise EmbeddingError(f"embedding file '{path}' holds vectors of shape {tuple(vectors.shape)}; expected "
                             f"[n, width] with 1 <= n <= {MAX_VECTORS}")
    if not torch.isfinite(vectors).all():
        raise EmbeddingError(f"embedding file '{path}' holds NaN/inf values: it is corrupt")
    return vectors


def _family(width: int) -> str:
    family = _FAMILY_BY_WIDTH.get(width)
    return f"{width} wide, {family}" if family else f"{width} wide"


class EmbeddingLibrary:
    """The embeddings of one folder, named by file name (without suffix) and read at their first use."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.paths: dict[str, Path] = {}
        self._vectors: dict[tuple[Path, Optional[str]], tuple[int, torch.Tensor]] = {}
        self._warned: set[Path] = set()

    def refresh(self) -> None:
        """List the folder again (files added, removed or renamed since the last prompt are seen)."""
        self.paths = {}
        files = [p for p in self.folder.iterdir() if p.suffix.lower() in EMBEDDING_SUFFIXES and p.is_file()] \
            if self.folder.is_dir() else []
        for path in sorted(files, key=lambda p: (EMBEDDING_SUFFIXES.index(p.suffix.lower()), p.name)):
            if path.stem in self.paths:
                if path not in self._warned:
                    self._warned.add(path)
                    logger.warning("embeddings: '%s' and '%s' share the name '%s'; using the first",
                                   self.paths[path.stem].name, path.name, path.stem)
                continue
            self.paths[path.stem] = path

    def vectors(self, name: str, width: int, part: Optional[str] = None) -> torch.Tensor:
        """Vectors [n, width] of embedding ``name`` (an SDXL file's ``part``); a clear error when the file is bad or
        of another width."""
        path = self.paths[name]
        stamp = path.stat().st_mtime_ns
        cached = self._vectors.get((path, part))
        if cached is None or cached[0] != stamp:
            cached = (stamp, read_embedding(path, part))
            self._vectors[(path, part)] = cached
            logger.info("textual-inversion embedding '%s': %d vectors from %s", name, cached[1].shape[0], path)
        vectors = cached[1]
        if vectors.shape[1] != width:
            raise EmbeddingError(f"embedding '{name}' ({path}) has vectors {_family(vectors.shape[1])}; this model's "
                                 f"text encoder takes vectors {_family(width)}: use an embedding made for this "
                                 f"model family, or rename the file so the prompt does not name it")
        return vectors

    def finder(self, bpe: Callable[[str], list[int]], width: int,
               part: Optional[str] = None) -> Optional[EmbeddingFinder]:
        """Finder of embedding names in a token list (longest name first), or None when the folder has none;
        ``part`` picks an SDXL file's vectors (``clip_l`` / ``clip_g``)."""
        self.refresh()
        lookup: dict[int, list[tuple[list[int], str]]] = {}
        for name in self.paths:
            ids = bpe(name)
            if ids:
                lookup.setdefault(ids[0], []).append((ids, name))
        if not lookup:
            return None
        for entries in lookup.values():
            entries.sort(key=lambda entry: len(entry[0]), reverse=True)

        def find(tokens: Sequence[int], position: int) -> Optional[tuple[torch.Tensor, int]]:
            for ids, name in lookup.get(tokens[position], ()):
                if list(tokens[position:position + len(ids)]) == ids:
                    return self.vectors(name, width, part), len(ids)
            return None
        return find


def library_for(encoder: Any, folder: Optional[str | Path] = None) -> EmbeddingLibrary:
    """The embedding library of ``folder`` (default ``DEFAULT_EMBEDDINGS_DIR``) kept with ``encoder`` (files are
    read once per encoder)."""
    folder = DEFAULT_EMBEDDINGS_DIR if folder is None else folder
    libraries = encoder.__dict__.setdefault("_embedding_libraries", {})
    key = str(Path(folder).resolve())
    if key not in libraries:
        libraries[key] = EmbeddingLibrary(folder)
    return libraries[key]


class EmbeddingPart:
    """One SDXL text encoder's view of a library: the ``clip_l`` or ``clip_g`` vectors of SDXL files."""

    def __init__(self, library: EmbeddingLibrary, part: str):
        if part not in SDXL_PARTS:
            raise ValueError(f"part must be one of {SDXL_PARTS}, got '{part}'")
        self.library, self.part = library, part

    def finder(self, bpe: Callable[[str], list[int]], width: int) -> Optional[EmbeddingFinder]:
        """The library's finder for this part."""
        return self.library.finder(bpe, width, self.part)
