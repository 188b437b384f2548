"""RULER's 13 tasks (Hsieh et al. 2024, github.com/NVIDIA/RULER): templates, samples, prompts fitted to a length.

Each task is RULER's: its template and answer prefix (scripts/data/synthetic/constants.py), its
settings (scripts/synthetic.yaml), its generation length (`tokens_to_generate`) and its metric
(string_match_all, or string_match_part for QA). A sample is drawn from a seeded
`random.Random` and rendered at a haystack size (noise blocks, essay words, distractor needles,
listed words, coded words or documents); `fit_prompt` finds by bisection the largest size whose
prompt, template and answer prefix included, leaves room for `tokens_to_generate` tokens in the
length, as RULER does (its max_seq_length counts the generated tokens).

Where this differs from RULER (docs/needle.md has the list): words come from the vocabulary of
the essay haystack instead of wonderwords; the `needle` haystack's distractors are fixed per task
and seed (so the KV cache of the haystack before the first needle is shared by every sample);
sentences are split on . ! ? followed by a space instead of nltk's punkt; `noise`/`needle`
insertion points are drawn as fractions of the haystack.

Imports: tasks.haystacks, tasks.prompts, errors; `datasets` for QA files, lazily.
"""

from __future__ import annotations

import abc
import functools
import math
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from longctx.errors import LongctxError
from longctx.tasks.haystacks import NOISE_SENTENCES, encode, load_haystack_text

# RULER's templates by task kind: (template, answer prefix, tokens_to_generate, metric)
NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assigned the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
)
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
    "\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given documents. "
    "Only give me the answer and do not output any other words.\n\nQuestion: {query}"
)
QA_ANSWER_PREFIX = " Answer:"
QA_DOCUMENT = "Document {i}:\n{document}"

TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
METRICS = {"niah": "all", "vt": "all", "cwe": "all", "fwe": "all", "qa": "part"}  # string_match_all / _part

NIAH_DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER's np.round(np.linspace(0, 100, 40))
VT_HOPS, VT_ICL_TOKENS = 4, 500  # one chain of 4 hops; the in-context example fits in 500 tokens
CWE_COMMON = 10
CWE_SHORT = 4096  # below it, RULER's cwe repeats words 6/1 times (not 30/3) and shows a smaller example
FWE_ALPHA, FWE_WORD_LENGTH = 2.0, 6
QA_FILES = {"squad": "squad.json", "hotpotqa": "hotpotqa.json"}


@dataclass(frozen=True)
class RulerTask:
    """One of RULER's tasks as scripts/synthetic.yaml configures it."""

    name: str
    kind: str  # niah, vt, cwe, fwe, qa
    haystack: str = "essay"  # niah and vt: noise, essay or needle
    key_type: str = "words"
    value_type: str = "numbers"
    keys: int = 1  # num_needle_k
    values: int = 1  # num_needle_v
    queries: int = 1  # num_needle_q
    dataset: str | None = None  # qa: squad or hotpotqa

    @property
    def tokens_to_generate(self) -> int:
        return TOKENS_TO_GENERATE[self.kind]

    @property
    def metric(self) -> str:
        return METRICS[self.kind]


RULER_TASKS = {
    task.name: task
    for task in (
        RulerTask("niah_single_1", "niah", haystack="noise"),
        RulerTask("niah_single_2", "niah"),
        RulerTask("niah_single_3", "niah", value_type="uuids"),
        RulerTask("niah_multikey_1", "niah", keys=4),
        RulerTask("niah_multikey_2", "niah", haystack="needle"),
        RulerTask("niah_multikey_3", "niah", haystack="needle", key_type="uuids", value_type="uuids"),
        RulerTask("niah_multivalue", "niah", values=4),
        RulerTask("niah_multiquery", "niah", queries=4),
        RulerTask("vt", "vt", haystack="noise"),
        RulerTask("cwe", "cwe"),
        RulerTask("fwe", "fwe"),
        RulerTask("qa_1", "qa", dataset="squad"),
        RulerTask("qa_2", "qa", dataset="hotpotqa"),
    )
}
QA_TASKS = tuple(name for name, task in RULER_TASKS.items() if task.kind == "qa")


