"""A seeded generator of GSM8K-style arithmetic word problems with worked answers ending in ``#### <n>``.

The embedded default data of :mod:`lightning_eff.llm` and :mod:`lightning_eff.select`: nothing to
download, any size, deterministic for a seed. Each example is a dict with ``question`` and ``answer``
(one line per calculation step, then ``#### <final number>``, the GSM8K format), plus ``steps`` (number
of calculations) and ``corrupted`` (see below).

Problems have one to ``max_steps`` steps (addition, subtraction, multiplication, and two-step
combinations) over operands up to ``max_operand``; every intermediate and final result is a
non-negative integer.

``noise`` makes a fraction of the examples wrong: the last calculation's result (and so the final
answer) is replaced by a different number. Such label noise is what data selection is for; it is off
by default.

The arithmetic texts also define the built-in ``"arithmetic-bpe"`` tokenizer
(:func:`~lightning_eff.llm.tokenization.arithmetic_tokenizer`): :func:`arithmetic_corpus` is its training corpus,
the problems in the :data:`DEFAULT_PROMPT` format plus :data:`ICL_PROMPT_PHRASES`, the fixed phrases of Data
Whisperer's default in-context prompt (:class:`lightning_eff.select.prompts.PromptTemplate`), so that those prompts
tokenize compactly too.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from lightning_eff.utils.checks import check_float, check_int

__all__ = ["DEFAULT_PROMPT", "ICL_PROMPT_PHRASES", "arithmetic_corpus", "generate_arithmetic"]

#: The prompt the answer follows (Data Whisperer's GSM8K demonstration format).
DEFAULT_PROMPT = "Question: {question}\nAnswer:\n"

#: The fixed phrases of Data Whisperer's default in-context prompt (``lightning_eff.select.prompts``), handed to
#: the built-in tokenizer's corpus by :func:`arithmetic_corpus`.
ICL_PROMPT_PHRASES: tuple[str, ...] = (
    "Solve each math question step by step. End each solution with '#### <number>'.\n",
    "Below are some demonstrations of how to format your answers:\n",
    "\nNow answer the following questions in the same format, each starting with 'Question <k> Answer:'.\n",
    'Question 1: "',
    "\nAnswers:\n",
    "Question 1 Answer: ",
    "Question 2 Answer: ",
    "Question 3 Answer: ",
)

_NAMES = (
    "Tom", "Anna", "Ben", "Mia", "Leo", "Sara", "Omar", "Lina", "Jack", "Emma",
    "Ravi", "Nora", "Yuki", "Ivan", "Zoe", "Paul",
)  # fmt: skip
_ITEMS = (
    "apples", "pencils", "stickers", "books", "marbles", "cookies", "cards", "shells",
    "stamps", "coins", "eggs", "flowers",
)  # fmt: skip

Step = tuple[int, str, int, int]  # (a, op, b, result)


def _add(rng: random.Random, m: int, name: str, item: str) -> tuple[str, list[Step], str]:
    a, b = rng.randint(1, m), rng.randint(1, m)
    q = f"{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?"
    return q, [(a, "+", b, a + b)], item


def _sub(rng: random.Random, m: int, name: str, item: str) -> tuple[str, list[Step], str]:
    a = rng.randint(2, m)
    b = rng.randint(1, a - 1)
    q = f"{name} has {a} {item} and gives {b} of them away. How many {item} does {name} have left?"
    return q, [(a, "-", b, a - b)], item


def _mul(rng: random.Random, m: int, name: str, item: str) -> tuple[str, list[Step], str]:
    a, b = rng.randint(2, max(2, min(m, 12))), rng.randint(2, max(2, min(m, 12)))
    q = f"{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} buy?"
    return q, [(a, "*", b, a * b)], item


def _add_sub(rng: random.Random, m: int, name: str, item: str) -> tuple[str, list[Step], str]:
    a, b = rng.randint(1, m), rng.randint(1, m)
    c = rng.randint(1, a + b - 1) if a + b > 1 else 0
    q = (
        f"{name} has {a} {item}, buys {b} more {item} and then gives {c} {item} to a friend. "
        f"How many {item} does {name} have left?"
    )
    return q, [(a, "+", b, a + b), (a + b, "-", c, a + b - c)], item


def _mul_add(rng: random.Random, m: int, name: str, item: str) -> tuple[str, list[Step], str]:
    a, b = rng.randint(2, max(2, min(m, 12))), rng.randint(2, max(2, min(m, 12)))
    c = rng.randint(1, m)
    q = (
        f"{name} has {a} boxes with {b} {item} in each box and {c} loose {item}. "
        f"How many {item} does {name} have in total?"
    )
    return q, [(a, "*", b, a * b), (a * b, "+", c, a * b + c)], item


def _sub_mul(rng: random.Random, m: int, name: str, item: str) -> tuple[str, list[Step], str]:
    a = rng.randint(3, m + 2)
    b = rng.randint(1, a - 2)
    c = rng.randint(2, max(2, min(m, 9)))
    q = (
        f"{name} had {a} {item} and lost {b} of them. {name} then buys enough to have {c} times as many "
        f"as are left. How many {item} does {name} have now?"
    )
    return q, [(a, "-", b, a - b), (a - b, "*", c, (a - b) * c)], item


_ONE_STEP: tuple[Callable[..., tuple[str, list[Step], str]], ...] = (_add, _sub, _mul)
_TWO_STEP: tuple[Callable[..., tuple[str, list[Step], str]], ...] = (_add_sub, _mul_add, _sub_mul)


def _worked_answer(steps: list[Step], item: str) -> str:
    lines = [f"{a} {op} {b} = {r}" for a, op, b, r in steps]
    lines[-1] += f" {item}"
    return "\n".join(lines) + f"\n#### {steps[-1][3]}"


def generate_arithmetic(
    num_examples: int,
    seed: int = 0,
    max_operand: int = 20,
    max_steps: int = 2,
    noise: float = 0.0,
) -> list[dict]:
    """``num_examples`` GSM8K-style word problems with worked answers, deterministic for ``seed``.

    Args:
        num_examples: how many examples (>= 0).
        seed: seed of Python's ``random.Random`` used for everything.
        max_operand: largest operand of additions/subtractions (>= 2; products use factors up to 12).
        max_steps: 1 (one calculation) or 2 (one- and two-step problems, half each).
        noise: fraction in ``[0, 1]`` of examples whose final result is replaced by a wrong number.

    Returns:
        A list of dicts with ``question`` (str), ``answer`` (str, ends in ``#### <n>``), ``steps`` (int)
        and ``corrupted`` (bool).

    Example::

        >>> ex = generate_arithmetic(3, seed=1)
        >>> ex == generate_arithmetic(3, seed=1)
        True
        >>> ex[0]["answer"].splitlines()[-1].startswith("#### ")
        True
        >>> sum(e["corrupted"] for e in generate_arithmetic(100, seed=0, noise=0.25))
        25
    """
    check_int(num_examples, "num_examples", minimum=0, owner="generate_arithmetic")
    check_int(max_operand, "max_operand", minimum=2, owner="generate_arithmetic")
    if max_steps not in (1, 2) or isinstance(max_steps, bool):
        raise ValueError(f"generate_arithmetic: `max_steps` must be 1 or 2, got {max_steps!r}.")
    check_float(noise, "noise", low=0.0, high=1.0, owner="generate_arithmetic")
    rng = random.Random(seed)
    # Exactly round(noise * n) corrupted examples, at seeded positions.
    n_noisy = round(noise * num_examples)
    noisy = set(rng.sample(range(num_examples), n_noisy)) if n_noisy else set()
    out = []
    for i in range(num_examples):
        kinds = _ONE_STEP if max_steps == 1 or rng.random() < 0.5 else _TWO_STEP
        kind = kinds[rng.randrange(len(kinds))]
        question, steps, item = kind(rng, max_operand, rng.choice(_NAMES), rng.choice(_ITEMS))
        corrupted = i in noisy
        if corrupted:
            a, op, b, r = steps[-1]
            wrong = r + rng.choice((-1, 1)) * rng.randint(1, max(3, r // 2 + 1))
            if wrong < 0 or wrong == r:
                wrong = r + rng.randint(1, 9)
            steps[-1] = (a, op, b, wrong)
        out.append(
            {
                "question": question,
                "answer": _worked_answer(steps, item),
                "steps": len(steps),
                "corrupted": corrupted,
            }
        )
    return out


def arithmetic_corpus(phrases: Sequence[str] = ICL_PROMPT_PHRASES) -> list[str]:
    """The training texts of the built-in ``"arithmetic-bpe"`` tokenizer (deterministic).

    3000 problems (seed 2024, operands up to 99) written as ``DEFAULT_PROMPT`` + answer, then each of
    ``phrases`` 20 times.

    Example::

        >>> texts = arithmetic_corpus()
        >>> len(texts), texts[0].startswith("Question: "), texts[-1] == ICL_PROMPT_PHRASES[-1]
        (3160, True, True)
    """
    texts = []
    for ex in generate_arithmetic(3000, seed=2024, max_operand=99):
        texts.append(DEFAULT_PROMPT.format(question=ex["question"]) + ex["answer"])
    texts += list(phrases) * 20
    return texts
