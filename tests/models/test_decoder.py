"""The engine's decoder (slipstream.models.decoder) against Hugging Face transformers, in float32.

Tiny random Llama / Qwen2 / Qwen3 models (each with its own RoPE variant) and the real
SmolLM2-135M-Instruct: packed prefill of several sequences over a paged cache with shuffled
block tables, decode steps, chunked prefill, captured hidden states, weight pushes by HF name.
"""

from __future__ import annotations

import random

import pytest
import torch

from slipstream.models.decoder import (
    AttentionMetadata,
    Decoder,
    DecoderConfig,
    UnknownWeightError,
    UnsupportedModelError,
    rope_inv_freq,
)
from slipstream.models.weights import decoder_from_hf_module, load_decoder

BLOCK_SIZE = 4
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that attention and logits are far from uniform (HF's init is near-flat)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.3 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            elif name == "lm_head.weight":
                p.copy_(noise * 4 / p.shape[-1] ** 0.5)
            else:
                p.copy_(noise * 1.5 / p.shape[-1] ** 0.5)


def _tiny_hf(family: str, seed: int = 0):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(seed)
    if family == "llama":  # llama3 RoPE; the wavelengths straddle both thresholds at head_dim 16
        rope = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=64)
        model = LlamaForCausalLM(LlamaConfig(**TINY, rope_parameters=rope, tie_word_embeddings=False))
    elif family == "qwen2":  # q/k/v bias, YaRN (attention factor != 1), tied embeddings
        rope = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64)
        model = Qwen2ForCausalLM(Qwen2Config(**TINY, rope_parameters=rope, tie_word_embeddings=True))
    elif family == "qwen3":  # q/k norm, head_dim 32 != 64 / 4
        rope = dict(rope_type="default", rope_theta=1000.0)
        model = Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=32, rope_parameters=rope, tie_word_embeddings=False))
    else:
        raise ValueError(family)
    _randomize(model, seed)
    return model.eval()


class PagedRun:
    """Drives a decoder step by step: blocks taken from a shuffled pool, metadata for packed steps."""

    def __init__(self, decoder: Decoder, num_blocks: int = 64, seed: int = 0):
        self.decoder = decoder
        self.kv = decoder.allocate_kv_cache(num_blocks, BLOCK_SIZE, torch.float32, "cpu")
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def step(self, chunks: dict[int, list[int]], capture_layers=()):
        """Feed chunks[seq] (new tokens of each sequence) in one packed call; per-sequence outputs."""
        ids, positions, q_lens, seq_lens, tables = [], [], [], [], []
        for seq, tokens in chunks.items():
            start = self.lens.get(seq, 0)
            end = start + len(tokens)
            table = self.tables.setdefault(seq, [])
            while len(table) * BLOCK_SIZE < end:
                table.append(self.free.pop())
            self.lens[seq] = end
            ids += tokens
            positions += range(start, end)
            q_lens.append(len(tokens))
            seq_lens.append(end)
            tables.append(table)
        attn = AttentionMetadata.build(q_lens, seq_lens, tables, BLOCK_SIZE)
        out = self.decoder(torch.tensor(ids), torch.tensor(positions), attn, self.kv, capture_layers=capture_layers)
        hidden, captured = out if capture_layers else (out, {})
        bounds = attn.cu_seqlens_q.tolist()
        split = lambda t: {seq: t[bounds[i] : bounds[i + 1]] for i, seq in enumerate(chunks)}  # noqa: E731
        return split(hidden), {k: split(v) for k, v in captured.items()}

    def logprobs(self, chunks: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        hidden, _ = self.step(chunks)
        return {seq: self.decoder.compute_logits(h).log_softmax(-1) for seq, h in hidden.items()}


@torch.no_grad()
def _hf_logprobs(model, tokens: list[int]) -> torch.Tensor:
    return model(torch.tensor([tokens])).logits[0].float().log_softmax(-1)


# ----------------------------------------------------------------------------------------------
# Config and RoPE


ROPE_CASES = {
    "default": dict(rope_type="default", rope_theta=10000.0),
    "linear": dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    "dynamic": dict(rope_type="dynamic", rope_theta=500000.0, factor=2.0),
    "llama3": dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192),
    "yarn": dict(rope_type="yarn", rope_theta=1000000.0, factor=4.0, original_max_position_embeddings=32768),
    "yarn-mscale": dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, mscale=1.0, mscale_all_dim=0.707,
                        beta_fast=16, beta_slow=2, original_max_position_embeddings=4096, truncate=False),
    "yarn-attention-factor": dict(rope_type="yarn", rope_theta=10000.0, factor=2.0, attention_factor=1.3,
                                  original_max_position_embeddings=1024),
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rope_inv_freq_matches_transformers(case):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = dict(ROPE_CASES[case])
    hf = LlamaConfig(hidden_size=1024, num_attention_heads=8, max_position_embeddings=131072,
                     rope_parameters=dict(params))
    if params["rope_type"] == "default":
        want, want_scale = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        want, want_scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf)
    cfg = DecoderConfig.from_hf(hf)
    assert cfg.rope_type == params["rope_type"] and cfg.rope_theta == params["rope_theta"]
    got, scale = rope_inv_freq(cfg)
    assert got.dtype == torch.float32 and got.shape == (64,)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(want_scale, rel=1e-7)
    plain = 1.0 / (params["rope_theta"] ** (torch.arange(0, 128, 2).float() / 128))
    assert torch.equal(got, plain) == (params["rope_type"] in ("default", "dynamic"))  # the scaling took effect