@dataclass
class RulerSample:
    """A rendered sample: the user turn (RULER's template filled), what the answer starts with, and
    what counts as right. `shots` are earlier (user, answer) turns (cwe's in-context example);
    `draft` is a right answer written as the model is asked to give it."""

    task: str
    user: str
    answer_prefix: str
    expected: list[str]
    metric: str
    draft: str
    shots: list[tuple[str, str]] = field(default_factory=list)


# Words -----------------------------------------------------------------------------------------


@functools.cache
def vocabulary() -> tuple[str, ...]:
    """The distinct lowercase words (3-12 letters) of the essay haystack, sorted: about 2,750. RULER
    draws from wonderwords' noun, adjective and verb lists, which are not available offline."""
    return tuple(sorted(set(re.findall(r"\b[a-z]{3,12}\b", load_haystack_text("essays")))))


@functools.cache
def _essay_words() -> tuple[str, ...]:
    """The essay haystack as RULER cuts it: whitespace collapsed, split into words."""
    return tuple(re.sub(r"\s+", " ", load_haystack_text("essays")).strip().split(" "))


def word_pair(rng: random.Random) -> str:
    """A key like RULER's adjective-noun pairs: two different vocabulary words joined by a hyphen."""
    first, second = rng.sample(vocabulary(), 2)
    return f"{first}-{second}"


def draw_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "words":
        return word_pair(rng)
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def split_sentences(text: str) -> list[str]:
    """Sentences: text split after . ! or ? followed by whitespace (RULER uses nltk's punkt)."""
    return [part for part in re.split(r"(?<=[.!?])\s+", text.strip()) if part]


def insert_at_fractions(units: list[str], items: list[str], fractions: list[float]) -> list[str]:
    """units with items[i] inserted before unit int(fractions[i] * len(units)), items kept in order."""
    positions = sorted(int(f * len(units)) for f in fractions)
    merged = list(units)
    for offset, (position, item) in enumerate(zip(positions, items)):
        merged.insert(position + offset, item)
    return merged


# Generators: (rng, size) -> RulerSample ---------------------------------------------------------


class Generator(abc.ABC):
    """Draws and renders the samples of one task at one length. `render(index, size)` seeds a fresh
    random.Random from (seed, task, length, index) each time, so a sample is a function of its index
    and the haystack size alone, and every draw that does not depend on the size (keys, values,
    positions) is the same at every size. `count_tokens` counts a text's tokens (vt's example)."""

    unit = "units"
    min_size = 1

    def __init__(self, task: RulerTask, *, length: int, seed: int = 0, count_tokens: Callable[[str], int] = len):
        self.task, self.length, self.seed, self.count_tokens = task, length, seed, count_tokens

    def rng(self, index: int, part: str = "") -> random.Random:
        return random.Random(f"ruler:{self.seed}:{self.task.name}:{self.length}:{index}{part}")

    @abc.abstractmethod
    def render(self, index: int, size: int) -> RulerSample:
        """Sample `index` of the task with a haystack of `size` units."""

    def clean(self, size: int) -> RulerSample | None:
        """The sample's text with nothing inserted in the haystack, when every sample of the task starts
        with it (the shared prefix whose KV cache can be reused), else None."""
        return None


