"""``CausalLMModule``: fine-tune any ``transformers`` causal LM on instruction data, evaluated by generation.

The model is a local path (``AutoModelForCausalLM.from_pretrained(path)``, nothing is downloaded) or a
config dict (``{"model_type": "llama", "hidden_size": 64, ...}``: a random-initialised model, as in the
tests and the arithmetic demo). It is built when the module is created (so LightningCLI's ``--optimizer``
sees its parameters), except with ``lazy_init=True`` or when the path does not exist yet (a pipeline
config that names the output of an earlier run): then it is built in Lightning's ``configure_model`` hook,
which is also where large models are built under a sharded strategy. ``load_from_checkpoint`` rebuilds it
from the saved hyperparameters.

Training minimises the next-token cross-entropy on the answer tokens only (prompt and padding tokens
have label -100, see :class:`~lightning_eff.llm.data.InstructionCollator`). Validation and test also
generate greedily from the prompt and score the output against the reference: GSM8K exact match of the
final number (``metric="exact_match"``) or ROUGE-L F1 (``metric="rouge_l"``). LoRA (``lora={...}``, a
``peft.LoraConfig``) is optional; any ``torch.optim`` optimizer or :class:`~lightning_eff.optim.KO` can be
chosen with ``--optimizer``.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor
from torchmetrics import MeanMetric

from lightning_eff.llm.metrics import METRICS, exact_match, extract_answer, rouge_l_f1
from lightning_eff.utils.checks import check_int
from lightning_eff.utils.distributed import ProcessGroupCleanup
from lightning_eff.utils.hparams import save_plain_hyperparameters
from lightning_eff.utils.optim import optimizer_config

__all__ = ["CausalLMModule", "SavePretrained", "build_causal_lm", "score_answer", "eos_token_ids", "DTYPES"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS id plus those of the model's generation config (e.g. Llama-3's ``<|eot_id|>``)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    for i in [extra] if isinstance(extra, int) else list(extra or []):
        if i not in ids:
            ids.append(int(i))
    return ids


def score_answer(prediction: str, reference: str, metric: str = "exact_match") -> float:
    """Score one generated answer: exact match of the final numbers, or ROUGE-L F1 of the texts.

    Example::

        >>> score_answer("2 + 3 = 5\\n#### 5", "#### 5"), score_answer("#### 6", "#### 5")
        (1.0, 0.0)
    """
    if metric == "exact_match":
        return exact_match(extract_answer(prediction), extract_answer(reference))
    if metric == "rouge_l":
        return rouge_l_f1(prediction, reference)
    raise ValueError(f"score_answer: `metric` must be one of {tuple(METRICS)}, got {metric!r}.")


def build_causal_lm(
    model: str | dict[str, Any],
    tokenizer: Any = None,
    dtype: str | None = None,
    attn_implementation: str | None = None,
) -> Any:
    """A ``transformers`` causal LM from a local path or a config dict.

    A config dict needs ``model_type`` (``"llama"``, ``"qwen2"``, ``"mistral"``, ...); the other keys are that
    config's arguments. ``vocab_size`` and the pad/BOS/EOS ids default to the tokenizer's. The weights are
    random (seed with ``lightning.seed_everything`` for reproducibility). A model whose vocabulary is smaller
    than the tokenizer's gets its embeddings resized.

    Args:
        model: local directory of a pretrained model, or a config dict.
        tokenizer: tokenizer whose vocabulary the model must cover (optional for a path).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``None`` (the checkpoint's / float32).
        attn_implementation: ``"sdpa"``, ``"eager"``, ... or ``None`` (transformers' default).

    Example::

        >>> from lightning_eff.llm.tokenization import load_tokenizer
        >>> tok = load_tokenizer("arithmetic-bpe")
        >>> lm = build_causal_lm({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        ...                       "num_hidden_layers": 2, "num_attention_heads": 4}, tok)
        >>> lm.config.vocab_size == len(tok), lm.config.pad_token_id == tok.pad_token_id
        (True, True)
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"build_causal_lm: `dtype` must be one of {tuple(DTYPES)} or None, got {dtype!r}.")
    torch_dtype = DTYPES[dtype] if dtype is not None else None
    import transformers
    from packaging.version import Version

    # transformers renamed `torch_dtype` to `dtype` in 4.56; older versions pass an unknown `dtype` to the model
    dtype_key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    kwargs: dict[str, Any] = {dtype_key: torch_dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isdir(path):
            raise ValueError(
                f"build_causal_lm: `model` {path!r} is not an existing local directory (nothing is downloaded); "
                f"give a directory written by `save_pretrained`, or a config dict."
            )
        lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)
    elif isinstance(model, dict):
        cfg = dict(model)
        model_type = cfg.pop("model_type", None)
        if not isinstance(model_type, str):
            raise ValueError(
                f"build_causal_lm: a config dict needs a `model_type` (e.g. 'llama'), got keys {sorted(model)}."
            )
        if tokenizer is not None:
            cfg.setdefault("vocab_size", len(tokenizer))
            for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
                value = getattr(tokenizer, key, None)
                if value is not None:
                    cfg.setdefault(key, value)
        try:
            config = AutoConfig.for_model(model_type, **cfg)
        except (KeyError, ValueError) as err:
            raise ValueError(
                f"build_causal_lm: cannot build a {model_type!r} config from {model}: {err}"
            ) from err
        lm = AutoModelForCausalLM.from_config(config, **kwargs)
    else:
        raise TypeError(
            f"build_causal_lm: `model` must be a local path or a config dict, got {model!r} ({type(model).__name__})."
        )
    if tokenizer is not None and len(tokenizer) > lm.get_input_embeddings().weight.shape[0]:
        lm.resize_token_embeddings(len(tokenizer))
    if tokenizer is not None and lm.config.pad_token_id is None:
        lm.config.pad_token_id = tokenizer.pad_token_id
    return lm


class CausalLMModule(ProcessGroupCleanup, L.LightningModule):
    """Supervised fine-tuning of a causal LM on instruction data, with greedy-generation evaluation.

    Batches come from :class:`~lightning_eff.llm.data.InstructionDataModule` (or any DataModule using its
    :class:`~lightning_eff.llm.data.InstructionCollator`). Logs ``train/loss``; ``val/loss`` and
    ``val/<metric>`` (progress bar); ``test/loss`` and ``test/<metric>``. ``<metric>`` is the mean over
    examples of :func:`score_answer` and reduces across DDP ranks.

    Args:
        model: local path of a pretrained causal LM, or a config dict with ``model_type`` (random init).
        tokenizer: tokenizer spec (built-in ``"arithmetic-bpe"`` or a local path); default: the model path.
        optimizer: callable ``params -> Optimizer`` (default ``torch.optim.AdamW``, lr 1e-3); ``--optimizer KO`` works.
        lr_scheduler: optional callable ``optimizer -> LRScheduler``.
        lora: keyword arguments of ``peft.LoraConfig`` to train LoRA adapters only (needs ``peft``).
        metric: ``"exact_match"`` (GSM8K final number) or ``"rouge_l"``.
        max_new_tokens: generation budget per answer in evaluation.
        generate_eval: generate and score answers in validation/test (loss only when ``False``).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``None``.
        attn_implementation: transformers attention backend (``None``: its default, SDPA).
        gradient_checkpointing: enable the model's activation checkpointing.
        lazy_init: build the model in ``configure_model`` only (for sharded strategies such as FSDP; then the
            optimizer must be the module's ``optimizer`` argument, since LightningCLI's ``--optimizer`` needs the
            parameters at instantiation).

    Example::

        >>> from lightning_eff.llm.data import InstructionDataModule
        >>> dm = InstructionDataModule(num_train=4, num_val=2, num_test=2, batch_size=2)
        >>> dm.setup()
        >>> tiny = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        ...         "num_attention_heads": 2}
        >>> module = CausalLMModule(tiny, tokenizer="arithmetic-bpe", max_new_tokens=4)
        >>> loss = module.training_step(next(iter(dm.train_dataloader())), 0)
        >>> bool(loss > 0)
        True
    """

    def __init__(
        self,
        model: str | dict[str, Any],
        tokenizer: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        lora: dict[str, Any] | None = None,
        metric: str = "exact_match",
        max_new_tokens: int = 64,
        generate_eval: bool = True,
        dtype: str | None = None,
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        lazy_init: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if isinstance(model, os.PathLike):
            model = os.fspath(model)
        if not isinstance(model, (str, dict)):
            raise TypeError(f"{name}: `model` must be a local path (str) or a config dict, got {model!r}.")
        if isinstance(model, dict) and not isinstance(model.get("model_type"), str):
            raise ValueError(
                f"{name}: a config dict `model` needs a str `model_type` (e.g. 'llama'), got {model!r}."
            )
        if tokenizer is None and not isinstance(model, str):
            raise ValueError(
                f"{name}: `tokenizer` is required when `model` is a config dict (e.g. 'arithmetic-bpe')."
            )
        if tokenizer is not None and not isinstance(tokenizer, str):
            raise TypeError(
                f"{name}: `tokenizer` must be a built-in name or a local path, got {tokenizer!r}."
            )
        if not callable(optimizer):
            raise TypeError(f"{name}: `optimizer` must be a callable params -> Optimizer, got {optimizer!r}.")
        if lr_scheduler is not None and not callable(lr_scheduler):
            raise TypeError(f"{name}: `lr_scheduler` must be None or a callable optimizer -> LRScheduler.")
        if lora is not None and not isinstance(lora, dict):
            raise TypeError(
                f"{name}: `lora` must be None or a dict of peft.LoraConfig arguments, got {lora!r}."
            )
        if metric not in METRICS:
            raise ValueError(f"{name}: `metric` must be one of {tuple(METRICS)}, got {metric!r}.")
        check_int(max_new_tokens, "max_new_tokens", minimum=1, owner=name)
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"{name}: `dtype` must be one of {tuple(DTYPES)} or None, got {dtype!r}.")
        self.model_spec = copy.deepcopy(model)
        self.tokenizer_spec = tokenizer if tokenizer is not None else model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.lora = dict(lora) if lora is not None else None
        self.metric = metric
        self.max_new_tokens = max_new_tokens
        self.generate_eval = bool(generate_eval)
        self.dtype_name = dtype
        self.attn_implementation = attn_implementation
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.model: Any = None
        self._tokenizer: Any = None
        self.lazy_init = bool(lazy_init)
        self._save_plain_hyperparameters()
        self.val_score = MeanMetric()
        self.test_score = MeanMetric()
        if not self.lazy_init and (isinstance(model, dict) or os.path.isdir(model)):
            self.configure_model()

    def _save_plain_hyperparameters(self) -> None:
        save_plain_hyperparameters(
            self,
            {
                "model": self.model_spec,
                "tokenizer": self.tokenizer_spec,
                "lora": self.lora,
                "metric": self.metric,
                "max_new_tokens": self.max_new_tokens,
                "generate_eval": self.generate_eval,
                "dtype": self.dtype_name,
                "attn_implementation": self.attn_implementation,
                "gradient_checkpointing": self.gradient_checkpointing,
                "lazy_init": self.lazy_init,
            },
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
        )

    # ------------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The tokenizer (loaded on first access)."""
        if self._tokenizer is None:
            from lightning_eff.llm.tokenization import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_spec)
        return self._tokenizer

    def configure_model(self) -> None:
        """Build the causal LM (idempotent): from the path or config, then LoRA and checkpointing if asked."""
        if self.model is not None:
            return
        lm = build_causal_lm(self.model_spec, self.tokenizer, self.dtype_name, self.attn_implementation)
        if self.gradient_checkpointing:
            lm.gradient_checkpointing_enable()
            lm.config.use_cache = False
        if self.lora is not None:
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError as err:
                raise ImportError("CausalLMModule(lora=...) needs peft: `pip install peft`.") from err
            lm = get_peft_model(lm, LoraConfig(task_type="CAUSAL_LM", **self.lora))
        self.model = lm

    def _require_model(self) -> Any:
        if self.model is None:
            raise RuntimeError(
                f"{type(self).__name__}: the model is not built yet; call `configure_model()` (the Trainer does)."
            )
        return self.model

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None
    ) -> Any:
        """The causal LM's output (``loss`` when ``labels`` are given)."""
        return self._require_model()(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def _loss(self, batch: dict[str, Any], stage: str, batch_idx: int) -> Tensor:
        loss = self(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"CausalLMModule: the {stage} loss is {loss.item()} at epoch {self.current_epoch}, batch {batch_idx} "
                f"(global step {self.global_step}); lower the learning rate or check the data."
            )
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Cross-entropy on the answer tokens."""
        loss = self._loss(batch, "train", batch_idx)
        self.log(
            "train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["answers"])
        )
        return loss

    @torch.no_grad()
    def generate_answers(
        self, prompt_ids: Tensor, prompt_attention_mask: Tensor, max_new_tokens: int | None = None
    ) -> list[str]:
        """Greedy continuations of left-padded prompts, decoded without special tokens."""
        from transformers import GenerationConfig

        model = self._require_model()
        tok = self.tokenizer
        config = GenerationConfig(
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=eos_token_ids(model, tok),
        )
        out = model.generate(
            input_ids=prompt_ids, attention_mask=prompt_attention_mask, generation_config=config
        )
        return tok.batch_decode(out[:, prompt_ids.shape[1] :], skip_special_tokens=True)

    def _eval_step(self, batch: dict[str, Any], batch_idx: int, stage: str, score: MeanMetric) -> Tensor:
        loss = self._loss(batch, stage, batch_idx)
        n = len(batch["answers"])
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=stage == "val", sync_dist=True, batch_size=n)
        if self.generate_eval:
            preds = self.generate_answers(batch["prompt_ids"], batch["prompt_attention_mask"])
            values = torch.tensor([score_answer(p, r, self.metric) for p, r in zip(preds, batch["answers"])])
            score.update(values.to(self.device))
            self.log(f"{stage}/{self.metric}", score, on_epoch=True, prog_bar=stage == "val", batch_size=n)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Validation loss and generation score."""
        return self._eval_step(batch, batch_idx, "val", self.val_score)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Test loss and generation score."""
        return self._eval_step(batch, batch_idx, "test", self.test_score)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[str]:
        """Generated answers of a batch."""
        return self.generate_answers(batch["prompt_ids"], batch["prompt_attention_mask"])

    def configure_optimizers(self) -> Any:
        """``optimizer`` over the trainable parameters, plus ``lr_scheduler`` when given."""
        params = [p for p in self.parameters() if p.requires_grad]
        return optimizer_config(self.optimizer, params, self.lr_scheduler, monitor="val/loss")

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write the model (LoRA merged into a copy) and tokenizer with ``save_pretrained``; returns the path.

        The directory can be given back as ``model=`` (or as a Data Whisperer scorer).
        """
        model = self._require_model()
        if self.lora is not None and hasattr(model, "merge_and_unload"):
            model = copy.deepcopy(model).merge_and_unload()
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        return directory


class SavePretrained(Callback):
    """Writes the trained :class:`CausalLMModule` as a ``save_pretrained`` directory when fitting ends.

    Args:
        dirpath: output directory (default ``<trainer.default_root_dir>/pretrained``).

    Example::

        >>> SavePretrained("outputs/arith/pretrained").dirpath
        'outputs/arith/pretrained'
    """

    def __init__(self, dirpath: str | None = None) -> None:
        if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
            raise TypeError(f"SavePretrained: `dirpath` must be a path or None, got {dirpath!r}.")
        self.dirpath = None if dirpath is None else os.fspath(dirpath)

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, CausalLMModule):
            rank_zero_warn(
                f"SavePretrained: {type(pl_module).__name__} is not a CausalLMModule; nothing saved."
            )
            return
        path = self.dirpath or os.path.join(trainer.default_root_dir, "pretrained")
        pl_module.save_pretrained(path)
