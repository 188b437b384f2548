"""RULER's suite: each task's prompt against RULER's templates, samples that hold their answer,
prompts fitted to the length, RULER's metrics, the table and effective length, QA from files,
and the suite end to end (resume, an answering oracle) on a tiny model."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from conftest import make_tokenizer
from test_needle import AnswerOracle

from longctx.cli import main
from longctx.errors import LongctxError
from longctx.eval.grid import read_results
from longctx.eval.scoring import ruler_postprocess, ruler_score, string_match_all, string_match_part
from longctx.eval.suite import SuitePlan, format_suite_table, summarize_suite
from longctx.tasks.haystacks import NOISE_SENTENCES, encode
from longctx.tasks.ruler import (
    RULER_TASKS,
    fit_prompt,
    load_qa_data,
    make_generator,
    prompt_ids,
)

QA_DIR = Path(__file__).parent / "data" / "ruler_qa"
LENGTH = 2500  # tokens of the byte-level tokenizer: every task fits (cwe has a 40-entry example, vt a 500-token one)
SYNTHETIC = [name for name in RULER_TASKS if not name.startswith("qa")]

# RULER's strings (scripts/data/synthetic/constants.py, niah.py), written out here as RULER renders them
SINGLE_HEAD = ("A special magic number is hidden within the following text. Make sure to memorize it. "
               "I will quiz you about the number afterwards.\n")
SINGLE_TAIL = ("\nWhat is the special magic number for {q} mentioned in the provided text? "
               "The special magic number for {q} mentioned in the provided text is")
MULTI_HEAD = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the numbers afterwards.\n")
MULTI_TAIL = ("\nWhat are all the special magic numbers for {q} mentioned in the provided text? "
              "The special magic numbers for {q} mentioned in the provided text are")
VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_TAIL = ("\nQuestion: Find all variables that are assigned the value {v} in the text above. Answer: According to "
           "the chain(s) of variable assignment in the text above, 5 variables are assigned the value {v}, they are: ")
CWE_HEAD = ("Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n")
CWE_TAIL = ("\nQuestion: What are the 10 most common words in the above list? "
            "Answer: The top 10 words that appear most often in the list are:")
FWE_HEAD = ("Read the following coded text and track the frequency of each coded word. "
            "Find the three most frequently appeared coded words. ")
FWE_TAIL = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
            "frequently appeared words in the above coded text? Answer: According to the coded text above, the three "
            "most frequently appeared words are:")
QA_HEAD = ("Answer the question based on the given documents. Only give me the answer and do not output any other "
           "words.\n\nThe following are given documents.\n\n")
QA_TAIL = ("\n\nAnswer the question based on the given documents. Only give me the answer and do not output any "
           "other words.\n\nQuestion: {q} Answer:")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def qa_data():
    return {"squad": load_qa_data(QA_DIR, "squad"), "hotpotqa": load_qa_data(QA_DIR, "hotpotqa")}


def raw_prompt(tokenizer, name, length=LENGTH, index=0, seed=0, qa_data=None):
    task = RULER_TASKS[name]
    generator = make_generator(tokenizer, name, length=length, seed=seed,
                               qa_data=qa_data[task.dataset] if task.kind == "qa" else None)
    fitted = fit_prompt(tokenizer, generator, index, "raw")
    return generator, fitted, tokenizer.decode(fitted.ids)


def test_ruler_constants():
    """Generation lengths and metrics as RULER's constants.py files set them, and the 13 task names."""
    assert list(RULER_TASKS) == ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
                                 "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery",
                                 "vt", "cwe", "fwe", "qa_1", "qa_2"]
    expected = {"niah": (128, "all"), "vt": (30, "all"), "cwe": (120, "all"), "fwe": (50, "all"), "qa": (32, "part")}
    for task in RULER_TASKS.values():
        assert (task.tokens_to_generate, task.metric) == expected[task.kind]
    haystacks = {name: RULER_TASKS[name].haystack for name in SYNTHETIC if RULER_TASKS[name].kind == "niah"}
    assert haystacks == {"niah_single_1": "noise", "niah_single_2": "essay", "niah_single_3": "essay",
                         "niah_multikey_1": "essay", "niah_multikey_2": "needle", "niah_multikey_3": "needle",
                         "niah_multivalue": "essay", "niah_multiquery": "essay"}


NEEDLE = re.compile(r"One of the special magic (numbers|uuids) for (\S+) is: (\S+)\.")


@pytest.mark.parametrize("name", [n for n in SYNTHETIC if n.startswith("niah")])
def test_niah_prompts_are_rulers_and_hold_their_answers(tokenizer, name):
    task = RULER_TASKS[name]
    _, fitted, text = raw_prompt(tokenizer, name)
    sample = fitted.sample
    asked = task.queries * task.values
    head, tail = (SINGLE_HEAD, SINGLE_TAIL) if asked == 1 else (MULTI_HEAD, MULTI_TAIL)
    needles = NEEDLE.findall(text)
    if task.value_type == "uuids":
        head, tail = head.replace("number", "uuid"), tail.replace("number", "uuid")
        assert {kind for kind, _, _ in needles} == {"uuids"}
    # the query: the asked keys, RULER's ", and " list for several
    query = re.search(r"\nWhat (?:is|are all) the special magic \w+ for (.+) mentioned in the provided text\?", text)[1]
    keys = query.split(", and ")[-1:] if task.queries == 1 else query.replace(", and ", ", ").split(", ")
    assert len(keys) == task.queries
    assert text.startswith(head) and text.endswith(tail.format(q=query))
    # every expected value is in a needle of an asked key; the asked keys each appear in needles
    # as many times as they have values (distractor needles never reuse them)
    by_key = Counter(key for _, key, _ in needles)
    for key in keys:
        assert by_key[key] == task.values
    found = [value for _, key, value in needles if key in keys]
    assert sorted(found) == sorted(sample.expected) and len(sample.expected) == asked
    inserted = task.values * max(task.keys, task.queries)
    if task.haystack == "needle":
        assert len(needles) > inserted + 4 and len(by_key) == len(needles)  # distractor needles make the haystack
    else:
        assert len(needles) == inserted
        assert (NOISE_SENTENCES in text) == (task.haystack == "noise")
    if task.value_type == "numbers":
        assert all(re.fullmatch(r"[1-9]\d{6}", value) for value in sample.expected)


def test_vt_prompt_is_rulers_and_its_chain_leads_to_the_answer(tokenizer):
    _, fitted, text = raw_prompt(tokenizer, "vt")
    sample = fitted.sample
    value = re.search(r"assigned the value (\d{5}), they are: $", text)[1]
    assert text.endswith(VT_TAIL.format(v=value)) and text.count(VT_HEAD) == 2  # the example, then the task
    example, task_text = text.split(VT_HEAD)[1:]
    # the in-context example is solved: its answer (5 names of 3 letters) follows its own answer prefix
    assert re.search(r"they are:  [A-Z]{3}( [A-Z]{3}){4}\n$", example)
    # follow the chain in the task's text: VAR A = value, VAR B = VAR A, ... gives exactly the expected names
    statements = re.findall(r"^VAR ([A-Z]{5}) = (.+?)\s*$", task_text.split("\nQuestion:")[0], re.MULTILINE)
    # RULER's chain, in the text in its order: VAR A = value, VAR B = VAR A, VAR C = VAR B, ...
    assert [source for _, source in statements] == [value] + [f"VAR {name}" for name, _ in statements[:-1]]
    assert [name for name, _ in statements] == sample.expected
    assignments = dict(statements)
    holders, changed = {name for name, source in assignments.items() if source == value}, True
    while changed:
        new = {name for name, source in assignments.items() if source.removeprefix("VAR ") in holders}
        changed, holders = not new <= holders, holders | new
    assert sorted(holders) == sorted(sample.expected) and len(holders) == 5
    assert sample.draft == " ".join(sample.expected)  # the answer prefix ends with a space


@pytest.mark.parametrize("length, common, other", [(LENGTH, 6, 1), (12000, 30, 3)])  # RULER repeats less below 4K
def test_cwe_prompt_is_rulers_and_its_common_words_are_the_answer(tokenizer, length, common, other):
    _, fitted, text = raw_prompt(tokenizer, "cwe", length=length)
    assert text.startswith(CWE_HEAD) and text.endswith(CWE_TAIL) and text.count(CWE_HEAD) == 2
    example, task_text = text.split(CWE_HEAD)[1:]
    assert re.search(r"are: 1\. \S+ 2\. \S+( \d+\. \S+){8}\n$", example)  # the example, solved
    listed = re.findall(r"(\d+)\. (\S+)", task_text.split("\nQuestion:")[0])
    assert [int(number) for number, _ in listed] == list(range(1, len(listed) + 1))
    counts = Counter(word for _, word in listed)
    assert sorted(w for w, c in counts.items() if c == common) == sorted(fitted.sample.expected)
    assert set(counts.values()) == {common, other} and len(fitted.sample.expected) == 10


def test_fwe_prompt_is_rulers_and_its_frequent_words_are_the_answer(tokenizer):
    _, fitted, text = raw_prompt(tokenizer, "fwe")
    assert text.startswith(FWE_HEAD) and text.endswith(FWE_TAIL)
    counts = Counter(text[len(FWE_HEAD): -len(FWE_TAIL)].split(" "))
    ranked = [word for word, _ in counts.most_common()]
    assert ranked[0] == "..." and ranked[1:4] == fitted.sample.expected
    assert counts[ranked[1]] > counts[ranked[2]] > counts[ranked[3]] > counts[ranked[4]]  # no ties: the answer is sure
    assert all(re.fullmatch(r"[a-z]{6}", word) for word in ranked[1:])


@pytest.mark.parametrize("name, dataset, length", [
    ("qa_1", "squad", 700),  # 2 documents: the gold one and one more of its article
    ("qa_1", "squad", 800),  # 3: the gold one, its article's other one, one from elsewhere
    ("qa_2", "hotpotqa", 900),  # 5: the question's 4 and one other
    ("qa_1", "squad", LENGTH), ("qa_2", "hotpotqa", LENGTH),  # more than the fixture holds: repeated
])
def test_qa_prompt_is_rulers_and_holds_its_gold_documents(tokenizer, qa_data, name, dataset, length):
    generator, fitted, text = raw_prompt(tokenizer, name, length=length, index=1, qa_data=qa_data)
    question = generator.question(1)
    assert text.startswith(QA_HEAD) and text.endswith(QA_TAIL.format(q=question["question"]))
    documents = re.findall(r"Document (\d+):\n(.*?)(?=\n\nDocument \d+:|\n\nAnswer the question)", text, re.DOTALL)
    assert [int(i) for i, _ in documents] == list(range(1, len(documents) + 1))
    shown = [document for _, document in documents]
    for gold in question["gold"]:
        assert qa_data[dataset].documents[gold] in shown
    if fitted.size < len(qa_data[dataset].documents):
        assert len(shown) == max(fitted.size, len(question["gold"])) and len(set(shown)) == len(shown)
        if length == 700:
            assert set(shown) == {qa_data[dataset].documents[i] for i in question["gold"] + question["more"]}
    else:
        assert set(shown) == set(qa_data[dataset].documents) and len(shown) == fitted.size
    assert fitted.sample.expected == question["answers"] and fitted.sample.metric == "part"