class NeedleGenerator(Generator):
    """niah_*: needles "One of the special magic numbers for KEY is: VALUE." in a noise, essay or
    needle (distractor) haystack; the question asks for `queries` of the `keys` keys."""

    @property
    def unit(self):
        return {"noise": "noise blocks", "essay": "words", "needle": "distractor needles"}[self.task.haystack]

    def render(self, index: int, size: int) -> RulerSample:
        task, rng = self.task, self.rng(index)
        count = max(task.keys, task.queries)
        keys = _distinct(rng, count, lambda: draw_value(rng, task.key_type), avoid=self._distractor_keys())
        values = [[draw_value(rng, task.value_type) for _ in range(task.values)] for _ in keys]
        needles = [
            NIAH_NEEDLE.format(type_needle_v=task.value_type, key=k, value=v) for k, vs in zip(keys, values) for v in vs
        ]
        rng.shuffle(needles)
        if task.haystack == "essay":
            fractions = [depth / 100 for depth in rng.sample(NIAH_DEPTHS, len(needles))]
        else:
            fractions = [rng.random() for _ in needles]
        asked = rng.sample(range(count), task.queries)
        queries = [keys[i] for i in asked]
        expected = [value for i in asked for value in values[i]]
        context = self._context(size, needles, fractions)
        template, prefix, noun = self._wording()
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        return RulerSample(
            task.name, template.format(type_needle_v=noun, context=context, query=query),
            prefix.format(type_needle_v=noun, query=query), expected, task.metric, " " + ", ".join(expected) + ".",
        )

    def clean(self, size: int) -> RulerSample:
        template, prefix, noun = self._wording()
        return RulerSample(self.task.name, template.format(type_needle_v=noun, context=self._context(size, [], []), query=""),
                           "", [], self.task.metric, "")

    def _wording(self) -> tuple[str, str, str]:
        """RULER's template, answer prefix and value noun; for one asked value, its singular forms."""
        template, prefix, noun = NIAH_TEMPLATE, NIAH_ANSWER_PREFIX, self.task.value_type
        if self.task.queries * self.task.values == 1:
            template, prefix = singular(template), singular(prefix)
            noun = noun[:-1]
        return template, prefix, noun

    def _context(self, size: int, needles: list[str], fractions: list[float]) -> str:
        haystack = self.task.haystack
        if haystack == "essay":
            sentences = split_sentences(" ".join(_repeat(_essay_words(), size)))
            cuts = [0] + sorted(int(len(sentences) * f) for f in fractions) + [len(sentences)]
            pieces = []
            for i in range(1, len(cuts)):
                pieces.append(" ".join(sentences[cuts[i - 1] : cuts[i]]))
                if i - 1 < len(needles):
                    pieces.append(needles[i - 1])
            return " ".join(piece for piece in pieces if piece)
        units = [NOISE_SENTENCES] * size if haystack == "noise" else self._distractors(size)
        return "\n".join(insert_at_fractions(units, needles, fractions))

    def _distractors(self, size: int) -> list[str]:
        """The needle haystack: the first `size` distractor needles of this task and seed."""
        pairs = _distractor_pairs(self.task, self.seed, max(size, _distractor_capacity(self.length)))
        return [NIAH_NEEDLE.format(type_needle_v=self.task.value_type, key=k, value=v) for k, v in pairs[:size]]

    def _distractor_keys(self) -> frozenset[str]:
        """Keys a sample must not use: those of every distractor a prompt of this length can hold."""
        if self.task.haystack != "needle":
            return frozenset()
        return frozenset(k for k, _ in _distractor_pairs(self.task, self.seed, _distractor_capacity(self.length)))


@functools.lru_cache(maxsize=4)
def _distractor_pairs(task: RulerTask, seed: int, count: int) -> tuple[tuple[str, str], ...]:
    """(key, value) of the first `count` distractors: one seeded sequence, so a shorter list is a prefix
    of a longer one. RULER draws new distractors for each sample; fixed ones share the KV prefix."""
    rng = random.Random(f"ruler:{seed}:{task.name}:distractors")
    return tuple((draw_value(rng, task.key_type), draw_value(rng, task.value_type)) for _ in range(count))


def _distractor_capacity(length: int) -> int:
    """More distractor needles than a prompt of `length` tokens holds (each takes well over 8 tokens)."""
    return max(64, length // 8)


def singular(text: str) -> str:
    """RULER's rewording of the niah template when one value is asked (niah.py): Some -> A, are -> is."""
    for plural, one in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(plural, one)
    return text


class VariableTrackingGenerator(Generator):
    """vt: one chain "VAR A = 12345", "VAR B = VAR A", ... (4 hops) among noise blocks; the question
    asks for every variable holding the value. An in-context example (3-letter names, 500 tokens)
    comes first, as in RULER."""

    unit = "noise blocks"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._examples: dict[int, str] = {}

    def render(self, index: int, size: int) -> RulerSample:
        rng = self.rng(index)
        names, value, chain = self._chain(rng, 5)
        context = self._context(rng, chain, size)
        example = self._example(index)
        user = example + "\n" + VT_TEMPLATE.format(context=context, query=value)
        prefix = VT_ANSWER_PREFIX.format(num_v=VT_HOPS + 1, query=value)
        return RulerSample(self.task.name, user, prefix, names, self.task.metric, " ".join(names))

    @staticmethod
    def _chain(rng: random.Random, name_length: int) -> tuple[list[str], str, list[str]]:
        names = _distinct(rng, VT_HOPS + 1, lambda: "".join(rng.choices(string.ascii_uppercase, k=name_length)))
        value = str(rng.randint(10000, 99999))
        chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[i + 1]} = VAR {names[i]} " for i in range(VT_HOPS)]
        return names, value, chain

    @staticmethod
    def _context(rng: random.Random, chain: list[str], size: int) -> str:
        fractions = [rng.random() for _ in chain]
        return "\n".join(insert_at_fractions([NOISE_SENTENCES] * size, chain, fractions)).replace(". \n", ".\n")

    def _example(self, index: int) -> str:
        """The in-context example: a whole solved prompt (3-letter names) in the most noise blocks that
        keep it within VT_ICL_TOKENS tokens (at least one)."""
        if index not in self._examples:
            rng = self.rng(index, ":example")
            names, value, chain = self._chain(rng, 3)
            state = rng.getstate()
            best = None
            for size in range(1, VT_ICL_TOKENS):
                rng.setstate(state)
                text = (VT_TEMPLATE.format(context=self._context(rng, chain, size), query=value)
                        + VT_ANSWER_PREFIX.format(num_v=VT_HOPS + 1, query=value) + " " + " ".join(names))
                if best is not None and self.count_tokens(text) > VT_ICL_TOKENS:
                    break
                best = text
            self._examples[index] = best
        return self._examples[index]