def test_config_from_old_style_dict_with_rope_scaling():
    raw = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32, hidden_size=64,
               intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
               max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=50000.0,
               rope_scaling={"type": "linear", "factor": 2.0})
    cfg = DecoderConfig.from_hf(raw)
    assert (cfg.rope_type, cfg.rope_theta, cfg.rope_scaling) == ("linear", 50000.0, {"factor": 2.0})
    inv, _ = rope_inv_freq(cfg)
    torch.testing.assert_close(inv, 1.0 / (50000.0 ** (torch.arange(0, 16, 2).float() / 16)) / 2.0)


def test_config_fields_per_family():
    llama = DecoderConfig.from_hf(_tiny_hf("llama").config)
    qwen2 = DecoderConfig.from_hf(_tiny_hf("qwen2").config)
    qwen3 = DecoderConfig.from_hf(_tiny_hf("qwen3").config)
    assert (llama.head_dim, llama.num_kv_heads, llama.attention_bias, llama.qk_norm) == (16, 2, False, False)
    assert llama.rope_type == "llama3" and llama.rope_scaling["original_max_position_embeddings"] == 64
    assert (qwen2.attention_bias, qwen2.o_proj_bias, qwen2.tie_word_embeddings, qwen2.rope_type) == (
        True, False, True, "yarn")
    assert (qwen3.head_dim, qwen3.qk_norm, qwen3.attention_bias, qwen3.rope_theta) == (32, True, False, 1000.0)


