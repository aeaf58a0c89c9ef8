"""Causal-LM fine-tuning on instruction data: data, metrics, tokenizers and ``CausalLMModule``.

* :func:`generate_arithmetic`: seeded GSM8K-style arithmetic word problems (the embedded default data).
* :func:`load_instructions`, :class:`InstructionDataModule`: local JSON/JSONL instruction data, tokenised with
  the loss on answer tokens only.
* :func:`extract_answer`, :func:`exact_match`, :func:`rouge_l_f1`: answer parsing and metrics.
* :func:`train_bpe_tokenizer`, :func:`load_tokenizer`: tokenizers built locally (nothing downloads).
* :class:`CausalLMModule`: fine-tunes any ``transformers`` causal LM (local path or tiny config), optional LoRA.
"""

from lightning_eff.llm.arithmetic import ICL_PROMPT_PHRASES, arithmetic_corpus, generate_arithmetic
from lightning_eff.llm.data import (
    DEFAULT_PROMPT,
    IGNORE_INDEX,
    InstructionCollator,
    InstructionDataModule,
    InstructionDataset,
    load_instructions,
)
from lightning_eff.llm.metrics import (
    exact_match,
    extract_answer,
    extract_predictions,
    parse_number,
    rouge_l_f1,
)
from lightning_eff.llm.module import CausalLMModule, SavePretrained, build_causal_lm, score_answer
from lightning_eff.llm.tokenization import arithmetic_tokenizer, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "DEFAULT_PROMPT",
    "ICL_PROMPT_PHRASES",
    "IGNORE_INDEX",
    "CausalLMModule",
    "InstructionCollator",
    "InstructionDataModule",
    "InstructionDataset",
    "SavePretrained",
    "arithmetic_corpus",
    "arithmetic_tokenizer",
    "build_causal_lm",
    "exact_match",
    "extract_answer",
    "extract_predictions",
    "generate_arithmetic",
    "load_instructions",
    "load_tokenizer",
    "parse_number",
    "rouge_l_f1",
    "score_answer",
    "train_bpe_tokenizer",
]