class CommonWordsGenerator(Generator):
    """cwe: a numbered list in which 10 words appear 30 times (6 below 4K) and the others 3 (1);
    the question asks for the 10 most common. One solved example comes first, as in RULER."""

    unit = "listed words"
    min_size = CWE_COMMON + 1

    def render(self, index: int, size: int) -> RulerSample:
        rng = self.rng(index)
        short = self.length < CWE_SHORT
        example_context, example_answer = self._list(rng, 20 if short else 40, 3 if short else 10, 1 if short else 3)
        context, answer = self._list(rng, size, 6 if short else 30, 1 if short else 3)
        shot = (CWE_TEMPLATE.format(context=example_context), " " + _numbered(example_answer))
        return RulerSample(self.task.name, CWE_TEMPLATE.format(context=context), CWE_ANSWER_PREFIX, answer,
                           self.task.metric, " " + _numbered(answer), [shot])

    @staticmethod
    def _list(rng: random.Random, count: int, common_repeats: int, other_repeats: int) -> tuple[str, list[str]]:
        words = _draw_words(rng, count)
        common, others = words[:CWE_COMMON], words[CWE_COMMON:]
        listed = common * common_repeats + others * other_repeats
        rng.shuffle(listed)
        return _numbered(listed), common


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def _draw_words(rng: random.Random, count: int) -> list[str]:
    """count distinct words: vocabulary words while they last, then hyphenated pairs of them (RULER
    switches from wonderwords to a larger English list in the same way)."""
    words = vocabulary()
    if count <= len(words):
        return rng.sample(words, count)
    return rng.sample(words, len(words)) + _distinct(rng, count - len(words), lambda: word_pair(rng))