def test_qa_data_is_read_as_ruler_reads_it(qa_data):
    squad, hotpot = qa_data["squad"], qa_data["hotpotqa"]
    # SQuAD: the unanswerable question is left out; every answer text is kept; the article's other
    # paragraphs are the question's "more" documents; a paragraph without questions is still a document
    assert [q["question"] for q in squad.questions if "painted" in q["question"]] == []
    assert len(squad.questions) == 5 and len(squad.documents) == 4
    first = next(q for q in squad.questions if q["question"].startswith("In what year"))
    assert first["answers"] == ["1871", "in 1871"]
    assert "1871" in squad.documents[first["gold"][0]] and len(first["more"]) == 1
    # HotpotQA: documents are "title\nsentences joined", shared between questions, all of a question's gold
    assert len(hotpot.questions) == 3 and len(hotpot.documents) == 9
    assert "Ada Moss\nAda Moss was born in Marrow Bay in 1840. She kept the Grey Point light for thirty years." \
        in hotpot.documents
    assert all(len(q["gold"]) == 4 for q in hotpot.questions)


def test_qa_data_errors(tmp_path):
    with pytest.raises(LongctxError, match="is not a directory; give the directory that holds squad.json and hotpotqa.json"):
        load_qa_data(tmp_path / "absent", "squad")
    with pytest.raises(LongctxError, match="has no squad.json"):
        load_qa_data(tmp_path, "squad")
    (tmp_path / "hotpotqa.json").write_text('[{"question": "q", "answer": "a"}]')
    with pytest.raises(LongctxError, match="not in hotpotqa's format"):
        load_qa_data(tmp_path, "hotpotqa")
    (tmp_path / "squad.json").write_text('{"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": []}]}]}')
    with pytest.raises(LongctxError, match="no answerable question"):
        load_qa_data(tmp_path, "squad")


@pytest.mark.parametrize("name", list(RULER_TASKS))
@pytest.mark.parametrize("length", [LENGTH, 3100])
def test_prompt_is_the_largest_that_leaves_room_for_the_answer(tokenizer, qa_data, name, length):
    """At most length - tokens_to_generate tokens, and one more haystack unit would not fit."""
    generator, fitted, _ = raw_prompt(tokenizer, name, length=length, qa_data=qa_data)
    budget = length - RULER_TASKS[name].tokens_to_generate
    assert fitted.budget == budget and len(fitted.ids) <= budget
    longer = prompt_ids(tokenizer, generator.render(0, fitted.size + 1), "raw")
    assert len(longer) > budget


def test_too_short_a_length_is_refused(tokenizer):
    with pytest.raises(LongctxError, match="too short for vt"):
        fit_prompt(tokenizer, make_generator(tokenizer, "vt", length=600), 0, "raw")


@pytest.mark.parametrize("name", SYNTHETIC + ["qa_1"])
def test_samples_are_seeded(tokenizer, qa_data, name):
    same = [raw_prompt(tokenizer, name, index=2, qa_data=qa_data)[1].ids for _ in range(2)]
    assert same[0] == same[1]
    assert raw_prompt(tokenizer, name, index=3, qa_data=qa_data)[1].ids != same[0]
    assert raw_prompt(tokenizer, name, index=2, seed=1, qa_data=qa_data)[1].ids != same[0]


