"""In-context-learning prompts for Data Whisperer, with the character spans of every part.

A prompt is ``instruction + demonstration_1 + ... + demonstration_nd + response block``, where the
response block is ``query_header + query_1 + sep + ... + query_nq + response_header`` (the official
code's ``val_inst + "\\n".join(questions) + task_inst``). The model is expected to answer each query as
``answer_marker`` (``"Question k Answer:"``) followed by a worked solution ending in ``#### <number>``.

Spans are character ranges into the prompt text; :func:`~lightning_eff.select.data_whisperer.token_spans`
maps them onto tokens with the tokenizer's offsets, which stays exact when BPE merges cross the boundary
between parts (the official code tokenises each part separately and adds up the lengths instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ICLTemplate", "ICLPrompt", "build_icl_prompt"]


@dataclass(frozen=True)
class ICLTemplate:
    """The strings of a Data Whisperer prompt (defaults: the official GSM8K prompt without chat tokens).

    For a chat model, put its chat tokens in ``instruction`` (system + user header) and ``response_header``
    (end of user turn + assistant header), as the official prompts do.

    Args:
        instruction: task instruction before the demonstrations.
        demonstration: one demonstration, with ``{question}`` and ``{answer}``.
        query_header: text before the queries (start of the response block).
        query: one query, with ``{k}`` (1-based) and ``{question}``.
        query_separator: text between queries.
        response_header: text after the queries (end of the prompt).
        answer_marker: how the model starts the answer to query ``{k}`` (used to split free-text answers).

    Example::

        >>> ICLTemplate().query.format(k=2, question="What is 1 + 1?")
        'Question 2: "What is 1 + 1?"'
    """

    instruction: str = (
        "Solve each math question step by step. End each solution with '#### <number>'.\n"
        "Below are some demonstrations of how to format your answers:\n"
    )
    demonstration: str = "Question: {question}\nAnswer:\n{answer}\n"
    query_header: str = "\nNow answer the following questions in the same format, each starting with 'Question <k> Answer:'.\n"
    query: str = 'Question {k}: "{question}"'
    query_separator: str = "\n"
    response_header: str = "\nAnswers:\n"
    answer_marker: str = "Question {k} Answer:"

    def __post_init__(self) -> None:
        for name in ("instruction", "demonstration", "query_header", "query", "query_separator", "response_header",
                     "answer_marker"):  # fmt: skip
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"ICLTemplate: `{name}` must be a str, got {getattr(self, name)!r}.")
        for name, fields in (("demonstration", ("{question}", "{answer}")), ("query", ("{question}",)),
                             ("answer_marker", ("{k}",))):  # fmt: skip
            missing = [f for f in fields if f not in getattr(self, name)]
            if missing:
                raise ValueError(
                    f"ICLTemplate: `{name}` must contain {missing}, got {getattr(self, name)!r}."
                )

    def format_answers(self, answers: Sequence[str]) -> str:
        """The expected response to the queries: ``answer_marker`` + answer, one per line (for pretraining)."""
        return (
            "\n".join(f"{self.answer_marker.format(k=k)} {a}" for k, a in enumerate(answers, start=1)) + "\n"
        )


@dataclass(frozen=True)
class ICLPrompt:
    """A built prompt: its text, the ``[start, end)`` character span of each demonstration and of the response
    block."""

    text: str
    demo_spans: tuple[tuple[int, int], ...]
    response_span: tuple[int, int]


def build_icl_prompt(
    demos: Sequence[dict], queries: Sequence[dict], template: ICLTemplate | None = None
) -> ICLPrompt:
    """Build a Data Whisperer prompt from demonstration and query records (``question``/``answer`` dicts).

    Example::

        >>> p = build_icl_prompt([{"question": "1+1?", "answer": "#### 2"}], [{"question": "2+2?"}])
        >>> s, e = p.demo_spans[0]
        >>> p.text[s:e]
        'Question: 1+1?\\nAnswer:\\n#### 2\\n'
        >>> p.text[p.response_span[0]:].endswith("Answers:\\n")
        True
    """
    t = template if template is not None else ICLTemplate()
    if not demos:
        raise ValueError("build_icl_prompt: `demos` must not be empty.")
    if not queries:
        raise ValueError("build_icl_prompt: `queries` must not be empty.")
    parts = [t.instruction]
    pos = len(t.instruction)
    spans = []
    for d in demos:
        text = t.demonstration.format(question=d["question"], answer=d["answer"])
        spans.append((pos, pos + len(text)))
        parts.append(text)
        pos += len(text)
    response = (
        t.query_header
        + t.query_separator.join(
            t.query.format(k=k, question=q["question"]) for k, q in enumerate(queries, start=1)
        )
        + t.response_header
    )
    parts.append(response)
    return ICLPrompt("".join(parts), tuple(spans), (pos, pos + len(response)))
