"""A tiny randomly initialised Llama with a byte-level tokenizer, built without any download.

It is written with `save_pretrained`, so it loads like any model directory. The tokenizer maps
each UTF-8 byte to one token (ids 3..258 are bytes 0..255), so any text round-trips exactly, and
it speaks the same chat format as SmolLM2:

    <|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n
"""

from __future__ import annotations

import json
from pathlib import Path

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]  # ids 0, 1, 2
BYTE_OFFSET = len(SPECIAL_TOKENS)
VOCAB_SIZE = BYTE_OFFSET + 256

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_symbols() -> list[str]:
    """One printable character per byte value, as byte-level BPE spells bytes.

    Printable Latin-1 bytes stand for themselves; the others (control characters, space, ...)
    are moved to code points from 256 upwards, in byte order.
    """
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in keep:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def build_tiny_tokenizer():
    """A `PreTrainedTokenizerFast`: byte-level, no merges, the three special tokens, a chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for byte, symbol in enumerate(_byte_symbols()):
        vocab[symbol] = BYTE_OFFSET + byte
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def tiny_config(hidden_size: int = 64, layers: int = 2):
    from transformers import LlamaConfig

    heads, kv_heads = 4, 2
    if hidden_size <= 0 or hidden_size % (2 * heads):
        raise ValueError(f"tiny model hidden_size={hidden_size} must be a positive multiple of {2 * heads}")
    if layers <= 0:
        raise ValueError(f"tiny model layers={layers} must be > 0")
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def build_tiny_model_dir(path, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Write a tiny random `LlamaForCausalLM` and its tokenizer to `path`; same seed, same weights.

    The caller's global RNG state is left as it was.
    """
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(hidden_size, layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model.save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    (path / "tiny_model.json").write_text(
        json.dumps({"hidden_size": hidden_size, "layers": layers, "seed": seed}, indent=2) + "\n"
    )
    return path
