"""Send pictures to whichever Lightning loggers are active (W&B, TensorBoard, CSV)."""

from __future__ import annotations

import io
import re
from pathlib import Path

from torch import Tensor

__all__ = ["log_image"]


def log_image(trainer, key: str, image: Tensor, step: int | None = None) -> list[str]:
    """Log a ``[C, H, W]`` image in ``[0, 1]`` to every logger of ``trainer`` that can take it.

    W&B gets a ``wandb.Image``, TensorBoard an ``add_image``; loggers without image support
    (CSV) get a PNG under ``<log_dir>/images/``. Returns the names of the loggers that received it.

    Example::

        >>> import torch, lightning as L
        >>> log_image(L.Trainer(logger=False), "grid", torch.rand(3, 8, 8))
        []
    """
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    step = trainer.global_step if step is None else step
    image = image.detach().float().clamp(0, 1).cpu()
    sent = []
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            logger.experiment.log({key: wandb.Image(image.permute(1, 2, 0).numpy()), "trainer/global_step": step})
            sent.append("wandb")
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, global_step=step)
            sent.append("tensorboard")
        elif isinstance(logger, CSVLogger) and logger.log_dir:
            from torchvision.utils import save_image

            folder = Path(logger.log_dir) / "images"
            folder.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            save_image(image, buffer, format="png")
            (folder / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', key)}_step{step}.png").write_bytes(buffer.getvalue())
            sent.append("csv")
    return sent
