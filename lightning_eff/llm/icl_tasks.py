"""A family of in-context lookup tasks: the CPU-scale stand-in for Data Whisperer's instruction data.

Data Whisperer (arXiv:2505.12212) scores a training example by how much it helps the model to be fine-tuned
answer *in context*. That needs a scorer which does learn in context; a GSM8K-capable LLM does, a small
model trained on CPU in minutes does not (it answers a few percent of arithmetic queries). This module gives
a task family a small Llama learns to solve in context within minutes, so the method's signal can be shown
and tested on a CPU. The arithmetic generator (:func:`~lightning_eff.llm.arithmetic.generate_arithmetic`) and
local GSM8K files stay the real-data route.

**The family.** A task is a random function ``f`` from ``num_keys`` code letters (a random subset of ``A``-``Z``)
to digits ``0``-``9`` (:class:`LookupTask`, drawn from ``task_seed``). An example asks for the value of one
key, ``"Code of K?"``, with the one-step worked answer ``"K7 #### 7"`` (the key written next to its digit, then
GSM8K's final-answer format, so the exact-match parser, the prompt builder and the metrics of
:mod:`lightning_eff.llm` apply unchanged; writing the digit right after the key is what lets a small model copy it
from the demonstration with the same key, with an induction head). The rule is shown only by
the demonstrations: a model that has never seen the task can answer a query only by finding its key among
the demonstrations and copying the value, so a demonstration with a wrong value misleads it.

**Corruption** (``noise`` = exact fraction of corrupted records, at seeded positions, flagged
``corrupted: True``):

* ``"random"``: the value is replaced by a uniformly drawn different digit;
* ``"systematic"``: the value is replaced by ``g(key)``, a second fixed function of the task with
  ``g(k) != f(k)`` for every key: a consistent annotator confusion, the harder kind for fine-tuning because
  wrong answers of one key agree with each other.

**Meta-training** (:func:`icl_meta_training_records`): episodes of fresh tasks written as Data Whisperer prompts
(:func:`~lightning_eff.select.prompts.build_icl_prompt` with :func:`icl_task_template`) whose target is the
response block's answers. Training a small causal LM on them teaches it to read the mapping from the
demonstrations (induction), which is the in-context ability Data Whisperer's scorer needs. Held-out tasks
(other ``task_seed``) are never seen in meta-training.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

from lightning_eff.utils.checks import check_choice, check_float, check_int

__all__ = [
    "CORRUPTIONS",
    "icl_task_template",
    "LookupTask",
    "generate_lookup_task",
    "icl_meta_training_records",
    "icl_task_tokenizer",
    "ideal_copier",
]

#: Corruption kinds of :func:`generate_lookup_task`.
CORRUPTIONS = ("random", "systematic")
_LETTERS = string.ascii_uppercase
_DIGITS = 10


def icl_task_template():
    """The :class:`~lightning_eff.select.prompts.ICLTemplate` of the family: short instruction, GSM8K answer format.

    Example::

        >>> icl_task_template().answer_marker
        'Q{k}:'
    """
    from lightning_eff.select.prompts import ICLTemplate

    return ICLTemplate(
        instruction="Codes:\n",
        demonstration="{question} {answer}\n",
        query_header="Now:\n",
        query="Q{k}: {question}",
        query_separator="\n",
        response_header="\nAnswers:\n",
        answer_marker="Q{k}:",
    )


@dataclass(frozen=True)
class LookupTask:
    """One task of the family: ``mapping[key]`` is the right value, ``confusion[key]`` the systematic wrong one.

    Example::

        >>> t = LookupTask.draw(task_seed=3, num_keys=4)
        >>> len(t.keys), all(t.mapping[k] != t.confusion[k] for k in t.keys)
        (4, True)
        >>> t == LookupTask.draw(task_seed=3, num_keys=4)
        True
    """

    keys: tuple[str, ...]
    mapping: dict[str, int]
    confusion: dict[str, int]

    @classmethod
    def draw(cls, task_seed: int, num_keys: int = 8) -> LookupTask:
        """The task of ``task_seed``: ``num_keys`` distinct letters, each with a random digit (and a wrong one)."""
        check_int(num_keys, "num_keys", minimum=1, maximum=len(_LETTERS), owner="LookupTask.draw")
        rng = random.Random(f"lookup-task-{task_seed}")
        keys = tuple(sorted(rng.sample(_LETTERS, num_keys)))
        mapping = {k: rng.randrange(_DIGITS) for k in keys}
        confusion = {k: (mapping[k] + rng.randrange(1, _DIGITS)) % _DIGITS for k in keys}
        return cls(keys, mapping, confusion)

    def record(self, key: str, value: int | None = None, corrupted: bool = False) -> dict:
        """The record asking for ``key`` (answer ``value``, default the right one)."""
        v = self.mapping[key] if value is None else value
        return {"question": f"Code of {key}?", "answer": f"{key}{v} #### {v}", "key": key, "corrupted": bool(corrupted)}


def generate_lookup_task(
    num_examples: int,
    task_seed: int = 0,
    seed: int = 0,
    num_keys: int = 8,
    noise: float = 0.0,
    corruption: str = "random",
) -> list[dict]:
    """``num_examples`` records of the lookup task ``task_seed``, keys drawn uniformly, deterministic for the seeds.

    Args:
        num_examples: how many records (>= 0).
        task_seed: which task of the family (the mapping); the same for a pool and its validation/test splits.
        seed: seed of the key draws and of the corruption (use different seeds for different splits).
        num_keys: keys per task, 1 to 26.
        noise: fraction in ``[0, 1]`` of records whose answer is made wrong: exactly ``round(noise * n)``.
        corruption: ``"random"`` (a random other digit) or ``"systematic"`` (the task's fixed wrong digit).

    Returns:
        dicts with ``question`` (``"Code of K?"``), ``answer`` (``"K7 #### 7"``), ``key`` and ``corrupted`` (bool).

    Example::

        >>> pool = generate_lookup_task(200, task_seed=1, seed=5, noise=0.3)
        >>> pool == generate_lookup_task(200, task_seed=1, seed=5, noise=0.3), sum(r["corrupted"] for r in pool)
        (True, 60)
        >>> task = LookupTask.draw(1)
        >>> all((r["answer"].endswith(f"#### {task.mapping[r['key']]}")) != r["corrupted"] for r in pool)
        True
    """
    owner = "generate_lookup_task"
    check_int(num_examples, "num_examples", minimum=0, owner=owner)
    check_int(num_keys, "num_keys", minimum=1, maximum=len(_LETTERS), owner=owner)
    check_float(noise, "noise", low=0.0, high=1.0, owner=owner)
    check_choice(corruption, "corruption", CORRUPTIONS, owner=owner)
    task = LookupTask.draw(task_seed, num_keys)
    rng = random.Random(f"lookup-records-{task_seed}-{seed}")
    n_noisy = round(noise * num_examples)
    noisy = set(rng.sample(range(num_examples), n_noisy)) if n_noisy else set()
    out = []
    for i in range(num_examples):
        key = rng.choice(task.keys)
        if i in noisy:
            if corruption == "systematic":
                value = task.confusion[key]
            else:
                value = (task.mapping[key] + rng.randrange(1, _DIGITS)) % _DIGITS
            out.append(task.record(key, value, corrupted=True))
        else:
            out.append(task.record(key))
    return out


def icl_meta_training_records(
    num_episodes: int,
    seed: int = 0,
    num_keys: int = 8,
    n_demos: int = 5,
    n_queries: int = 3,
    first_task: int = 1_000_000,
    template=None,
    match_queries: float = 0.9,
    restate_question: bool = True,
) -> list[dict]:
    """Meta-training documents: one fresh task per episode, written as a Data Whisperer prompt and its answers.

    Episode ``e`` uses task ``first_task + e`` (keep benchmark and test tasks below ``first_task``, so they are
    held out), ``n_demos`` clean demonstrations and ``n_queries`` queries. A query's key is one of the
    demonstrations' keys with probability ``match_queries``, else uniform over the task's keys (such a query
    cannot be inferred; few of them keep the loss from being dominated by guessing, so copying is learnt faster).

    With ``restate_question`` each answer first repeats its query (``"Q1: Code of K? K7 #### 7"``, a one-line worked
    answer in GSM8K's style): the model then copies the query and continues it the way the demonstration with the
    same key continues, which a two-layer transformer learns quickly (an induction head); without it
    (``"Q1: #### 7"``) it must find query 1's key itself, which takes longer to learn.

    Returns:
        records with ``question`` = the prompt text (use ``prompt_template="{question}"``) and ``answer`` = the
        expected response (``"Q1: Code of K? K7 #### 7\\n..."`` without the final newline).

    Example::

        >>> docs = icl_meta_training_records(2, seed=0)
        >>> docs[0]["answer"].splitlines()[0].startswith("Q1: Code of ")
        True
        >>> docs == icl_meta_training_records(2, seed=0)
        True
    """
    from lightning_eff.select.prompts import build_icl_prompt

    owner = "icl_meta_training_records"
    check_int(num_episodes, "num_episodes", minimum=0, owner=owner)
    check_int(n_demos, "n_demos", minimum=1, owner=owner)
    check_int(n_queries, "n_queries", minimum=1, owner=owner)
    check_float(match_queries, "match_queries", low=0.0, high=1.0, owner=owner)
    t = icl_task_template() if template is None else template
    rng = random.Random(f"lookup-meta-{seed}")
    out = []
    for e in range(num_episodes):
        task = LookupTask.draw(first_task + e + seed * num_episodes, num_keys)
        demos = [task.record(rng.choice(task.keys)) for _ in range(n_demos)]
        shown = sorted({d["key"] for d in demos})
        queries = [task.record(rng.choice(shown if rng.random() < match_queries else task.keys))
                   for _ in range(n_queries)]  # fmt: skip
        prompt = build_icl_prompt(demos, queries, t).text
        answers = [f"{q['question']} {q['answer']}" if restate_question else q["answer"] for q in queries]
        out.append({"question": prompt, "answer": t.format_answers(answers).rstrip("\n")})
    return out


def icl_task_tokenizer(vocab_size: int = 320):
    """A byte-level BPE (:func:`~lightning_eff.llm.tokenization.train_bpe_tokenizer`) trained on texts of the family
    (meta-training prompts and question/answer records), so its prompts are short; deterministic.

    Example::

        >>> tok = icl_task_tokenizer()
        >>> tok.convert_ids_to_tokens(tok("Code of K?", add_special_tokens=False)["input_ids"])
        ['Code', 'Ġof', 'ĠK', '?']
    """
    from lightning_eff.llm.data import DEFAULT_PROMPT
    from lightning_eff.llm.tokenization import train_bpe_tokenizer

    texts = [d["question"] + d["answer"] for d in icl_meta_training_records(300, seed=12345)]
    for task_seed in range(40):
        for r in generate_lookup_task(26, task_seed=task_seed, num_keys=26):
            texts.append(DEFAULT_PROMPT.format(question=r["question"]) + r["answer"])
    return train_bpe_tokenizer(texts, vocab_size=vocab_size)


def ideal_copier(texts: list[str], n_answers: int | None = None) -> list[str]:
    """An ideal in-context learner of the lookup family, as a ``predict_fn`` for ``data_whisperer_scores``.

    Answers each query ``"Qk: Code of K?"`` of a prompt with the digit the prompt's demonstrations show for ``K``
    (``-1`` when none shows it), so a corrupted demonstration makes exactly the queries of its key wrong. It is the
    ceiling the query assignment allows a real scorer (``n_answers`` is accepted for the ``predict_fn``
    signature and unused: the prompt's own queries are answered)::

        >>> ideal_copier(["Code of A? A3 #### 3\\nCode of B? B5 #### 5\\nQ1: Code of B?\\nQ2: Code of C?\\n"])
        ['Q1: #### 5\\nQ2: #### -1\\n']
    """
    out = []
    for text in texts:
        shown = dict(re.findall(r"Code of (\w)\? \w(\d) ####", text))
        queries = re.findall(r"Q\d+: Code of (\w)\?", text)
        out.append("".join(f"Q{k}: #### {shown.get(q, '-1')}\n" for k, q in enumerate(queries, 1)))
    return out