def test_unsupported_models_raise_naming_the_supported_ones():
    from transformers import GPT2Config, MistralConfig

    for hf in (GPT2Config(), MistralConfig()):
        with pytest.raises(UnsupportedModelError) as info:
            DecoderConfig.from_hf(hf)
        assert all(t in str(info.value) for t in ("llama", "qwen2", "qwen3"))
    llama = _tiny_hf("llama").config.to_dict()
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration.*llama"):
        DecoderConfig.from_hf({**llama, "architectures": ["LlavaForConditionalGeneration"]})
    qwen2 = _tiny_hf("qwen2").config.to_dict()
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        DecoderConfig.from_hf({**qwen2, "use_sliding_window": True, "layer_types": ["sliding_attention"] * 3})
    with pytest.raises(UnsupportedModelError, match="longrope"):
        DecoderConfig.from_hf({**llama, "rope_parameters": {
            "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0], "long_factor": [1.0]}})


# ----------------------------------------------------------------------------------------------
# Tiny random models


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_packed_prefill_and_decode_match_hf(family, kernels, monkeypatch):
    """`triton`: the GPU path's kernels (in Triton's interpreter): fused norm + projection prologues
    in the 3-row decode steps, the paged attention kernels, the fused RoPE + K/V store."""
    if kernels == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    hf = _tiny_hf(family)
    decoder = decoder_from_hf_module(hf)
    run = PagedRun(decoder, seed=1)
    gen = torch.Generator().manual_seed(2)
    prompt_lens, decode_steps = [5, 13, 8], 6
    tokens = {s: torch.randint(0, 128, (n + decode_steps,), generator=gen).tolist() for s, n in enumerate(prompt_lens)}

    got = {s: [lp] for s, lp in run.logprobs({s: tokens[s][:n] for s, n in enumerate(prompt_lens)}).items()}
    for step in range(decode_steps):
        for s, lp in run.logprobs({s: [tokens[s][n + step]] for s, n in enumerate(prompt_lens)}).items():
            got[s].append(lp)

    assert sorted(len(t) for t in run.tables.values()) == [3, 4, 5]  # 11, 14 and 19 tokens in blocks of 4
    assert any(t != sorted(t) for t in run.tables.values())  # the block tables really are shuffled
    for s in tokens:
        mine = torch.cat(got[s])
        want = _hf_logprobs(hf, tokens[s])
        assert mine.shape == want.shape == (len(tokens[s]), 128)
        assert (mine - want).abs().max().item() <= 1e-4, (family, s)
        assert want.exp().max() > 0.5  # the distributions are far from flat: the comparison means something


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_chunked_prefill_equals_one_shot(family):
    decoder = decoder_from_hf_module(_tiny_hf(family))
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 128, (23,), generator=gen).tolist()
    other = torch.randint(0, 128, (9,), generator=gen).tolist()

    one_shot = PagedRun(decoder, seed=4).step({0: prompt})[0][0]

    # the prompt in three chunks, while another sequence is being prefilled and decoded in the same steps
    run = PagedRun(decoder, seed=5)
    parts = [run.step({0: prompt[:7], 1: other[:6]})[0][0]]
    parts.append(run.step({1: other[6:7], 0: prompt[7:16]})[0][0])
    parts.append(run.step({1: other[7:8], 0: prompt[16:]})[0][0])
    torch.testing.assert_close(torch.cat(parts), one_shot, rtol=1e-5, atol=1e-5)


def test_capture_layers_match_hf_residual_stream():
    hf = _tiny_hf("qwen3")
    decoder = decoder_from_hf_module(hf)
    n = decoder.config.num_layers
    tokens = [list(range(3, 14)), list(range(40, 47))]

    residual = []  # HF: the output of each decoder layer (its last entry is the final-normed one in hidden_states)
    hooks = [layer.register_forward_hook(lambda m, i, o: residual.append(o[0] if isinstance(o, tuple) else o))
             for layer in hf.model.layers]
    with torch.no_grad():
        hf_outs = []
        for seq in tokens:
            residual.clear()
            out = hf(torch.tensor([seq]), output_hidden_states=True)
            hf_outs.append(([r[0] for r in residual], out.hidden_states))
    for h in hooks:
        h.remove()

    hidden, captured = PagedRun(decoder).step({0: tokens[0], 1: tokens[1]}, capture_layers=(0, 1, -1, n))
    assert set(captured) == {0, 1, -1, n}
    for s, (layer_out, hidden_states) in enumerate(hf_outs):
        for i in (0, 1):
            torch.testing.assert_close(captured[i][s], layer_out[i], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(captured[i][s], hidden_states[i + 1][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(captured[-1][s], layer_out[n - 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(captured[n][s], captured[-1][s], rtol=0, atol=0)
        torch.testing.assert_close(hidden[s], hf.model.norm(layer_out[n - 1]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="capture layer"):
        PagedRun(decoder).step({0: tokens[0]}, capture_layers=(n + 1,))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_load_weights_pushes_hf_names_in_place(family):
    hf = _tiny_hf(family)
    decoder = decoder_from_hf_module(hf)
    storage = {name: p.data_ptr() for name, p in decoder.named_parameters()}
    tokens = list(range(5, 25))

    perturbed = _tiny_hf(family, seed=0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(7)
        for p in perturbed.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen) * p.abs().mean())
    assert (_hf_logprobs(perturbed, tokens) - _hf_logprobs(hf, tokens)).abs().max() > 1e-2

    state = perturbed.state_dict()
    loaded = decoder.load_weights((name, t.clone()) for name, t in state.items())
    assert loaded == set(state)
    assert {name: p.data_ptr() for name, p in decoder.named_parameters()} == storage  # copied in place
    mine = PagedRun(decoder).logprobs({0: tokens})[0]
    assert (mine - _hf_logprobs(perturbed, tokens)).abs().max().item() <= 1e-4

    with pytest.raises(UnknownWeightError, match="model.layers.0.self_attn.rotary_proj.weight"):
        decoder.load_weights([("model.layers.0.self_attn.rotary_proj.weight", torch.zeros(1))])
    with pytest.raises(UnknownWeightError, match="model.layers.9.mlp.up_proj.weight"):
        decoder.load_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        decoder.load_weights([("model.norm.weight", torch.zeros(3))])


def test_load_decoder_from_sharded_checkpoint(tmp_path):
    hf = _tiny_hf("qwen2")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    decoder, cfg = load_decoder(tmp_path, dtype=torch.float32, device="cpu")
    assert cfg.model_type == "qwen2" and cfg.attention_bias
    tokens = list(range(30, 60))
    mine = PagedRun(decoder).logprobs({0: tokens})[0]
    assert (mine - _hf_logprobs(hf, tokens)).abs().max().item() <= 1e-4


def test_dtype_and_rope_frequencies():
    decoder = decoder_from_hf_module(_tiny_hf("llama"), dtype=torch.bfloat16)
    assert decoder.embed.weight.dtype == torch.bfloat16 and decoder.inv_freq.dtype == torch.float32
    assert decoder.to(torch.float16).inv_freq.dtype == torch.float32
    kv = decoder.allocate_kv_cache(5, BLOCK_SIZE)
    assert len(kv) == 3 and kv[0][0].shape == (5, BLOCK_SIZE, 2, 16) and kv[0][1].dtype == torch.float16
    hidden = decoder(torch.tensor([1, 2, 3]), torch.arange(3), AttentionMetadata.build([3], [3], [[4]], BLOCK_SIZE), kv)
    assert hidden.dtype == torch.float16 and decoder.compute_logits(hidden).dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct


PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based inks and a wooden press adapted from wine making. Within a few decades "
    "printing shops had spread across Europe, books became cheaper, and literacy slowly rose. Scholars argue "
    "about how much the press changed religion, science and politics, but few doubt that",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for _ in range(n):\n"
    "        a, b = b, a + b\n    return a\n\n\ndef is_prime(n):\n    if n < 2:\n        return False\n"
    "    for d in range(2, int(n ** 0.5) + 1):\n        if n % d == 0:\n",
    "Question: A train leaves the station at 9:00 and travels at 60 km/h. A second train leaves the same "
    "station at 10:00 on the same track and travels at 90 km/h. At what time does the second train catch "
    "up with the first one? Answer: Let us reason step by step. By 10:00 the first train has covered",
]

CHATS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain why the sky is blue to a ten year old.",
    "List three tips for learning a new programming language, with one sentence each.",
]


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slipstream.models.loading import resolve_model

    torch.manual_seed(0)
    path = resolve_model("smollm2-135m-instruct")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    decoder, cfg = load_decoder(path, dtype=torch.float32, device="cpu")
    return hf, tokenizer, decoder, cfg


def test_smollm2_config(smollm2):
    _, _, decoder, cfg = smollm2
    assert (cfg.model_type, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("llama", 30, 9, 3, 64)
    assert cfg.tie_word_embeddings and decoder.lm_head is None and cfg.rope_theta == 100000.0


def test_smollm2_logits_match_hf(smollm2):
    hf, tokenizer, decoder, _ = smollm2
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert sum(map(len, prompts)) >= 200
    with torch.no_grad():
        got = PagedRun(decoder, num_blocks=128).logprobs(dict(enumerate(prompts)))
        for s, tokens in enumerate(prompts):
            assert (got[s] - _hf_logprobs(hf, tokens)).abs().max().item() <= 1e-3


def test_smollm2_greedy_generation_matches_hf_generate(smollm2):
    hf, tokenizer, decoder, _ = smollm2
    new_tokens, eos = 64, tokenizer.eos_token_id
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for c in CHATS]

    run = PagedRun(decoder, num_blocks=128)
    outputs = {s: [] for s in range(len(prompts))}
    pending = dict(enumerate(prompts))
    with torch.no_grad():
        while pending:
            hidden, _ = run.step(pending)
            last = torch.stack([h[-1] for h in hidden.values()])  # one lm_head matmul for the batch
            pending = {}
            for s, token in zip(hidden, decoder.compute_logits(last).argmax(-1).tolist()):
                outputs[s].append(token)
                if token != eos and len(outputs[s]) < new_tokens:
                    pending[s] = [token]

    with torch.no_grad():
        for s, tokens in enumerate(prompts):
            ids = torch.tensor([tokens])
            want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               do_sample=False, eos_token_id=eos, pad_token_id=eos)[0, len(tokens):].tolist()
            assert outputs[s] == want, (s, tokenizer.decode(outputs[s]), tokenizer.decode(want))
    assert max(map(len, outputs.values())) == new_tokens