class FrequentWordsGenerator(Generator):
    """fwe: coded words (6 random letters) drawn with Zipf frequencies (alpha 2); the most frequent
    is '...', noise; the question asks for the next three."""

    unit = "coded words"
    min_size = 10

    def render(self, index: int, size: int) -> RulerSample:
        rng = self.rng(index)
        vocabulary_size = max(4, (self.length - self.task.tokens_to_generate) // 50)  # RULER's vocab_size
        vocab = sorted(set(_distinct(rng, vocabulary_size,
                                     lambda: "".join(rng.choices(string.ascii_lowercase, k=FWE_WORD_LENGTH)))))
        rng.shuffle(vocab)
        vocab[0] = "..."
        zeta = math.pi**2 / 6  # zeta(FWE_ALPHA) for alpha = 2
        words = [word for rank, word in enumerate(vocab, start=1)
                 for _ in range(int(size * rank**-FWE_ALPHA / zeta))]
        rng.shuffle(words)
        answer = vocab[1:4]
        return RulerSample(self.task.name, FWE_TEMPLATE.format(context=" ".join(words)), FWE_ANSWER_PREFIX, answer,
                           self.task.metric, " " + ", ".join(answer))


@dataclass
class QaData:
    """A QA set as RULER reads it: questions with their answers and gold documents (indices into
    `documents`), and for SQuAD the other paragraphs of the same article."""

    questions: list[dict]
    documents: list[str]


class QaGenerator(Generator):
    """qa_1 / qa_2: the gold documents of a SQuAD or HotpotQA question among others, shuffled and
    numbered; sample i asks question i of a seeded order of the questions (the same at every length)."""

    unit = "documents"

    def __init__(self, task: RulerTask, *, length: int, seed: int = 0, data: QaData | None = None, **kwargs):
        super().__init__(task, length=length, seed=seed, **kwargs)
        if data is None:
            raise LongctxError(f"{task.name} needs QA data: pass --qa-data DIR with {QA_FILES[task.dataset]}")
        self.data = data
        self.order = list(range(len(data.questions)))
        random.Random(f"ruler:{task.name}:{seed}:questions").shuffle(self.order)

    @property
    def min_size(self) -> int:
        return 1

    def question(self, index: int) -> dict:
        return self.data.questions[self.order[index % len(self.order)]]

    def render(self, index: int, size: int) -> RulerSample:
        rng = self.rng(index)
        question = self.question(index)
        gold, more = list(question["gold"]), list(question.get("more", []))
        documents = self.data.documents
        if size < len(documents):
            if size - len(gold) > len(more):
                taken = set(gold) | set(more)
                others = [i for i in range(len(documents)) if i not in taken]
                chosen = gold + more + rng.sample(others, max(0, size - len(gold) - len(more)))
            else:
                chosen = gold + rng.sample(more, max(0, size - len(gold)))
            texts = [documents[i] for i in chosen]
        else:
            texts = list(_repeat(documents, size))
        rng.shuffle(texts)
        context = "\n\n".join(QA_DOCUMENT.format(i=i + 1, document=text) for i, text in enumerate(texts))
        answers = list(question["answers"])
        return RulerSample(self.task.name, QA_TEMPLATE.format(context=context, query=question["question"]),
                           QA_ANSWER_PREFIX, answers, self.task.metric, " " + answers[0])


GENERATORS = {"niah": NeedleGenerator, "vt": VariableTrackingGenerator, "cwe": CommonWordsGenerator,
              "fwe": FrequentWordsGenerator, "qa": QaGenerator}


def make_generator(tokenizer, name: str, *, length: int, seed: int = 0, qa_data: QaData | None = None) -> Generator:
    """The generator of task `name` at `length`; QA tasks need their QaData."""
    task = RULER_TASKS[name]
    extra = {"data": qa_data} if task.kind == "qa" else {}
    return GENERATORS[task.kind](task, length=length, seed=seed, count_tokens=lambda text: len(encode(tokenizer, text)),
                                 **extra)


# QA data ---------------------------------------------------------------------------------------


def load_qa_data(path: str | Path, dataset: str) -> QaData:
    """Read squad.json (SQuAD v1.1/v2.0 format) or hotpotqa.json (HotpotQA's list of questions) from
    the directory `path` through `datasets`, as RULER's qa.py reads them: unanswerable SQuAD questions
    are left out; documents are the distinct paragraphs (HotpotQA: "title\\nsentences"), sorted."""
    import datasets

    from longctx.tasks.haystacks import dataset_errors

    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise LongctxError(f"--qa-data {path} is not a directory; give the directory that holds "
                           f"{' and '.join(QA_FILES.values())}")
    file = directory / QA_FILES[dataset]
    if not file.is_file():
        raise LongctxError(f"--qa-data {path} has no {QA_FILES[dataset]}; put the {dataset} file there under that name")
    try:
        rows = datasets.load_dataset("json", data_files=str(file), split="train",
                                     **({"field": "data"} if dataset == "squad" else {}))
    except dataset_errors() as error:
        raise LongctxError(f"cannot read {file} as {dataset} data: {error}") from error
    try:
        return _read_squad(rows) if dataset == "squad" else _read_hotpotqa(rows)
    except (KeyError, TypeError, ValueError) as error:
        raise LongctxError(f"{file} is not in {dataset}'s format ({type(error).__name__}: {error})") from error


def _read_squad(articles) -> QaData:
    documents = sorted({paragraph["context"] for article in articles for paragraph in article["paragraphs"]})
    index = {text: i for i, text in enumerate(documents)}
    questions = []
    for article in articles:
        paragraphs = [index[p["context"]] for p in article["paragraphs"]]
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                if not qa.get("is_impossible") and qa["answers"]:
                    gold = index[paragraph["context"]]
                    questions.append({"question": qa["question"], "answers": [a["text"] for a in qa["answers"]],
                                      "gold": [gold], "more": [i for i in paragraphs if i != gold]})
    return _checked(QaData(questions, documents), "squad")


def _read_hotpotqa(rows) -> QaData:
    def text(title, sentences):
        return f"{title}\n{''.join(sentences)}"

    documents = sorted({text(title, sentences) for row in rows for title, sentences in row["context"]})
    index = {document: i for i, document in enumerate(documents)}
    questions = [{"question": row["question"], "answers": [row["answer"]],
                  "gold": [index[text(title, sentences)] for title, sentences in row["context"]]} for row in rows]
    return _checked(QaData(questions, documents), "hotpotqa")


def _checked(data: QaData, dataset: str) -> QaData:
    if not data.questions:
        raise LongctxError(f"the {dataset} file has no answerable question; point --qa-data at the full file")
    return data


# Prompts ---------------------------------------------------------------------------------------


def prompt_ids(tokenizer, sample: RulerSample, style: str) -> list[int]:
    """The token ids of a sample's prompt. raw: RULER's `base` template, user text and answer prefix
    as one string (each shot solved before it); chat: the tokenizer's chat template with each shot
    as an earlier user/assistant exchange, then the assistant header and the answer prefix (its
    leading space dropped), so the model answers rather than refuses."""
    if style == "raw":
        shots = "".join(user + sample.answer_prefix + answer + "\n" for user, answer in sample.shots)
        text = shots + sample.user + sample.answer_prefix
        return list(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])
    messages = []
    for user, answer in sample.shots:
        messages += [{"role": "user", "content": user},
                     {"role": "assistant", "content": sample.answer_prefix.lstrip() + answer}]
    messages.append({"role": "user", "content": sample.user})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return encode(tokenizer, text + sample.answer_prefix.lstrip())