def test_chat_prompt_puts_shots_in_turns_and_the_answer_prefix_after_the_assistant_header(tokenizer):
    chat = make_tokenizer()
    chat.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    generator = make_generator(chat, "cwe", length=LENGTH)
    text = chat.decode(fit_prompt(chat, generator, 0, "chat").ids)
    turns = text.split("<|im_start|>")[1:]
    assert [turn.split("\n")[0] for turn in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[1].startswith("assistant\nAnswer: The top 10 words that appear most often in the list are: 1. ")
    assert turns[3] == "assistant\nAnswer: The top 10 words that appear most often in the list are:"


def ruler_string_match_all(preds, refs):  # RULER's scripts/eval/synthetic/constants.py, as written there
    score = sum([sum([1.0 if r.lower() in pred.lower() else 0.0 for r in ref]) / len(ref)
                 for pred, ref in zip(preds, refs)]) / len(preds) * 100
    return round(score, 2)


def ruler_string_match_part(preds, refs):
    score = sum([max([1.0 if r.lower() in pred.lower() else 0.0 for r in ref])
                 for pred, ref in zip(preds, refs)]) / len(preds) * 100
    return round(score, 2)


def test_metrics_are_rulers():
    preds = ["The values are 11, 22.", "nothing here", "ALPHA and beta", "1871", ""]
    refs = [["11", "22", "33"], ["x"], ["alpha", "Beta", "gamma"], ["in 1871", "1871"], ["a"]]
    for ours, theirs in ((string_match_all, ruler_string_match_all), (string_match_part, ruler_string_match_part)):
        mean = round(100 * sum(ours(p, r) for p, r in zip(preds, refs)) / len(preds), 2)
        assert mean == theirs(preds, refs)
    assert ruler_string_match_all(preds, refs) == 36.67 and ruler_string_match_part(preds, refs) == 60.0
    assert ruler_score("part", "in 1871", ["in 1871", "1871"]) == 1.0
    assert ruler_score("all", "in 1871", ["in 1871", "1972"]) == 0.5
    assert ruler_postprocess("  \x01 answer\tone\x1f ") == "answer\none"


def suite_rows(scores: dict[tuple[str, int], list[float]]) -> list[dict]:
    return [{"task": task, "length": length, "sample": i, "score": score}
            for (task, length), values in scores.items() for i, score in enumerate(values)]


def test_table_average_and_effective_length():
    lengths = [1000, 2000, 3000, 4000]
    plan = SuitePlan(lengths, ["niah_single_1", "vt"], samples=2)
    rows = suite_rows({
        ("niah_single_1", 1000): [1, 1], ("vt", 1000): [1, 0.8],  # 100, 90: average 95
        ("niah_single_1", 2000): [1, 1], ("vt", 2000): [0.6, 0.824],  # 100, 71.2: average 85.6, exactly the threshold
        ("niah_single_1", 3000): [1, 0], ("vt", 3000): [0.5, 0.5],  # 50, 50: average 50
        ("niah_single_1", 4000): [1, 1], ("vt", 4000): [1, 1],  # 100 again: past a failing length, it does not count
        ("vt", 9999): [0, 0],  # not in the plan: ignored
    })
    summary = summarize_suite(rows, plan, "m")
    assert summary["scores"]["vt"] == {"1000": 90.0, "2000": 71.2, "3000": 50.0, "4000": 100.0}
    assert summary["average"] == {"1000": 95.0, "2000": 85.6, "3000": 50.0, "4000": 100.0}
    assert summary["effective_length"] == 2000 and summary["samples_done"] == 16 and summary["skipped"] == ["qa_1", "qa_2"]
    assert summarize_suite(rows, SuitePlan(lengths, ["niah_single_1", "vt"], samples=2, threshold=0.95), "m")[
        "effective_length"] == 1000
    assert summarize_suite(rows, SuitePlan(lengths, ["vt"], samples=2), "m")["effective_length"] == 1000
    assert summarize_suite(rows, SuitePlan(lengths, ["vt"], samples=2, threshold=0.91), "m")["effective_length"] == 0
    # a length where a task has no sample yet (an interrupted run) has no average, and ends the effective length
    partial = summarize_suite([r for r in rows if (r["task"], r["length"]) != ("vt", 2000)], plan, "m")
    assert partial["average"]["2000"] is None and partial["scores"]["niah_single_1"]["2000"] == 100.0
    assert partial["effective_length"] == 1000
    table = format_suite_table(summary)
    assert "niah_single_1 |  100.0 |  100.0 |   50.0 |  100.0" in table
    assert "average (2)   |   95.0 |   85.6 |   50.0 |  100.0" in table
    assert "effective length 2.0k (average >= 85.6" in table and "skipped: qa_1, qa_2" in table


def test_plan_refusals():
    with pytest.raises(LongctxError, match="unknown RULER task"):
        SuitePlan([4096], ["niah_single_4"])
    with pytest.raises(LongctxError, match="qa_2 need QA data"):
        SuitePlan([4096], ["vt", "qa_2"])
    with pytest.raises(LongctxError, match=r"outside \(0, 1\]"):
        SuitePlan([4096], threshold=85.6)
    assert SuitePlan([4096]).tasks == SYNTHETIC and SuitePlan([4096], qa_data="d").tasks == list(RULER_TASKS)


# End to end on a tiny model ----------------------------------------------------------------------

TASKS = "niah_single_1,niah_multikey_2,vt,cwe,fwe,qa_1,qa_2"


def run_suite_cli(model, output, *extra, lengths=f"{LENGTH},2800"):
    return main(["needle", "--suite", "ruler", "--model", str(model), "--lengths", lengths, "--tasks", TASKS,
                 "--qa-data", str(QA_DIR), "--output", str(output), *extra])


def test_suite_writes_results_summary_heatmap_and_resumes(tiny_llama, tmp_path, capsys):
    output = tmp_path / "run"
    assert run_suite_cli(tiny_llama, output, "--samples", "1") == 0
    first = (output / "results.jsonl").read_text()
    rows = read_results(output / "results.jsonl")
    tasks = TASKS.split(",")
    assert [(r["task"], r["length"], r["sample"]) for r in rows] == [(t, L, 0) for L in (LENGTH, 2800) for t in tasks]
    for row in rows:
        assert row["prompt_tokens"] <= row["length"] - RULER_TASKS[row["task"]].tokens_to_generate
        assert 0 <= row["score"] <= 1 and row["processed_tokens"] == row["prompt_tokens"] - row["shared_prefix"]
    assert any(r["shared_prefix"] > 100 for r in rows if r["task"].startswith("niah"))  # the haystack prefix is reused
    assert all(r["shared_prefix"] == 0 for r in rows if not r["task"].startswith("niah"))
    summary = json.loads((output / "summary.json").read_text())
    assert summary["tasks"] == tasks and summary["lengths"] == [LENGTH, 2800] and summary["skipped"] == []
    assert summary["settings"]["qa_data"] == str(QA_DIR)
    png = (output / "heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    out = capsys.readouterr().out
    assert "average (7)" in out and "effective length" in out
    # more samples on --resume, at one of the lengths: the finished ones are kept as they were, only new ones run
    assert run_suite_cli(tiny_llama, output, "--samples", "2", "--resume", lengths=str(LENGTH)) == 0
    after = (output / "results.jsonl").read_text()
    added = read_results(output / "results.jsonl")[len(rows):]
    assert after.startswith(first) and [(r["task"], r["length"], r["sample"]) for r in added] == [
        (t, LENGTH, 1) for t in tasks]
    assert json.loads((output / "summary.json").read_text())["samples_done"] == 2 * len(tasks)  # the plan's samples
    # an interrupted line is dropped and its sample rerun, with the same result (seeded, greedy)
    lines = after.splitlines()
    (output / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])
    assert run_suite_cli(tiny_llama, output, "--samples", "2", "--resume", lengths=str(LENGTH)) == 0
    rerun = (output / "results.jsonl").read_text().splitlines()
    assert rerun[:-1] == lines[:-1]
    assert {**json.loads(rerun[-1]), "seconds": 0} == {**json.loads(lines[-1]), "seconds": 0}
    assert run_suite_cli(tiny_llama, output, "--samples", "2", "--resume", "--seed", "1") == 2
    assert "settings differ (seed)" in capsys.readouterr().err


def test_suite_without_qa_data_says_qa_was_skipped(tiny_llama, tmp_path, capsys):
    assert main(["needle", "--suite", "ruler", "--model", str(tiny_llama), "--lengths", str(LENGTH),
                 "--output", str(tmp_path / "all"), "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "skipped: qa_1, qa_2 (no --qa-data)" in out and "average (11)" in out
    assert json.loads((tmp_path / "all" / "summary.json").read_text())["skipped"] == ["qa_1", "qa_2"]


def test_suite_refusals(tiny_llama, tmp_path, capsys):
    base = ["needle", "--suite", "ruler", "--model", str(tiny_llama), "--lengths", str(LENGTH)]
    for extra, message in [
        (["--tasks", "qa_1"], "qa_1 need QA data"),
        (["--depths", "0,50"], "--depths applies to a grid"),
        (["--threshold", "85.6"], "outside (0, 1]"),
        (["--qa-data", str(tmp_path)], "has no squad.json"),
    ]:
        assert main([*base, *extra, "--output", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()
    assert main(["needle", "--suite", "ruler", "--model", str(tiny_llama), "--lengths", "700", "--tasks", "vt",
                 "--output", str(tmp_path / "x")]) == 2
    assert "too short for vt" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["needle", "--model", str(tiny_llama), "--lengths", "700", "--tasks", "vt", "--output",
                 str(tmp_path / "x")]) == 2
    assert "apply to --suite ruler" in capsys.readouterr().err


@pytest.mark.parametrize("answers", ["right", "one value", "another sample's"])
def test_a_model_that_answers_right_scores_100_and_one_that_does_not_scores_less(tiny_llama, tmp_path, monkeypatch,
                                                                               answers):
    """The answer oracle of test_needle makes the model say each prompt's right answer (not the
    draft: another form of it, below), only its last expected value, or the other sample's answer. Every
    task is answered through the real suite: prompt fitting, the reused prefix, the engine, the scoring."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import longctx.models.reference as reference

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), AutoTokenizer.from_pretrained(tiny_llama)
    qa = {"squad": load_qa_data(QA_DIR, "squad"), "hotpotqa": load_qa_data(QA_DIR, "hotpotqa")}
    prompts, answers = [], []
    for name, task in RULER_TASKS.items():
        generator = make_generator(tokenizer, name, length=LENGTH, qa_data=qa.get(task.dataset))
        fitted = [fit_prompt(tokenizer, generator, i, "raw") for i in range(2)]
        for i, prompt in enumerate(fitted):
            said = fitted[1 - i].sample if answers == "another sample's" else prompt.sample
            # not the draft itself: the values in reverse order, one per line (RULER reads every line;
            # vt's 5 names fit its 30 bytes)
            text = "\n".join(reversed(said.expected[-1:] if answers == "one value" else said.expected))
            prompts.append(prompt.ids)
            answers.append(encode(tokenizer, text))
    oracle = AnswerOracle(model, tokenizer.eos_token_id, prompts, answers)
    monkeypatch.setattr(reference, "load_model_and_tokenizer", lambda path, **options: (model, tokenizer))
    try:
        assert main(["needle", "--suite", "ruler", "--model", str(tiny_llama), "--lengths", str(LENGTH),
                     "--samples", "2", "--qa-data", str(QA_DIR), "--output", str(tmp_path / "run")]) == 0
    finally:
        oracle.handle.remove()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    scores = [summary["scores"][name][str(LENGTH)] for name in RULER_TASKS]
    if answers == "another sample's":
        assert all(score < 100 for score in scores) and summary["effective_length"] == 0
    elif answers == "one value":  # string_match_all: the fraction of the expected values said; QA's _part: any
        one = {"niah_multivalue": 25.0, "niah_multiquery": 25.0, "vt": 20.0, "cwe": 10.0, "fwe": 33.33}
        assert dict(zip(RULER_TASKS, scores)) == {name: one.get(name, 100.0) for name in RULER_TASKS}
    else:
        assert dict(zip(RULER_TASKS, scores)) == dict.fromkeys(RULER_TASKS, 100.0)
        assert summary["average"][str(LENGTH)] == 100.0
        assert summary["effective_length"] == LENGTH
    rows = read_results(tmp_path / "run" / "results.jsonl")
    assert any(r["shared_prefix"] > 0 for r in rows)
