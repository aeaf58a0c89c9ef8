"""``TinyVLM``: a small vision-language classifier to exercise token compression on real images.

An image is cut into patches; each patch becomes one "image token" (a linear projection plus a learned 2-D
position embedding) spliced into a ``transformers`` Llama decoder between a short text prefix and a
question; the answer is the next token after the question, read from the logits of the class-name tokens.
The sequence is ``[BOS] prefix(4) <image tokens> question(8)``, like LLaVA's ``system <image> question``,
so DART's text pivots (tokens after the image) exist. The answer depends only on the image tokens, which
makes the accuracy under pruning a direct measure of what the kept tokens carry.

With :class:`~lightning_eff.tokens.TokenCompression` the module's ``token_span`` / ``token_grid`` tell the
callback where the compressible span is (no ``span:`` needed in the config).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_eff.utils.checks import check_int
from lightning_eff.utils.distributed import ProcessGroupCleanup

__all__ = ["TinyVLM", "DEFAULT_DECODER"]

DEFAULT_DECODER: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
_PAD, _BOS, _SPECIAL = 0, 1, 2

class TinyVLM(ProcessGroupCleanup, L.LightningModule):
    """Image patches as tokens in a Llama decoder, trained to answer the image's class.

    Args:
        decoder: ``transformers.LlamaConfig`` keyword arguments (plain values; ``vocab_size`` is set here).
        num_classes: number of answers (class tokens).
        image_size: side of the (square) input images.
        patch_size: side of a patch; ``(image_size / patch_size)^2`` image tokens.
        in_channels: image channels.
        prefix_len: text tokens before the image.
        question_len: text tokens after the image (>= DART's text pivots).
        attn_implementation: ``"sdpa"`` or ``"eager"`` (FastV needs eager).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.

    Example::

        >>> m = TinyVLM(image_size=8, patch_size=2)
        >>> m(torch.randn(3, 1, 8, 8)).shape, m.token_span, m.token_grid
        (torch.Size([3, 10]), (5, 16), (4, 4))
    """

    def __init__(
        self,
        decoder: dict[str, Any] | None = None,
        num_classes: int = 10,
        image_size: int = 16,
        patch_size: int = 1,
        in_channels: int = 1,
        prefix_len: int = 4,
        question_len: int = 8,
        attn_implementation: str = "sdpa",
        lr: float = 3e-3,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__()
        check_int(num_classes, "num_classes", minimum=2, owner="TinyVLM")
        check_int(image_size, "image_size", minimum=1, owner="TinyVLM")
        check_int(patch_size, "patch_size", minimum=1, owner="TinyVLM")
        check_int(in_channels, "in_channels", minimum=1, owner="TinyVLM")
        check_int(prefix_len, "prefix_len", minimum=0, owner="TinyVLM")
        check_int(question_len, "question_len", minimum=1, owner="TinyVLM")
        if image_size % patch_size:
            raise ValueError(
                f"TinyVLM: `image_size`={image_size} is not a multiple of `patch_size`={patch_size}."
            )
        if attn_implementation not in ("sdpa", "eager"):
            raise ValueError(
                f"TinyVLM: `attn_implementation` must be 'sdpa' or 'eager', got {attn_implementation!r}."
            )
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
            raise ValueError(f"TinyVLM: `lr` must be a positive float, got {lr!r}.")
        if decoder is not None and not isinstance(decoder, dict):
            raise TypeError(f"TinyVLM: `decoder` must be a dict of LlamaConfig arguments, got {decoder!r}.")
        self.save_hyperparameters()
        from transformers import LlamaConfig, LlamaForCausalLM

        self.grid = image_size // patch_size
        self.num_image_tokens = self.grid * self.grid
        self.prefix_len, self.question_len, self.num_classes = prefix_len, question_len, num_classes
        vocab = _SPECIAL + prefix_len + question_len + num_classes
        cfg = {**DEFAULT_DECODER, **(decoder or {})}
        cfg.update(vocab_size=vocab, pad_token_id=_PAD, bos_token_id=_BOS, eos_token_id=_PAD)
        cfg.setdefault("max_position_embeddings", 1 + prefix_len + self.num_image_tokens + question_len + 8)
        config = LlamaConfig(**cfg)
        config._attn_implementation = attn_implementation
        self.lm = LlamaForCausalLM(config)
        hidden = config.hidden_size
        self.patch_size = patch_size
        self.patch_embed = nn.Linear(in_channels * patch_size * patch_size, hidden)
        self.image_pos = nn.Parameter(torch.randn(self.num_image_tokens, hidden) * 0.02)
        first = _SPECIAL
        self.register_buffer("prefix_ids", torch.arange(first, first + prefix_len), persistent=False)
        first += prefix_len
        self.register_buffer("question_ids", torch.arange(first, first + question_len), persistent=False)
        first += question_len
        self.register_buffer("class_ids", torch.arange(first, first + num_classes), persistent=False)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    # ------------------------------------------------------------------------------------------ layout
    @property
    def token_span(self) -> tuple[int, int]:
        """``(start, length)`` of the image tokens in every sequence."""
        return 1 + self.prefix_len, self.num_image_tokens

    @property
    def token_grid(self) -> tuple[int, int]:
        return self.grid, self.grid

    @property
    def seq_len(self) -> int:
        return 1 + self.prefix_len + self.num_image_tokens + self.question_len

    def embed(self, images: Tensor) -> Tensor:
        """``[B, seq_len, D]`` input embeddings of a batch of images."""
        b = images.shape[0]
        p = self.patch_size
        patches = F.unfold(images, kernel_size=p, stride=p).transpose(1, 2)  # [B, N, C*p*p]
        if patches.shape[1] != self.num_image_tokens:
            raise ValueError(
                f"TinyVLM: images of shape {tuple(images.shape[1:])} give {patches.shape[1]} patches; the model "
                f"was built for {self.num_image_tokens} (image_size={self.hparams.image_size})."
            )
        img = self.patch_embed(patches) + self.image_pos
        emb = self.lm.get_input_embeddings()
        text_ids = torch.cat([torch.tensor([_BOS], device=images.device), self.prefix_ids]).expand(b, -1)
        pre, q = emb(text_ids), emb(self.question_ids).expand(b, -1, -1)
        return torch.cat([pre, img.to(pre.dtype), q], dim=1)

    def forward(self, images: Tensor) -> Tensor:
        """Class logits ``[B, num_classes]``: the next-token logits of the class tokens after the question."""
        out = self.lm.model(inputs_embeds=self.embed(images), use_cache=False)
        last = out.last_hidden_state[:, -1]
        return self.lm.lm_head(last)[:, self.class_ids]

    # ------------------------------------------------------------------------------------------ steps
    def _step(self, batch: Any, stage: str, metric: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"TinyVLM: the {stage} loss is {loss.item()}; lower the learning rate.")
        metric.update(logits.detach(), y)
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=stage == "train")
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=stage == "val")
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(-1)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