@dataclass
class FittedPrompt:
    sample: RulerSample
    ids: list[int]
    size: int  # haystack units (generator.unit)
    budget: int  # the most prompt tokens: length - tokens_to_generate


def fit_prompt(tokenizer, generator: Generator, index: int, style: str) -> FittedPrompt:
    """Sample `index` at the largest haystack size whose prompt has at most length - tokens_to_generate
    tokens, found by bisection on the size as RULER's generators do (starting from an estimate)."""
    task = generator.task
    budget = generator.length - task.tokens_to_generate
    counts: dict[int, int] = {}

    def fits(size: int) -> bool:
        if size not in counts:
            counts[size] = len(prompt_ids(tokenizer, generator.render(index, size), style))
        return counts[size] <= budget

    low = generator.min_size
    if not fits(low):
        raise LongctxError(
            f"length {generator.length} is too short for {task.name}: its template and smallest haystack "
            f"({low} {generator.unit}) take {counts[low]} tokens, plus {task.tokens_to_generate} to generate; "
            "use longer --lengths"
        )
    probe = low + 16
    fits(probe)
    per_unit = max((counts[probe] - counts[low]) / (probe - low), 1e-3)
    guess = max(low + 1, int(low + (budget - counts[low]) / per_unit))
    high = guess
    while fits(high):  # find a size that does not fit, from the estimate up
        low, high = high, int(high * 1.1) + 1
        if high > 16 * budget + 64:
            raise LongctxError(f"{task.name}'s prompt does not grow with its haystack; this is a bug, please report it")
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    ids = prompt_ids(tokenizer, generator.render(index, low), style)
    return FittedPrompt(generator.render(index, low), ids, low, budget)


def clean_prompt_ids(tokenizer, generator: Generator, size: int, style: str) -> list[int] | None:
    """Tokens every prompt of the task starts with up to its first insertion (head and haystack), for
    the reused KV prefix; None for tasks without a shared haystack (vt, cwe, fwe, qa)."""
    clean = generator.clean(size)
    return None if clean is None else prompt_ids(tokenizer, clean, style)


# Helpers ---------------------------------------------------------------------------------------


def _repeat(items, count: int) -> list:
    """The first `count` items of items repeated as often as needed (RULER repeats a short haystack)."""
    items = list(items)
    return (items * (-(-count // len(items))))[:count]


def _distinct(rng: random.Random, count: int, draw, avoid=frozenset()) -> list[str]:
    values: list[str] = []
    while len(values) < count:
        value = draw()
        if value not in values and value not in avoid:
            values.append(value)
    return values
