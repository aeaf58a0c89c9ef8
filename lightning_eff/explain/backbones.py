"""Frozen backbones AutoGnothi can explain, and one way to run each with masked players.

Supported (checked by :func:`make_adapter`):

* torchvision :class:`~torchvision.models.VisionTransformer` (and :class:`TinyViT`, a subclass with a grey-scale
  patch stem for digits);
* ``transformers`` image classifiers whose ``forward`` takes ``pixel_values`` and ``attention_mask``
  (``ViTForImageClassification`` with transformers >= 5);
* ``transformers`` sequence classifiers taking ``input_ids`` and ``attention_mask`` (``BertForSequenceClassification``
  and other BERT-like encoders).

:meth:`BackboneAdapter.run` returns the classifier's logits and the hidden state after every layer in one pass.
Without a keep-mask it computes exactly what the backbone's own ``forward`` computes (same modules, same order),
so the logits are bit-identical. With a keep-mask ``[B, T]`` the removed tokens are excluded from every
attention: torchvision blocks get a ``key_padding_mask`` (``-inf``) or, in ``"multiply"`` mode, an attention
that multiplies scores by the mask; transformers models get the mask as their ``attention_mask`` and, in
``"multiply"`` mode, a registered attention function that does the multiplication.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import VisionTransformer

from lightning_eff.utils.checks import check_int

__all__ = ["BackboneAdapter", "TinyViT", "load_backbone", "load_backbone_weights", "make_adapter"]

_MULTIPLY = "autognothi_multiply"


class TinyViT(VisionTransformer):
    """A torchvision ``VisionTransformer`` for small images, with ``in_channels`` and ``get_config()``.

    Args:
        image_size: side of the square input.
        patch_size: side of a patch (must divide ``image_size``).
        num_layers: encoder layers.
        num_heads: attention heads.
        hidden_dim: token width.
        mlp_dim: MLP width.
        num_classes: output classes.
        in_channels: image channels (torchvision's class is fixed to 3).
        dropout: dropout.
        attention_dropout: attention dropout.

    Example::

        >>> net = TinyViT(image_size=8, patch_size=2, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
        >>> net(torch.randn(3, 1, 8, 8)).shape
        torch.Size([3, 10])
    """

    def __init__(
        self,
        image_size: int = 8,
        patch_size: int = 2,
        num_layers: int = 4,
        num_heads: int = 4,
        hidden_dim: int = 64,
        mlp_dim: int = 128,
        num_classes: int = 10,
        in_channels: int = 1,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
    ) -> None:
        check_int(in_channels, "in_channels", minimum=1, owner="TinyViT")
        if image_size % patch_size:
            raise ValueError(f"TinyViT: `patch_size`={patch_size} must divide `image_size`={image_size}.")
        super().__init__(
            image_size=image_size,
            patch_size=patch_size,
            num_layers=num_layers,
            num_heads=num_heads,
            hidden_dim=hidden_dim,
            mlp_dim=mlp_dim,
            dropout=dropout,
            attention_dropout=attention_dropout,
            num_classes=num_classes,
        )
        self.in_channels = in_channels
        if in_channels != 3:
            self.conv_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
            fan_in = in_channels * patch_size * patch_size
            nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
            nn.init.zeros_(self.conv_proj.bias)
        self._config = {
            "image_size": image_size,
            "patch_size": patch_size,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "hidden_dim": hidden_dim,
            "mlp_dim": mlp_dim,
            "num_classes": num_classes,
            "in_channels": in_channels,
            "dropout": dropout,
            "attention_dropout": attention_dropout,
        }

    def get_config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this network (used to save hyperparameters)."""
        return dict(self._config)


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------
def _strip_state_dict(obj: Any, path: str) -> dict[str, Tensor]:
    """A plain state dict from a Lightning checkpoint (the ``net.`` or ``backbone.`` sub-dict) or a raw one."""
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"AutoGnothi: `backbone_weights`={path!r} holds no state dict of tensors.")
    for prefix in ("net.", "backbone."):
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            return sub
    return state


def load_backbone(backbone: nn.Module | str) -> nn.Module:
    """The backbone module from a module, a local ``transformers`` folder or a classifier checkpoint.

    Args:
        backbone: an ``nn.Module``; a folder holding a ``transformers`` ``config.json`` (loaded offline with
            ``from_pretrained``); or a Lightning ``.ckpt`` of :class:`~lightning_eff.models.ImageClassifier`
            (its ``net``).

    Example::

        >>> net = load_backbone(TinyViT(num_layers=1, hidden_dim=16, num_heads=2, mlp_dim=16))
        >>> type(net).__name__
        'TinyViT'
    """
    if isinstance(backbone, nn.Module):
        return backbone
    if not isinstance(backbone, str):
        raise TypeError(f"AutoGnothi: `backbone` must be an nn.Module or a path, got {backbone!r}.")
    path = os.path.expanduser(backbone)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ValueError(f"AutoGnothi: `backbone` folder {path!r} has no transformers config.json.")
        from transformers import (
            AutoConfig,
            AutoModelForImageClassification,
            AutoModelForSequenceClassification,
        )

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        archs = " ".join(getattr(config, "architectures", None) or [])
        auto = (
            AutoModelForSequenceClassification
            if "SequenceClassification" in archs
            else AutoModelForImageClassification
        )
        return auto.from_pretrained(path, local_files_only=True)
    if os.path.isfile(path) and path.endswith(".ckpt"):
        from lightning_eff.models import ImageClassifier

        return ImageClassifier.load_from_checkpoint(path, map_location="cpu").net
    if os.path.exists(path):
        raise ValueError(
            f"AutoGnothi: `backbone`={backbone!r} is a file but not a Lightning .ckpt of ImageClassifier; give the "
            f"architecture as `backbone` (a module config) and this file as `backbone_weights`."
        )
    raise FileNotFoundError(
        f"AutoGnothi: `backbone`={backbone!r} does not exist; give a module (config), a local transformers folder or "
        f"a Lightning .ckpt of an ImageClassifier."
    )


def load_backbone_weights(module: nn.Module, weights: str) -> None:
    """Load ``weights`` into ``module`` (strictly).

    ``weights`` is a Lightning checkpoint (its ``net.`` or ``backbone.`` sub-dict, e.g. an ImageClassifier's), a
    ``torch.save``-d state dict, a ``.safetensors`` file, or a local ``transformers`` folder (loaded with
    ``type(module).from_pretrained``, which also converts old parameter names).

    Example::

        >>> import tempfile, os
        >>> a, b = TinyViT(num_layers=1, hidden_dim=16, num_heads=2, mlp_dim=16), TinyViT(num_layers=1, hidden_dim=16, num_heads=2, mlp_dim=16)
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pt"); torch.save(a.state_dict(), path)
        >>> load_backbone_weights(b, path); torch.equal(a.conv_proj.weight, b.conv_proj.weight)
        True
    """
    path = os.path.expanduser(weights)
    if os.path.isdir(path):
        from_pretrained = getattr(type(module), "from_pretrained", None)
        if from_pretrained is None:
            raise ValueError(
                f"AutoGnothi: `backbone_weights`={weights!r} is a folder but the backbone is not a transformers model."
            )
        state = from_pretrained(path, local_files_only=True).state_dict()
    elif not os.path.isfile(path):
        raise FileNotFoundError(
            f"AutoGnothi: `backbone_weights`={weights!r} does not exist (train the classifier first, or fix the path)."
        )
    elif path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = _strip_state_dict(torch.load(path, map_location="cpu", weights_only=True), weights)
    module.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------------------------------
def _mha_multiply(mha: nn.MultiheadAttention, x: Tensor, keep: Tensor) -> Tensor:
    """``nn.MultiheadAttention`` (batch_first, self-attention) with scores multiplied by the 0/1 ``keep`` mask."""
    from lightning_eff.explain.side import masked_attention

    b, t, d = x.shape
    h = mha.num_heads
    q, k, v = (
        F.linear(x, mha.in_proj_weight, mha.in_proj_bias).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
    )
    out = masked_attention(q, k, v, keep, "multiply", mha.dropout if mha.training else 0.0)
    return mha.out_proj(out.transpose(1, 2).reshape(b, t, d))


def _register_hf_multiply() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def multiply_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if scaling is None:
            scaling = query.size(-1) ** -0.5
        key = (
            key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            if key.shape[1] != query.shape[1]
            else key
        )
        value = (
            value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
            if value.shape[1] != query.shape[1]
            else value
        )
        scores = query @ key.transpose(2, 3) * scaling
        if attention_mask is not None:
            keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
            scores = scores * keep.to(scores.dtype)
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
        probs = F.dropout(probs, p=dropout, training=module.training)
        return (probs @ value).transpose(1, 2).contiguous(), probs

    AttentionInterface.register(_MULTIPLY, multiply_attention)
    AttentionMaskInterface.register(_MULTIPLY, sdpa_mask)


class BackboneAdapter:
    """Static description of a supported backbone and how to run it (see the module docstring).

    Attributes:
        kind: ``"torchvision_vit"``, ``"hf_image"`` or ``"hf_text"``.
        modality: ``"image"`` or ``"text"``.
        hidden_dim, num_layers, num_heads, num_classes: backbone sizes.
        token_grid: ``(gh, gw)`` patch grid for images, ``None`` for text.
        max_tokens: maximal sequence length (with CLS).

    Example::

        >>> vit = TinyViT(num_layers=2, hidden_dim=16, num_heads=2, mlp_dim=16).eval()
        >>> adapter = make_adapter(vit)
        >>> x = torch.randn(2, 1, 8, 8)
        >>> logits, hiddens = adapter.run(vit, x)
        >>> torch.equal(logits, vit(x)), len(hiddens), tuple(hiddens[0].shape)
        (True, 2, (2, 17, 16))
    """

    def __init__(
        self,
        kind: str,
        hidden_dim: int,
        num_layers: int,
        num_heads: int,
        num_classes: int,
        token_grid: tuple[int, int] | None,
        max_tokens: int,
    ) -> None:
        self.kind = kind
        self.modality = "text" if kind == "hf_text" else "image"
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.token_grid = token_grid
        self.max_tokens = max_tokens

    # ------------------------------------------------------------------------------------------
    def token_valid(self, inputs: Any) -> Tensor:
        """Boolean ``[B, T]`` of real (non-padding) tokens, CLS included."""
        if self.modality == "image":
            x = inputs
            return torch.ones(x.shape[0], self.max_tokens, dtype=torch.bool, device=x.device)
        mask = inputs.get("attention_mask")
        if mask is None:
            return torch.ones_like(inputs["input_ids"], dtype=torch.bool)
        return mask.bool()

    def batch_size(self, inputs: Any) -> int:
        return inputs.shape[0] if self.modality == "image" else inputs["input_ids"].shape[0]

    def repeat(self, inputs: Any, times: int) -> Any:
        """Each input repeated ``times`` times consecutively (``repeat_interleave`` on the batch)."""
        if self.modality == "image":
            return inputs.repeat_interleave(times, dim=0)
        return {k: v.repeat_interleave(times, dim=0) for k, v in inputs.items()}

    def select(self, inputs: Any, index: slice | Tensor) -> Any:
        if self.modality == "image":
            return inputs[index]
        return {k: v[index] for k, v in inputs.items()}

    def check_inputs(self, inputs: Any) -> None:
        """Raise ``ValueError`` if ``inputs`` do not fit this backbone."""
        if self.modality == "image":
            if not isinstance(inputs, Tensor) or inputs.ndim != 4:
                got = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
                raise ValueError(f"AutoGnothi: image backbones take images [B, C, H, W], got {got}.")
            return
        if not isinstance(inputs, dict) or "input_ids" not in inputs:
            raise ValueError(
                f"AutoGnothi: text backbones take a dict with `input_ids` (and `attention_mask`), got {type(inputs).__name__}."
            )
        if inputs["input_ids"].shape[1] > self.max_tokens:
            raise ValueError(
                f"AutoGnothi: sequences of {inputs['input_ids'].shape[1]} tokens exceed the backbone's "
                f"{self.max_tokens} positions."
            )

    # ------------------------------------------------------------------------------------------
    def run(
        self, backbone: nn.Module, inputs: Any, keep: Tensor | None = None, mode: str = "exclude"
    ) -> tuple[Tensor, list[Tensor]]:
        """Logits ``[B, C]`` and per-layer hidden states (``L`` tensors ``[B, T, d]``), players removed by ``keep``."""
        if self.kind == "torchvision_vit":
            return self._run_torchvision(backbone, inputs, keep, mode)
        kwargs = {"pixel_values": inputs} if self.modality == "image" else dict(inputs)
        if keep is not None:
            kwargs["attention_mask"] = keep.long()
        ctx = (
            self._multiply(backbone)
            if (keep is not None and mode == "multiply")
            else contextlib.nullcontext()
        )
        with ctx:
            out = backbone(**kwargs, output_hidden_states=True)
        hiddens = list(out.hidden_states[1:])
        return out.logits, hiddens

    @staticmethod
    @contextlib.contextmanager
    def _multiply(backbone: nn.Module) -> Iterator[None]:
        _register_hf_multiply()
        config = backbone.config
        previous = config._attn_implementation
        config._attn_implementation = _MULTIPLY
        try:
            yield
        finally:
            config._attn_implementation = previous

    @staticmethod
    def _run_torchvision(
        vit: VisionTransformer, x: Tensor, keep: Tensor | None, mode: str
    ) -> tuple[Tensor, list[Tensor]]:
        # Mirrors VisionTransformer.forward and Encoder.forward op for op (bit-identical without `keep`).
        n = x.shape[0]
        h = vit._process_input(x)
        h = torch.cat([vit.class_token.expand(n, -1, -1), h], dim=1)
        enc = vit.encoder
        h = enc.dropout(h + enc.pos_embedding)
        hiddens = []
        for blk in enc.layers:
            if keep is None:
                h = blk(h)
            else:
                y = blk.ln_1(h)
                if mode == "multiply":
                    y = _mha_multiply(blk.self_attention, y, keep)
                else:
                    y, _ = blk.self_attention(y, y, y, key_padding_mask=~keep, need_weights=False)
                x1 = blk.dropout(y) + h
                h = x1 + blk.mlp(blk.ln_2(x1))
            hiddens.append(h)
        h = enc.ln(h)
        return vit.heads(h[:, 0]), hiddens


def make_adapter(backbone: nn.Module) -> BackboneAdapter:
    """Describe ``backbone`` (raises ``TypeError`` for unsupported models).

    Example::

        >>> a = make_adapter(TinyViT(num_layers=2, hidden_dim=16, num_heads=2, mlp_dim=16))
        >>> a.kind, a.num_layers, a.token_grid, a.max_tokens
        ('torchvision_vit', 2, (4, 4), 17)
    """
    if isinstance(backbone, VisionTransformer):
        blocks = list(backbone.encoder.layers)
        if not isinstance(backbone.conv_proj, nn.Conv2d):
            raise TypeError(
                "AutoGnothi: torchvision ViTs with a convolutional stem are not supported (players = patches)."
            )
        g = backbone.image_size // backbone.patch_size
        return BackboneAdapter(
            "torchvision_vit",
            hidden_dim=backbone.hidden_dim,
            num_layers=len(blocks),
            num_heads=blocks[0].num_heads,
            num_classes=backbone.num_classes,
            token_grid=(g, g),
            max_tokens=g * g + 1,
        )
    config = getattr(backbone, "config", None)
    main_input = getattr(backbone, "main_input_name", None)
    if config is not None and main_input in ("pixel_values", "input_ids"):
        params = inspect.signature(backbone.forward).parameters
        if "attention_mask" not in params:
            raise TypeError(
                f"AutoGnothi: {type(backbone).__name__}.forward takes no `attention_mask`, so players cannot be removed "
                f"inside attention (transformers ViT models take one from transformers 5 on)."
            )
        common = {
            "hidden_dim": config.hidden_size,
            "num_layers": config.num_hidden_layers,
            "num_heads": config.num_attention_heads,
            "num_classes": config.num_labels,
        }
        if main_input == "pixel_values":
            size = (
                config.image_size
                if isinstance(config.image_size, (tuple, list))
                else (config.image_size,) * 2
            )
            patch = (
                config.patch_size
                if isinstance(config.patch_size, (tuple, list))
                else (config.patch_size,) * 2
            )
            grid = (size[0] // patch[0], size[1] // patch[1])
            return BackboneAdapter("hf_image", token_grid=grid, max_tokens=grid[0] * grid[1] + 1, **common)
        return BackboneAdapter(
            "hf_text", token_grid=None, max_tokens=config.max_position_embeddings, **common
        )
    raise TypeError(
        f"AutoGnothi: unsupported backbone {type(backbone).__name__}; expected a torchvision VisionTransformer or a "
        f"transformers image / sequence classifier."
    )
