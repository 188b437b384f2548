"""`longctx ppl`: perplexity by length equals transformers' own loss, static and dynamic rope."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_tiny_llama

from longctx.cli import main
from longctx.errors import LongctxError
from longctx.tasks.haystacks import encode, load_haystack_text
from longctx.eval.perplexity import perplexity_by_length


def reference_ppl(model, ids):
    with torch.no_grad():
        return math.exp(model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item())


@pytest.mark.parametrize("rope", [{"rope_type": "default", "rope_theta": 10000.0},
                                  {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}])
def test_perplexity_matches_transformers_loss(tmp_path, rope):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_llama(tmp_path / "m", rope_parameters=rope)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    ids = encode(tokenizer, load_haystack_text("essays")[:2000])
    lengths = [100, 300, 700]  # 700 > max_position_embeddings 256: dynamic scaling is active there
    ours = perplexity_by_length(model, ids, lengths, chunk_size=128)
    for length in lengths:
        assert ours[length] == pytest.approx(reference_ppl(model, ids[:length]), rel=1e-4)
    with pytest.raises(LongctxError, match="fewer than the longest length"):
        perplexity_by_length(model, ids[:50], [100])


def test_ppl_command_compares_models(tmp_path, capsys):
    first = make_tiny_llama(tmp_path / "first", seed=0)
    second = make_tiny_llama(tmp_path / "second", seed=1)
    (tmp_path / "book.txt").write_text(load_haystack_text("essays")[:3000])
    output = tmp_path / "ppl"
    code = main(["ppl", "--model", str(first), "--model", str(second), "--text", f"file:{tmp_path / 'book.txt'}",
                 "--lengths", "128,512", "--output", str(output)])
    assert code == 0
    data = json.loads((output / "ppl.json").read_text())
    assert set(data["perplexity"]) == {"first", "second"} and data["lengths"] == [128, 512]
    assert all(value > 1 for by in data["perplexity"].values() for value in by.values())
    assert (output / "ppl.png").read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "first" in table and "second" in table and "512" in table
    assert main(["ppl", "--model", str(first), "--text", f"file:{tmp_path / 'book.txt'}", "--lengths", "100k"]) == 2
    assert "fewer than the longest length" in capsys.readouterr().err
