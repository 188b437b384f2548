import json

import pytest
import torch
from conftest import make_tiny_llama

from longctx.errors import LongctxError
from longctx.models import SafetensorsWriter, TensorReader, atomic_output_dir, resolve_model


def test_tensor_reader_streams_sharded_checkpoint(tmp_path):
    model_dir = make_tiny_llama(tmp_path / "m", max_shard_size="100KB")
    reader = TensorReader(model_dir)
    assert len(reader.shards()) > 1
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    state = model.state_dict()
    names = reader.names()
    assert set(names) == set(state)
    for name, tensor in reader.iter_tensors():
        assert torch.equal(tensor, state[name])
        assert reader.shape(name) == tuple(tensor.shape)
        assert reader.dtype(name) == tensor.dtype


def test_tensor_reader_maps_tensors_privately_and_copies_unaligned_ones(tmp_path):
    """Each tensor is a copy-on-write map of its bytes: writing to it leaves the file as it was,
    it outlives its reader, and bytes a writer left unaligned for their dtype are copied."""
    import struct

    odd = torch.arange(3, dtype=torch.uint8)
    values = torch.linspace(-1, 1, 6).reshape(2, 3)
    header = {"odd": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "values": {"dtype": "F32", "shape": [2, 3], "data_offsets": [3, 27]}}
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-aligned, "values" 3 bytes after: unaligned
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded
                                                + odd.numpy().tobytes() + values.numpy().tobytes())
    reader = TensorReader(tmp_path)
    read = reader.get("values")
    assert torch.equal(read, values) and torch.equal(reader.get("odd"), odd)
    aligned = reader.get("odd")
    aligned += 7
    read *= 2
    del reader
    assert torch.equal(read, 2 * values)
    fresh = TensorReader(tmp_path)
    assert torch.equal(fresh.get("values"), values) and torch.equal(fresh.get("odd"), odd)


def test_tensor_reader_refuses_pickle_without_flag(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(LongctxError, match="--allow-pickle"):
        TensorReader(tmp_path)
    assert torch.equal(TensorReader(tmp_path, allow_pickle=True).get("w"), torch.ones(2))


def test_tensor_reader_reports_missing_shard(tmp_path):
    model_dir = make_tiny_llama(tmp_path / "m", max_shard_size="100KB")
    shard = sorted(model_dir.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(LongctxError, match="missing weight shard"):
        TensorReader(model_dir)


def test_sharded_writer_output_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    source = make_tiny_llama(tmp_path / "src")
    reader = TensorReader(source)
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        with SafetensorsWriter(tmp, max_shard_bytes=50_000) as writer:
            for name, tensor in reader.iter_tensors():
                writer.write(name, tensor)
        shards = writer.files
        (tmp / "config.json").write_text((source / "config.json").read_text())
    assert len(shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    reloaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    original = AutoModelForCausalLM.from_pretrained(source).state_dict()
    assert all(torch.equal(reloaded[k], original[k]) for k in original)


def mixed_tensors() -> dict[str, torch.Tensor]:
    """Every dtype the writer meets, odd byte counts (unaligned offsets after them), a scalar,
    an empty tensor, and a non-contiguous view."""
    generator = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(40, 24, generator=generator),
        "b.half": torch.randn(7, 3, generator=generator).half(),  # 42 bytes
        "c.bf16": torch.randn(33, generator=generator).bfloat16(),
        "d.ids": torch.arange(5, dtype=torch.int64),
        "e.mask": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(3.5),
        "g.empty": torch.zeros(0, 8),
        "h.transposed": torch.randn(16, 48, generator=generator).T,
        "i.bytes": torch.arange(11, dtype=torch.uint8),
    }


@pytest.mark.parametrize("max_shard_bytes", [None, 1000])
def test_writer_announced_and_open_layouts_write_the_same_files(tmp_path, max_shard_bytes):
    """The two ways of feeding the writer give byte-identical files that safetensors reads back
    exactly, shards split where save_pretrained would (none past max_shard_bytes unless a
    single tensor is larger), with an index naming every tensor's shard."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from longctx.models import tensor_layout

    tensors = mixed_tensors()
    outputs = {}
    for mode, layout in (("announced", tensor_layout(tensors)), ("open", None)):
        out = tmp_path / mode
        out.mkdir()
        with SafetensorsWriter(out, layout, max_shard_bytes=max_shard_bytes) as writer:
            for name, tensor in tensors.items():
                writer.write(name, tensor)
        outputs[mode] = writer.files
        assert sorted(p.name for p in out.iterdir()) == sorted(writer.files + (
            ["model.safetensors.index.json"] if len(writer.files) > 1 else []))  # no side files left
        loaded = {}
        for file in writer.files:
            loaded.update(load_file(out / file))
            with safe_open(out / file, framework="pt") as handle:
                assert handle.metadata() == {"format": "pt"}
        assert loaded.keys() == tensors.keys()
        for name, tensor in tensors.items():
            assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
        assert writer.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
        if max_shard_bytes is None:
            assert writer.files == ["model.safetensors"]
            continue
        assert len(writer.files) > 1 and writer.files[0] == f"model-00001-of-{len(writer.files):05d}.safetensors"
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == writer.total_bytes
        for file in writer.files:
            names = [name for name, shard in index["weight_map"].items() if shard == file]
            assert sorted(names) == sorted(load_file(out / file))
            sizes = [tensors[name].numel() * tensors[name].element_size() for name in names]
            assert sum(sizes) <= max_shard_bytes or len(names) == 1
    assert outputs["announced"] == outputs["open"]
    for file in outputs["announced"]:
        assert (tmp_path / "announced" / file).read_bytes() == (tmp_path / "open" / file).read_bytes(), file


def test_writer_copies_tensors_file_to_file_and_checks_the_announced_layout(tmp_path):
    from safetensors.torch import load_file, save_file

    from longctx.models import tensor_layout
    from longctx.models.tensors import read_safetensors_header

    tensors = mixed_tensors()
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, tmp_path / "source.safetensors")
    locations = read_safetensors_header(tmp_path / "source.safetensors")
    for mode in ("announced", "open"):
        out = tmp_path / mode
        out.mkdir()
        with SafetensorsWriter(out, tensor_layout(tensors) if mode == "announced" else None) as writer:
            for name in tensors:
                writer.copy(name, locations[name])
        copied = load_file(out / "model.safetensors")
        assert all(torch.equal(copied[name], tensor) for name, tensor in tensors.items()), mode

    layout = tensor_layout(tensors)
    with pytest.raises(ValueError, match="out of the announced layout"):
        with SafetensorsWriter(tmp_path / "announced", layout) as writer:
            writer.write("b.half", tensors["b.half"])  # a.weight comes first
    with pytest.raises(ValueError, match="out of the announced layout"):
        with SafetensorsWriter(tmp_path / "announced", layout) as writer:
            writer.write("a.weight", tensors["a.weight"].double())  # not the announced dtype
    with pytest.raises(ValueError, match="never written"):
        with SafetensorsWriter(tmp_path / "announced", layout) as writer:
            writer.write("a.weight", tensors["a.weight"])
    with pytest.raises(ValueError, match="written twice"):
        with SafetensorsWriter(tmp_path / "open") as writer:
            writer.write("a.weight", tensors["a.weight"])
            writer.write("a.weight", tensors["a.weight"])
    assert not list((tmp_path / "open").glob(".*.partial"))  # a failed writer leaves no side files


def test_writer_streams_a_meta_device_layout(tmp_path):
    """A layout announced from a meta-device state dict (shapes, no data), then filled tensor by tensor."""
    from conftest import tiny_llama_config
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from longctx.models import tensor_layout, write_safetensors

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_llama_config())
    real = AutoModelForCausalLM.from_config(tiny_llama_config()).state_dict()
    for name in ("streamed", "whole"):
        (tmp_path / name).mkdir()
    with SafetensorsWriter(tmp_path / "streamed", tensor_layout(meta.state_dict()), max_shard_bytes=100_000) as writer:
        for name in meta.state_dict():
            writer.write(name, real[name])
    assert len(writer.files) > 1
    assert write_safetensors(tmp_path / "whole", real, max_shard_bytes=100_000) == writer.files
    for file in writer.files:
        assert (tmp_path / "streamed" / file).read_bytes() == (tmp_path / "whole" / file).read_bytes()
    (tmp_path / "one").mkdir()
    write_safetensors(tmp_path / "one", real, max_shard_bytes=None, metadata={"aliases": "{}"})
    with safe_open(tmp_path / "one" / "model.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "aliases": "{}"} and set(handle.keys()) == set(real)


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(dest) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_refuses_existing_unless_overwrite(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old").write_text("old")
    with pytest.raises(LongctxError, match="--overwrite"):
        with atomic_output_dir(dest):
            pass
    with atomic_output_dir(dest, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_unknown_reference_and_unreachable_hub_fail_fast(tmp_path, monkeypatch):
    with pytest.raises(LongctxError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LongctxError, match="cannot reach the Hugging Face hub"):
        resolve_model("meta-llama/Meta-Llama-3-8B")


def test_unreadable_gguf_fails_in_one_line_and_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 16)
    with pytest.raises(LongctxError, match="cannot read GGUF file .*bad.gguf"):
        resolve_model(bad)
    assert not list((tmp_path / "cache").rglob("config.json"))


def test_hub_is_used_only_when_not_offline_and_reachable(monkeypatch):
    from longctx.models import reference

    monkeypatch.setattr(reference, "hub_reachable", lambda timeout=5.0: True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not reference.hub_available()
    with pytest.raises(LongctxError, match="cannot reach the Hugging Face hub"):
        resolve_model("some-org/some-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert reference.hub_available()
    monkeypatch.setattr(reference, "hub_reachable", lambda timeout=5.0: False)
    assert not reference.hub_available()


@pytest.mark.slow
def test_default_model_resolves_offline_from_package(default_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(default_model_dir)
    assert config.model_type == "llama"
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.num_hidden_layers == 30
    assert config.max_position_embeddings == 8192
    assert config.rope_parameters["rope_theta"] == 100000.0
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    assert tokenizer.chat_template
    assert tokenizer.model_max_length == 8192
    assert resolve_model("smollm2-135m") == default_model_dir
    assert not any(p.name.startswith(".") for p in default_model_dir.parent.iterdir())


def test_tensor_reader_reads_row_blocks_and_refuses_truncated_files(tmp_path):
    model_dir = make_tiny_llama(tmp_path / "m")
    reader = TensorReader(model_dir)
    full = reader.get("model.embed_tokens.weight")
    assert torch.equal(reader.get("model.embed_tokens.weight", rows=slice(10, 20)), full[10:20])
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(LongctxError, match="corrupt or truncated"):
        TensorReader(model_dir)
