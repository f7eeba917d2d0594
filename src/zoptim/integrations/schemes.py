"""Which parameters a fine-tune changes: ZO-Bench's four schemes (through ``peft``), and the
head alone (a linear probe)."""

from __future__ import annotations

import torch

SCHEMES = ("full", "head", "lora", "prefix", "prompt")


def apply_scheme(clf, scheme: str, *, lora_r: int = 8, lora_alpha: int = 16,
                 virtual_tokens: int = 10) -> list[torch.nn.Parameter]:
    """Wrap ``clf.backbone`` for ``scheme`` and return the trainable parameters.

    - ``full``: every parameter (and the encoder head).
    - ``head``: the task head alone (an encoder's label rows, a decoder's label-word rows in a
      head of their own, an image model's new classifier), the backbone frozen: a linear
      probe (MeZO's table's LP row when trained first order).
    - ``lora``: LoRA adapters on every linear layer of the backbone, base frozen; the encoder
      head stays trainable.
    - ``prefix`` / ``prompt``: prefix tuning / prompt tuning of a decoder (peft), base frozen.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    if scheme == "head":
        _train_head_only(clf)
    elif scheme != "full":
        _wrap_peft(clf, scheme, lora_r=lora_r, lora_alpha=lora_alpha,
                   virtual_tokens=virtual_tokens)
    return [p for p in clf.parameters() if p.requires_grad]


def _train_head_only(clf) -> None:
    """Freeze everything but the task head of ``clf`` (a linear probe)."""
    if hasattr(clf, "attach_label_head") and clf.decoder:
        clf.attach_label_head()
    if getattr(clf, "head", None) is None:
        raise ValueError("the head scheme needs a task head: classification, or an image "
                         "model; for multiple choice and generation use full, lora, prefix "
                         "or prompt")
    clf.requires_grad_(False)
    clf.head.requires_grad_(True)


def _wrap_peft(clf, scheme: str, *, lora_r: int, lora_alpha: int, virtual_tokens: int) -> None:
    """Replace ``clf.backbone`` by its peft model for ``scheme`` (lora, prefix or prompt)."""
    import peft

    if not hasattr(clf, "tokenizer"):
        raise ValueError(f"the {scheme} scheme is for language models here; fine-tune an "
                         "image model with full or head")
    if scheme == "lora":
        config = peft.LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                 target_modules="all-linear")
    else:
        config = _decoder_peft_config(peft, clf, scheme, virtual_tokens)
    clf.backbone = peft.get_peft_model(clf.backbone, config).eval()


def _decoder_peft_config(peft, clf, scheme: str, virtual_tokens: int):
    """The peft prefix- or prompt-tuning config for ``scheme``, which needs a decoder."""
    if not clf.decoder:
        raise ValueError(f"the {scheme} scheme is supported for decoder models here; "
                         "use full or lora for an encoder")
    kind = peft.PrefixTuningConfig if scheme == "prefix" else peft.PromptTuningConfig
    return kind(task_type="CAUSAL_LM", num_virtual_tokens=virtual_tokens)
