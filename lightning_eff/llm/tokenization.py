"""Tokenizers that need no download: a byte-level BPE trained locally, and loading from a local path.

:func:`train_bpe_tokenizer` trains a byte-level BPE (the GPT-2 / Llama-3 family of tokenizers) with the
``tokenizers`` library on any texts and wraps it as a ``transformers.PreTrainedTokenizerFast`` with
``<s>`` (BOS, prepended by the post-processor), ``</s>`` (EOS) and ``<pad>``. :func:`load_tokenizer`
resolves the tokenizer specs the configs use: the built-in ``"arithmetic-bpe"`` (a BPE trained on
generated arithmetic problems and the phrases of Data Whisperer's prompt, both from
:mod:`lightning_eff.llm.arithmetic`; deterministic and cached per process) or a local directory.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from typing import Any

from lightning_eff.utils.checks import check_int

__all__ = ["train_bpe_tokenizer", "arithmetic_tokenizer", "load_tokenizer", "BUILTIN_TOKENIZERS"]

#: Names :func:`load_tokenizer` understands besides local paths.
BUILTIN_TOKENIZERS = ("arithmetic-bpe",)

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 2, individual_digits: bool = True
) -> Any:
    """Train a byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    Token ids 0, 1, 2 are ``<pad>``, ``<s>``, ``</s>``. The tokenizer prepends ``<s>`` when called with
    ``add_special_tokens=True`` (the default), reports character offsets (``return_offsets_mapping``) and
    decodes back to the exact text.

    Args:
        texts: training texts.
        vocab_size: target vocabulary size (>= 260: 256 bytes + 3 special tokens + merges).
        min_frequency: minimum pair count for a merge.
        individual_digits: split numbers into single digits before BPE (as Llama-2 and Qwen tokenizers do),
            which makes arithmetic learnable by small models.

    Example::

        >>> tok = train_bpe_tokenizer(["3 + 4 = 7", "12 + 5 = 17"] * 20, vocab_size=300)
        >>> tok.decode(tok("3 + 4 = 7")["input_ids"], skip_special_tokens=True)
        '3 + 4 = 7'
        >>> tok.convert_ids_to_tokens(tok("7")["input_ids"])[0], tok.pad_token_id, tok.eos_token_id
        ('<s>', 0, 2)
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    check_int(vocab_size, "vocab_size", minimum=260, owner="train_bpe_tokenizer")
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if individual_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, clean_up_tokenization_spaces=False
    )


@functools.lru_cache(maxsize=4)
def _cached_arithmetic_tokenizer(vocab_size: int, phrases: tuple[str, ...]) -> Any:
    from lightning_eff.llm.arithmetic import arithmetic_corpus

    return train_bpe_tokenizer(arithmetic_corpus(phrases), vocab_size=vocab_size)


def arithmetic_tokenizer(vocab_size: int = 512, phrases: Sequence[str] | None = None) -> Any:
    """The built-in byte-level BPE trained on generated arithmetic problems (a fresh copy each call).

    Its corpus is :func:`~lightning_eff.llm.arithmetic.arithmetic_corpus` of ``phrases`` (default
    :data:`~lightning_eff.llm.arithmetic.ICL_PROMPT_PHRASES`, which is the ``"arithmetic-bpe"`` tokenizer).
    Deterministic for a given ``tokenizers`` version; trained once per process (about 0.3 s).

    Example::

        >>> tok = arithmetic_tokenizer()
        >>> len(tok) <= 512 and tok.decode(tok("Tom has 3 apples.")["input_ids"][1:]) == "Tom has 3 apples."
        True
    """
    import copy

    from lightning_eff.llm.arithmetic import ICL_PROMPT_PHRASES

    phrases = ICL_PROMPT_PHRASES if phrases is None else tuple(phrases)
    return copy.deepcopy(_cached_arithmetic_tokenizer(vocab_size, phrases))


def load_tokenizer(spec: Any, padding_side: str = "right") -> Any:
    """Resolve a tokenizer spec: a tokenizer object, a built-in name, or a local directory.

    A tokenizer without a pad token gets ``pad_token = eos_token`` (as Data Whisperer's code does).

    Args:
        spec: ``"arithmetic-bpe"``, a local path readable by ``AutoTokenizer.from_pretrained``, or an
            already built tokenizer (returned as is, apart from the pad token).
        padding_side: ``"left"`` or ``"right"``.

    Example::

        >>> load_tokenizer("arithmetic-bpe").pad_token
        '<pad>'
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"load_tokenizer: `padding_side` must be 'left' or 'right', got {padding_side!r}.")
    if isinstance(spec, str):
        if spec in BUILTIN_TOKENIZERS:
            tok = arithmetic_tokenizer()
        elif os.path.isdir(spec) or os.path.isfile(spec):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
        else:
            raise ValueError(
                f"load_tokenizer: tokenizer {spec!r} is neither a built-in name {BUILTIN_TOKENIZERS} nor an existing "
                f"local path (nothing is downloaded)."
            )
    elif callable(spec) and hasattr(spec, "encode") and hasattr(spec, "decode"):
        tok = spec
    else:
        raise TypeError(
            f"load_tokenizer: `spec` must be a built-in name {BUILTIN_TOKENIZERS}, a local path or a tokenizer, "
            f"got {spec!r} ({type(spec).__name__})."
        )
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"load_tokenizer: tokenizer {spec!r} has neither a pad token nor an EOS token.")
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok
