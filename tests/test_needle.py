"""The needle harness: exact token budgets, needle placement, prefix reuse, scoring, passkey_accuracy."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_tiny_llama, make_tokenizer

from longctx.errors import LongctxError
from longctx.eval import Evaluator, passkey_accuracy
from longctx.eval.cache import cache_keyword
from longctx.eval.engine import PrefixCache, check_memory, estimate_memory_bytes, greedy_answer, prefill
from longctx.eval.runner import sample_rng
from longctx.eval.scoring import first_integer_match, keyword_recall, score_answer, score_is_settled, string_match_all
from longctx.tasks.haystacks import build_haystack, encode, load_haystack_text
from longctx.tasks.prompts import PromptBuilder, assemble_prompt, detect_style, needle_depths
from longctx.tasks.retrieval import TASKS, Task


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("needle") / "tiny")


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def default_tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def check_budget_and_placement(tokenizer, task_name, haystack, style, lengths, depths):
    task = Task(task_name)
    built = build_haystack(tokenizer, haystack, max(lengths))
    builder = PromptBuilder(tokenizer, built, task.instruction, style)
    period_ends = built.boundaries
    for length in lengths:
        for depth in depths:
            sample = task.sample(random.Random(f"{length}:{depth}"))
            prompt = builder.build(sample, length, depth)
            assert len(prompt.ids) == length
            needles = [encode(tokenizer, " " + n) for n in sample.needles]
            for start, needle, needle_depth in zip(prompt.needle_starts, needles, needle_depths(depth, len(needles))):
                assert prompt.ids[start : start + len(needle)] == needle
            # the first needle follows a sentence end, at the last boundary at or before its token depth
            first = prompt.needle_starts[0] - len(builder.head)
            target = round(prompt.haystack_tokens * depth / 100)
            assert first in period_ends and first <= target
            assert not [b for b in period_ends if first < b <= target]
            if first > 0:
                assert tokenizer.decode(prompt.ids[prompt.needle_starts[0] - 1 : prompt.needle_starts[0]]).rstrip(
                    " "
                ).endswith((".", "\n", "!", "?"))
            assert prompt.ids[: prompt.shared_prefix] == builder.clean_tokens[: prompt.shared_prefix]


@pytest.mark.parametrize("task_name", ["passkey", "multikey", "multivalue"])
def test_budget_exact_tiny_tokenizer(task_name):
    check_budget_and_placement(make_tokenizer(), task_name, "essays", "raw", [700, 1017, 2000], [0, 10, 33.3, 50, 100])


@pytest.mark.slow
@pytest.mark.parametrize("task_name,haystack", [("passkey", "noise"), ("needle", "essays"), ("multiquery", "essays")])
def test_budget_exact_default_tokenizer(default_tokenizer, task_name, haystack):
    check_budget_and_placement(default_tokenizer, task_name, haystack, "chat", [1000, 1024, 4097], [0, 25, 50, 75, 100])


def test_chat_prompt_puts_answer_prefix_after_assistant_header():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    task = Task("passkey")
    builder = PromptBuilder(tokenizer, build_haystack(tokenizer, "noise", 400), task.instruction, "chat")
    sample = task.sample(random.Random(0))
    text = tokenizer.decode(builder.build(sample, 400, 50).ids)
    assert text.startswith("<|im_start|>user\n" + task.instruction + "\nThe grass is green.")
    assert text.endswith("What is the pass key?<|im_end|>\n<|im_start|>assistant\nThe pass key is")
    assert detect_style(tokenizer, "auto", "single") == "chat"
    assert detect_style(tokenizer, "auto", "passkey") == "raw"  # the classic passkey test is a raw completion
    assert detect_style(make_tokenizer(), "auto", "single") == "raw"
    with pytest.raises(LongctxError, match="has none"):
        detect_style(make_tokenizer(), "chat")


def test_bad_inputs_are_refused(tmp_path):
    tokenizer = make_tokenizer()
    (tmp_path / "empty.txt").write_text("  \n")
    built = build_haystack(tokenizer, "noise", 300)
    with pytest.raises(LongctxError, match="outside 0-100"):
        assemble_prompt([1], [2], built, [[3]], 300, 101)
    with pytest.raises(LongctxError, match="too short"):
        assemble_prompt([1] * 50, [2] * 50, built, [[3] * 10], 100, 50)
    with pytest.raises(LongctxError, match="empty"):
        build_haystack(tokenizer, f"file:{tmp_path / 'empty.txt'}", 100)
    with pytest.raises(LongctxError, match="unknown haystack"):
        load_haystack_text("novels")
    with pytest.raises(LongctxError, match="unknown task"):
        Task("haystack")


def test_short_haystack_is_repeated(tmp_path, caplog):
    (tmp_path / "a.txt").write_text("One short sentence. Another one.")
    tokenizer = make_tokenizer()
    with caplog.at_level("INFO"):
        built = build_haystack(tokenizer, f"dir:{tmp_path}", 500)
    assert built.repeats > 1 and len(built.tokens) >= 500
    assert "repeating it" in caplog.text


def test_dataset_haystack_reads_a_local_file(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"body": "First row."}\n{"body": "Second row."}\n')
    assert load_haystack_text(f"dataset:{tmp_path / 'rows.jsonl'}:train:body") == "First row.\n\nSecond row."
    with pytest.raises(LongctxError, match="no column"):
        load_haystack_text(f"dataset:{tmp_path / 'rows.jsonl'}:train:text")
    (tmp_path / "broken.jsonl").write_text('{"body": "First row."}\n{"body": not json\n')
    with pytest.raises(LongctxError, match="cannot load dataset"):
        load_haystack_text(f"dataset:{tmp_path / 'broken.jsonl'}:train:body")
    with pytest.raises(LongctxError, match="cannot load dataset"):  # not on disk, and no hub here
        load_haystack_text("dataset:no-such-org/no-such-dataset")


@pytest.mark.parametrize("in_place", [False, True])
def test_prefix_reuse_gives_the_logits_of_a_full_prefill(tiny, in_place):
    """With the model's own sdpa a prompt gets a copy of the prefix; under the engine's evaluation_mode
    (longctx_cached) it reads the prefix cache's buffers in place and holds only its own positions."""
    import contextlib

    from longctx.eval.cache import is_based
    from longctx.eval.engine import evaluation_mode

    model, tokenizer = tiny
    task = Task("multivalue")
    builder = PromptBuilder(tokenizer, build_haystack(tokenizer, "essays", 1000), task.instruction, "raw")
    prefix = PrefixCache(model, builder.clean_tokens, chunk_size=256)
    shared = []
    for depth in (40, 100, 0, 70):  # out of order: the prefix cache grows (40, then 100) and is cropped
        prompt = builder.build(task.sample(random.Random(depth)), 1000, depth)
        shared.append(prompt.shared_prefix)
        with evaluation_mode(model) if in_place else contextlib.nullcontext():
            cache, position = prefix.start(prompt.ids, prompt.shared_prefix)
            assert position == prompt.shared_prefix
            reused = prefill(model, cache, prompt.ids[position:], chunk_size=256, keep=20)
        assert is_based(cache) == (in_place and position > 0)
        if is_based(cache):  # the prefix is read where it lies; the prompt's layers hold only what follows it
            assert cache.base[0][0].data_ptr() == prefix.cache.layers[0].keys.data_ptr()
            assert cache.layers[0].held() == len(prompt.ids) - position
            assert cache.get_seq_length() == len(prompt.ids)
        with torch.no_grad():
            full = model(torch.tensor([prompt.ids])).logits[0, -20:]
        torch.testing.assert_close(reused, full, rtol=1e-4, atol=1e-4)
    # grown on demand to the longest shared prefix, each clean token run through the model once
    assert shared[2] < shared[0] < shared[3] < shared[1]  # every depth its own prefix
    assert prefix.length == prefix.tokens_processed == max(shared) == shared[1]


def test_prefill_carries_the_kept_positions_in_its_last_chunk(tiny):
    from longctx.eval.engine import new_cache

    model, _ = tiny
    ids = torch.randint(5, model.config.vocab_size, (10,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        full = model(torch.tensor([ids])).logits[0]
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        for keep, forwards in ((0, 3), (1, 3), (2, 3), (3, 3), (10, 1)):  # chunks 4 + 4 + 2, or 4 + 3 + 3 for keep=3
            calls.clear()
            logits = prefill(model, new_cache(), ids, chunk_size=4, keep=keep)
            assert len(calls) == forwards
            if keep:
                torch.testing.assert_close(logits, full[-keep:], rtol=1e-4, atol=1e-4)
            else:
                assert logits is None
    finally:
        hook.remove()


def test_reserved_cache_writes_in_place_and_decodes_like_a_fresh_prefill(tiny):
    """Decode steps write into the reserved buffers (no reallocation), a cache that outgrows its
    capacity doubles, and the source of a cropped copy is left as it was."""
    from transformers import DynamicCache

    from longctx.eval.engine import cropped_copy, new_cache

    model, _ = tiny
    ids = torch.randint(3, 250, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    source = new_cache()
    prefill(model, source, ids[:30], keep=0)
    before = source.layers[0].keys.clone()
    reserved = cropped_copy(source, 20, capacity=24)
    buffer = reserved.layers[0].buffers[0]
    assert buffer.shape[-2] == 24
    plain = DynamicCache()
    logits = []
    with torch.no_grad():
        for cache in (reserved, plain):
            start = 20 if cache is reserved else 0
            if start == 0:
                model(input_ids=torch.tensor([ids[:20]]), use_cache=True, **{cache_keyword(model): cache})
            logits.append(torch.cat([model(input_ids=torch.tensor([[token]]), use_cache=True, **{cache_keyword(model): cache}).logits[0]
                                     for token in ids[20:30]]))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    assert reserved.get_seq_length() == 30 and reserved.layers[0].buffers[0].shape[-2] == 48  # 24 ran out: doubled
    assert buffer.data_ptr() != reserved.layers[0].buffers[0].data_ptr()
    torch.testing.assert_close(reserved.layers[0].keys[..., :20, :], before[..., :20, :])
    assert torch.equal(source.layers[0].keys, before) and source.get_seq_length() == 30


def test_a_prefix_read_in_place_drops_a_draft_and_decodes_like_a_fresh_prefill(tiny):
    """A prompt on a prefix read in place: a rejected draft is dropped (keep_first) and the decode
    steps after it give a full forward pass's logits; the prefix cache is never written."""
    from longctx.eval.engine import evaluation_mode, forward, keep_first

    model, _ = tiny
    ids = torch.randint(3, 250, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    prefix = PrefixCache(model, ids[:40], chunk_size=16)
    with evaluation_mode(model):
        cache, position = prefix.start(ids[:50], 40, answer_tokens=10)
        before = prefix.cache.layers[0].keys.clone()
        prefill(model, cache, ids[position:50] + [7, 7, 7], chunk_size=16, keep=0)  # prompt + a 3-token draft
        keep_first(cache, 50)  # the draft was wrong
        assert cache.get_seq_length() == 50 and cache.layers[0].held() == 10
        steps = torch.stack([forward(model, cache, [token], keep=1)[-1] for token in ids[50:55]])
    with torch.no_grad():
        full = model(torch.tensor([ids[:55]])).logits[0, 50:55]
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)
    assert torch.equal(prefix.cache.layers[0].keys, before)
    with pytest.raises(LongctxError, match="in place"):  # outside evaluation_mode its attention would miss the prefix
        forward(model, cache, [5], keep=1)


def test_prefix_reuse_scores_equal_from_scratch(tiny):
    model, tokenizer = tiny
    results = {}
    for reuse in (True, False):
        evaluator = Evaluator(model, tokenizer, Task("passkey"), max_length=512, prefix_reuse=reuse, scoring="teacher-forced")
        results[reuse] = [evaluator.evaluate(512, depth).to_json() for depth in (0, 50, 100)]
        if reuse:
            assert all(r["processed_tokens"] < 512 for r in results[reuse][1:])
    for reused, scratch in zip(results[True], results[False]):
        assert reused["answer"] == scratch["answer"] and reused["score"] == scratch["score"]


def test_dynamic_rope_falls_back_to_full_prefill(tmp_path, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_llama(
        tmp_path / "dyn", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}
    )
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    with caplog.at_level("WARNING"):
        evaluator = Evaluator(model, tokenizer, Task("passkey"), max_length=400)
    assert not evaluator.prefix_reuse and "cannot be reused" in caplog.text
    assert evaluator.evaluate(400, 50).processed_tokens == 400


def test_prefix_reuse_is_refused_when_any_layer_type_has_a_length_dependent_rope():
    """The engine reads rope types through longctx.rope.config (no private parser, no broad except):
    a Gemma-3-style config whose full-attention layers use dynamic NTK refuses reuse even though
    its first layer type (sliding) is static; a model without RoPE reuses."""
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig

    from longctx.eval.engine import length_dependent_rope, prefix_reuse_supported

    gemma = Gemma3TextConfig(rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        "full_attention": {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 4.0},
    })
    assert length_dependent_rope(gemma) == ["dynamic"] and not prefix_reuse_supported(gemma)
    assert length_dependent_rope(LlamaConfig(rope_scaling={"type": "dynamic", "factor": 2.0})) == ["dynamic"]
    longrope = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0], "long_factor": [2.0],
                "original_max_position_embeddings": 64}
    assert length_dependent_rope({"rope_parameters": longrope, "max_position_embeddings": 256}) == ["longrope"]
    for static in (LlamaConfig(), LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0}), Gemma3TextConfig(), GPT2Config()):
        assert prefix_reuse_supported(static)
    with pytest.raises(LongctxError, match="corrupt"):
        prefix_reuse_supported({"rope_parameters": "dynamic"})


def test_scoring_rules():
    assert first_integer_match(" 12345. Remember", "12345") == 1.0
    assert first_integer_match("is 123456", "12345") == 0.0
    assert first_integer_match("no number", "12345") == 0.0
    assert string_match_all("The values are 11, 22 and 33", ["11", "22", "44", "33"]) == 0.75
    assert string_match_all("CALM-Otter", ["calm-otter"]) == 1.0
    needle = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
    question = "What is the best thing to do in San Francisco?"
    assert keyword_recall("eat a sandwich and sit in Dolores Park on a sunny day", needle, question) == 1.0
    assert keyword_recall("go to Dolores Park", needle, question) == pytest.approx(2 / 7)
    for name in TASKS:
        for value_type in ("numbers", "words", "uuids") if name not in ("passkey", "reverse", "needle") else ("numbers",):
            sample = Task(name, value_type=value_type).sample(random.Random(1))
            assert score_answer(sample, sample.answer) == 1.0
            assert score_answer(sample, "I do not know") == 0.0
            assert len(sample.needles) == (4 if name.startswith("multi") else 1)


def test_reverse_asks_for_the_hidden_digits_backwards_and_scores_only_the_whole_reversed_list():
    sample = Task("reverse").sample(random.Random(4))
    digits = sample.needles[0].removeprefix("The list is ").removesuffix(".").split(" ")
    assert len(digits) == len(set(digits)) == 5 and all(d.isdigit() and len(d) == 1 for d in digits)
    assert sample.expected == [" ".join(digits[::-1])] and sample.answer == " " + sample.expected[0]
    assert score_answer(sample, sample.answer + " and more") == 1.0
    assert score_answer(sample, " " + " ".join(digits)) == 0.0  # forwards
    assert score_answer(sample, " " + " ".join(digits[::-1][:-1])) == 0.0  # one digit short
    assert Task("reverse").sample(random.Random(4)).needles == sample.needles


def test_score_is_settled_only_when_no_continuation_can_change_the_score():
    passkey = Task("passkey").sample(random.Random(0))
    key = passkey.expected[0]
    for unsettled in ("", "The key", key[:3], key, "no number yet"):
        assert not score_is_settled(passkey, unsettled)
    for settled in (key + ".", key + " Remember", "123 and"):
        assert score_is_settled(passkey, settled)
    multivalue = Task("multivalue").sample(random.Random(0))
    assert not score_is_settled(multivalue, ", ".join(multivalue.expected[:-1]))
    assert score_is_settled(multivalue, ", ".join(multivalue.expected))


def test_generation_stops_once_the_score_is_settled(tiny):
    model, tokenizer = tiny
    prompt = encode(tokenizer, "The pass key is 12345. What is the pass key? The pass key is")
    prefix = PrefixCache(model, prompt, enabled=False)
    free = greedy_answer(model, tokenizer, prefix, prompt, 0, max_new_tokens=6)
    stopped = greedy_answer(model, tokenizer, prefix, prompt, 0, max_new_tokens=6, settled=lambda text: len(text) >= 1)
    assert len(free.text) > len(stopped.text) >= 1
    assert free.text.startswith(stopped.text)


def test_a_draft_gives_the_greedy_answer_and_saves_the_decode_steps_it_gets_right(tiny):
    model, tokenizer = tiny
    prompt = encode(tokenizer, "The pass key is 12345. What is the pass key? The pass key is")
    budget = 6
    reference = model.generate(torch.tensor([prompt]), max_new_tokens=budget, do_sample=False, min_new_tokens=budget,
                                pad_token_id=0)[0, len(prompt):].tolist()
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        answers = {}
        for name, draft in {
            "none": [],
            "right": reference,
            "right then wrong": reference[:2] + [(reference[2] + 1) % model.config.vocab_size],
            "wrong": [(reference[0] + 1) % model.config.vocab_size] * 4,
        }.items():
            calls.clear()
            prefix = PrefixCache(model, prompt, enabled=False)
            answers[name] = (greedy_answer(model, tokenizer, prefix, prompt, 0, budget, draft=draft).text, len(calls))
    finally:
        hook.remove()
    greedy_text = tokenizer.decode(reference, skip_special_tokens=True).lstrip().split("\n")[0].strip()
    assert {text for text, _ in answers.values()} == {greedy_text}
    assert answers["right"][1] == 1  # the prompt's pass alone: no decode step
    assert answers["right then wrong"][1] == answers["none"][1] - 2
    assert answers["wrong"][1] == answers["none"][1]


def test_multikey_asks_for_the_first_needle_among_distinct_keys():
    sample = Task("multikey", value_type="uuids").sample(random.Random(3))
    keys = [n.split(" for ")[1].split(" is:")[0] for n in sample.needles]
    assert len(set(keys)) == 4 and keys[0] in sample.question and sample.expected[0] in sample.needles[0]


class AnswerOracle:
    """A forward hook that makes a model answer known prompts: at each position of prompt i it
    predicts the next token of prompts[i] + continuations[i] (EOS after it), and EOS in any prompt
    it does not know. The model still runs (its cache and chunking are the real ones); only the
    logits it returns are replaced. It tells prompts apart by their tokens, as it sees them; a pass
    that starts at or after the end of the current prompt is one of its decode steps (prompts may
    differ in length). A pass's positions are its position_ids when it has them (a rank's piece of a
    sharded pass), else those after the cache's."""

    def __init__(self, model, eos: int, prompts: list[list[int]], continuations: list[list[int]]):
        self.eos, self.prompts = eos, prompts
        self.sequences = [prompt + continuation for prompt, continuation in zip(prompts, continuations)]
        self.current = None  # the prompt of the pass in progress (decode steps carry no prompt tokens)
        self.handle = model.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, output):
        ids = kwargs["input_ids"][0].tolist()
        positions = kwargs.get("position_ids")
        if positions is not None:
            start = int(positions[0, 0])
            end = start + len(ids)
        else:
            end = kwargs[cache_keyword(module)].get_seq_length()
            start = end - len(ids)
        if self.current is None or start < len(self.prompts[self.current]):  # prompt tokens: whose?
            self.current = next((i for i, prompt in enumerate(self.prompts)
                                 if start < len(prompt) and prompt[start:end] == ids[: len(prompt) - start]), None)
        logits = torch.full_like(output.logits, -1e4)
        for row, position in enumerate(range(end - logits.shape[1], end)):
            sequence = self.sequences[self.current] if self.current is not None else []
            logits[0, row, sequence[position + 1] if position + 1 < len(sequence) else self.eos] = 1e4
        output.logits = logits
        return output


def oracle_answers(evaluator, cells, *, wrong_piece=None):
    """The prompts of an evaluator's (length, depth, index) cells and their answers as pieces' tokens;
    wrong_piece=k spoils the last token of answer piece k."""
    prompts, answers = [], []
    for length, depth, index in cells:
        sample = evaluator.task.sample(sample_rng(evaluator.seed, length, depth, index))
        prompts.append(evaluator.builder.build(sample, length, depth).ids)
        pieces = [encode(evaluator.tokenizer, text) for text, _ in sample.answer_pieces]
        if wrong_piece is not None:
            pieces[wrong_piece][-1] = (pieces[wrong_piece][-1] + 1) % evaluator.model.config.vocab_size
        answers.append([token for piece in pieces for token in piece])
    return prompts, answers


@pytest.mark.parametrize("scoring", ["teacher-forced", "generate"])
@pytest.mark.parametrize("wrong_piece, score", [(None, 1.0), (2, 0.75), (1, 1.0)])
def test_a_model_that_answers_scores_by_the_answer_parts_it_gets_right(tiny, scoring, wrong_piece, score):
    """Four values, ' v1' ',' ' v2' ',' ...: an oracle right everywhere scores 1, one wrong value
    0.75, and a wrong comma (piece 1, not scored) still 1; in both scorings, on the real engine."""
    model, tokenizer = tiny
    evaluator = Evaluator(model, tokenizer, Task("multivalue"), max_length=800, scoring=scoring)
    prompts, answers = oracle_answers(evaluator, [(800, 30, 0)], wrong_piece=wrong_piece)
    oracle = AnswerOracle(model, tokenizer.eos_token_id, prompts, answers)
    try:
        result = evaluator.evaluate(800, 30)
    finally:
        oracle.handle.remove()
    assert result.score == score
    assert result.answer == tokenizer.decode(answers[0]).strip()


def test_memory_refusal_names_the_figure(tiny):
    model, _ = tiny
    assert estimate_memory_bytes(model, 4096) < estimate_memory_bytes(model, 8192)
    # a CPU sdpa model reads the reused prefix in place (one cache); under eager a prompt copies it (two)
    assert estimate_memory_bytes(model, 4096) == estimate_memory_bytes(model, 4096, reuse=False)
    model.set_attn_implementation("eager")
    try:
        assert estimate_memory_bytes(model, 4096) > estimate_memory_bytes(model, 4096, reuse=False)
    finally:
        model.set_attn_implementation("sdpa")
    with pytest.raises(LongctxError, match=r"GiB .* available"):
        check_memory(model, 10**9)


@pytest.mark.parametrize("scoring", ["generate", "teacher-forced"])
def test_passkey_accuracy_is_the_mean_over_its_probes(tiny, scoring):
    """Without depths, one probe at each of num_samples evenly spaced depths; with depths, num_samples
    probes at each: an oracle that answers exactly one probe scores 1 / (number of probes)."""
    model, tokenizer = tiny
    reference = Evaluator(model, tokenizer, Task("passkey"), max_length=300)
    for known, options, probes in [
        ((300, 100.0, 0), {"num_samples": 3}, 3),  # depths 0, 50, 100
        ((300, 0.0, 1), {"num_samples": 2, "depths": [0, 100]}, 4),  # samples 0 and 1 at each depth
    ]:
        oracle = AnswerOracle(model, tokenizer.eos_token_id, *oracle_answers(reference, [known]))
        model.train()
        try:
            score = passkey_accuracy(model, tokenizer, length=300, scoring=scoring, **options)
        finally:
            oracle.handle.remove()
        assert score == pytest.approx(1 / probes) and model.training  # the mode is restored


@pytest.mark.slow
def test_default_model_retrieves_a_passkey_at_1k(default_model_dir):
    from longctx.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(default_model_dir)
    assert passkey_accuracy(model, tokenizer, length=1024, num_samples=1) == 1.0  # one probe at depth 50


HEAP_PROBE = """
import ctypes, sys, torch
from longctx.eval.cache import keep_heap_small
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
torch.empty(4 << 20)  # 16 MiB mapped then freed: glibc raises its mmap threshold to 16 MiB
if sys.argv[1] == "fixed":
    assert keep_heap_small()
mapped = libc.mallinfo2().hblkhd
buffer = torch.empty(1 << 18)  # 1 MiB, the size of a KV cache buffer
print(libc.mallinfo2().hblkhd - mapped >= 1 << 20)
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's allocator")
def test_cache_sized_tensors_are_mapped_not_kept_in_the_heap_once_the_engine_runs():
    """After a model load has raised glibc's mmap threshold, a 1 MiB tensor comes from the brk heap
    (whose holes stay resident when freed) unless keep_heap_small() has fixed the threshold."""
    import subprocess
    import sys

    def mapped(mode):
        out = subprocess.run([sys.executable, "-c", HEAP_PROBE, mode], capture_output=True, text=True, check=True)
        return out.stdout.strip()

    assert mapped("dynamic") == "False"  # the failure the fix is for: the 1 MiB tensor lands in the heap
    assert mapped("fixed") == "True"


def test_only_an_evaluation_across_ranks_fixes_the_threshold(tiny, monkeypatch):
    """One process keeps glibc's own threshold (cheaper in CPU time); a rank fixes it (its memory is the point)."""
    import longctx.eval.engine as engine
    from longctx.eval.sharded import Sharding

    calls = []
    monkeypatch.setattr(engine, "keep_heap_small", lambda: calls.append(1) or True)
    model, _ = tiny
    with engine.evaluation_mode(model):
        pass
    assert calls == []
    with engine.evaluation_mode(model, Sharding(None, 0, 2)):
        pass
    assert calls == [1]
