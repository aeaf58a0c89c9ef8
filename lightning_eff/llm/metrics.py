"""Answer parsing and text metrics for instruction data: GSM8K-style exact match and ROUGE-L F1.

GSM8K answers end with ``#### <number>``. :func:`extract_answer` reads the number after the last
``####`` (falling back to the last number in the text, as Data Whisperer's official code does for the
references), :func:`extract_predictions` reads every ``#### <number>`` of a multi-answer response in
order, and :func:`exact_match` compares two such numbers numerically (``2.50 == 2.5``, ``1,000 == 1000``).

:func:`rouge_l_f1` is ROUGE-L (Lin, 2004, Sec. 3.1): with ``LCS`` the longest common subsequence of
the two token sequences, ``P = LCS / |prediction|``, ``R = LCS / |reference|``, ``F1 = 2PR / (P + R)``.
Tokenisation follows Google's ``rouge_score`` package (lower-case, every run of characters other than
``a-z0-9`` is a separator). Departure: ``rouge_score`` with ``use_stemmer=True`` (the Data Whisperer
setting) applies its own Porter stemmer; here ``use_stemmer=True`` uses NLTK's ``PorterStemmer``
(imported on demand), whose output can differ on rare words.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

__all__ = [
    "extract_answer",
    "extract_predictions",
    "parse_number",
    "exact_match",
    "rouge_l_f1",
    "lcs_length",
    "rouge_tokenize",
    "METRICS",
]

_NUMBER = r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
_NUMBER_RE = re.compile(_NUMBER)
_HASH_RE = re.compile(r"####\s*\$?\s*(" + _NUMBER + r")")


def parse_number(text: str) -> float | None:
    """The value of a number written with optional sign, thousands commas and decimals, else ``None``.

    Example::

        >>> parse_number("1,234.50"), parse_number("-7"), parse_number("seven")
        (1234.5, -7.0, None)
    """
    cleaned = text.strip().replace(",", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def extract_answer(text: str) -> str:
    """The final answer of a GSM8K-style solution: the number after the last ``####``, else the last number.

    Returns ``""`` when the text has no number.

    Example::

        >>> extract_answer("3 + 4 = 7\\n#### 7")
        '7'
        >>> extract_answer("She pays 1,200 dollars.")
        '1,200'
        >>> extract_answer("no idea")
        ''
    """
    hashes = _HASH_RE.findall(text)
    if hashes:
        return hashes[-1].rstrip(".")
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1].rstrip(".") if numbers else ""


def extract_predictions(response: str) -> list[str]:
    """Every ``#### <number>`` answer of a multi-answer response, in order (Data Whisperer's parser).

    The official regex ``####\\s*([\\d,]+(?:\\.\\d+)?)`` drops the sign of negative answers; this one keeps it.

    Example::

        >>> extract_predictions("Question 1 Answer: 2 + 2 = 4\\n#### 4\\nQuestion 2 Answer: #### -3")
        ['4', '-3']
    """
    return [m.rstrip(".") for m in _HASH_RE.findall(response)]


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the two answers are the same number (``"2.50"`` equals ``"2.5"``), else 0.0.

    Non-numeric answers are compared as stripped strings.

    Example::

        >>> exact_match("2.50", "2.5"), exact_match("1,000", "1000"), exact_match("3", "4")
        (1.0, 1.0, 0.0)
    """
    a, b = parse_number(prediction), parse_number(reference)
    if a is None or b is None:
        return float(
            a is None and b is None and prediction.strip() != "" and prediction.strip() == reference.strip()
        )
    return float(a == b)


_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokenize(text: str, use_stemmer: bool = False) -> list[str]:
    """``rouge_score``'s tokenisation: lower-case, split on every run of characters outside ``a-z0-9``.

    Example::

        >>> rouge_tokenize("The cat's hat, 2 times!")
        ['the', 'cat', 's', 'hat', '2', 'times']
    """
    tokens = [t for t in _NON_ALNUM.sub(" ", text.lower()).split() if t]
    if use_stemmer:
        try:
            from nltk.stem.porter import PorterStemmer
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "rouge_l_f1(use_stemmer=True) needs NLTK's Porter stemmer: `pip install nltk`."
            ) from err
        stemmer = PorterStemmer()
        tokens = [stemmer.stem(t) if len(t) > 3 else t for t in tokens]
    return tokens


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(|a| |b|) dynamic programme).

    Example::

        >>> lcs_length(list("ABCBDAB"), list("BDCABA"))
        4
    """
    if not a or not b:
        return 0
    if len(b) > len(a):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l_f1(prediction: str, reference: str, use_stemmer: bool = False) -> float:
    """ROUGE-L F1 of ``prediction`` against ``reference`` (see the module docstring).

    Example::

        >>> round(rouge_l_f1("the cat sat on the mat", "the cat is on the mat"), 4)
        0.8333
        >>> rouge_l_f1("", "anything")
        0.0
    """
    pred, ref = rouge_tokenize(prediction, use_stemmer), rouge_tokenize(reference, use_stemmer)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


#: Per-answer metrics by name: ``metric(prediction, reference) -> float in [0, 1]``.
METRICS: dict[str, Callable[[str, str], float]] = {"exact_match": exact_match, "rouge_l": rouge_l_f1}
