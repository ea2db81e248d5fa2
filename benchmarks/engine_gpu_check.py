"""GPU correctness check of the engine's fast path: fused ops, fused sampler, CUDA-graph decode, HF parity.

    python benchmarks/engine_gpu_check.py [--smollm2 HF_DIR]

1. fused ops (Triton) vs their torch paths in bf16 on the GPU;
2. the fused sampling kernel: chi-square of 200k draws against softmax(logits / T), log-probs;
3. the engine with CUDA graphs vs the engine without, in float32: greedy tokens identical and
   log-probs within 1e-4, several batch sizes (padded buckets);
4. with real SmolLM2-135M-Instruct weights (when given): HF `generate` greedy tokens vs the engine
   with CUDA graphs in float32 for 64 tokens, and the max |delta logprob| of the engine's tokens under HF.
Prints one line per check and exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import sys

import torch

FAILED = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def fused_ops(device) -> None:
    from slipstream.kernels import decode_linear as DL
    from slipstream.kernels import fused_ops as F

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(37, 896, device=device, generator=g).bfloat16()
    r = torch.randn(37, 896, device=device, generator=g).bfloat16()
    w = (1 + 0.1 * torch.randn(896, device=device, generator=g)).bfloat16()
    (a, ra), (b, rb) = F.rms_norm(x, w, 1e-6, r), F.rms_norm_torch(x, w, 1e-6, r)
    check("rms_norm bf16", torch.equal(ra, rb) and (a.float() - b.float()).abs().max().item() <= 1e-2,
          f"max diff {(a.float() - b.float()).abs().max().item():.2e}")
    H, KV, D = 14, 2, 64
    qkv = torch.randn(37, (H + 2 * KV) * D, device=device, generator=g).bfloat16()
    pos = torch.randint(0, 4000, (37,), device=device, generator=g)
    inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, device=device).float() / D))
    emb = torch.cat([pos[:, None].float() * inv] * 2, -1)
    cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
    slots = torch.randperm(64 * 16, device=device, generator=g)[:37]
    caches = [torch.zeros(64, 16, KV, D, device=device, dtype=torch.bfloat16) for _ in range(4)]
    q1 = F.rope_store_kv(qkv.clone(), cos, sin, H, KV, caches[0], caches[1], slots)
    q2 = F.rope_store_kv_torch(qkv.clone(), cos, sin, H, KV, caches[2], caches[3], slots)
    # x*cos - y*sin cancels: one bf16 rounding of a product (the compiler may keep it in float32)
    # shows as up to ~1 ulp of the inputs' scale, so the bound is relative to the inputs.
    diff = max((a.float() - b.float()).abs().max().item() for a, b in ((q1, q2), (caches[0], caches[2])))
    scale = qkv.float().abs().max().item()
    check("rope_store_kv bf16", diff <= 2**-7 * scale and torch.equal(caches[1], caches[3]),
          f"max diff {diff:.2e} (inputs up to {scale:.1f})")
    gu = torch.randn(37, 2 * 4864, device=device, generator=g).bfloat16()
    diff = (F.silu_mul(gu).float() - F.silu_mul_torch(gu).float()).abs().max().item()
    check("silu_mul bf16", diff <= 1.6e-2, f"max diff {diff:.2e}")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    for M, N, K in ((1, 1152, 896), (1, 896, 4864), (3, 3584, 3584), (7, 9728, 896), (16, 896, 4864)):
        xs = torch.randn(M, K, device=device, generator=g).bfloat16()
        ws = (torch.randn(N, K, device=device, generator=g) / K**0.5).bfloat16()
        bs = torch.randn(N, device=device, generator=g).bfloat16()
        ref = torch.nn.functional.linear(xs.float(), ws.float(), bs.float())
        base = (torch.nn.functional.linear(xs, ws, bs).float() - ref).abs().max().item()
        for way in DL.linear_candidates(M, N, K, sms)[1:]:  # the Triton kernels, each forced
            diff = (DL.linear(xs, ws, bs, way=way).float() - ref).abs().max().item()
            check(f"small-M linear {way[0]}/{way[1]} bf16 {M}x{N}x{K}", diff <= 2 * base + 1e-3,
                  f"max err {diff:.2e} (cuBLAS {base:.2e})")
    for M, N, K, swiglu in ((1, 1152, 896, False), (4, 2 * 4864, 896, True), (2, 2 * 18944, 3584, True)):
        xs, rs = (torch.randn(M, K, device=device, generator=g).bfloat16() for _ in range(2))
        nw = (1 + 0.1 * torch.randn(K, device=device, generator=g)).bfloat16()
        ws = (torch.randn(N, K, device=device, generator=g) / K**0.5).bfloat16()
        h, ref_res = F.rms_norm_torch(xs, nw, 1e-6, rs)
        ref = torch.nn.functional.linear(h.float(), ws.float())
        if swiglu:  # the separate kernels' rounding: the projection in bf16, then SiLU(gate) * up
            ref = F.silu_mul_torch(torch.nn.functional.linear(h, ws)).float()
        sep, _ = DL.norm_linear(xs, nw, 1e-6, ws, None, rs, swiglu, way=("separate", 0))
        base = (sep.float() - ref).abs().max().item()
        for bn in (4, 16):
            y, res = DL.norm_linear(xs, nw, 1e-6, ws, None, rs, swiglu, way=("fused", bn))
            diff = (y.float() - ref).abs().max().item()
            check(f"norm_linear fused/{bn}{' swiglu' if swiglu else ''} bf16 {M}x{N}x{K}",
                  diff <= 2 * base + 2e-2 and torch.equal(res, ref_res),
                  f"max err {diff:.2e} (separate kernels {base:.2e}), residual exact: {torch.equal(res, ref_res)}")
    # the q/k/v projection with RoPE and the K/V store in its epilogue vs norm_linear then rope_store_kv
    for M, (H, KV, D, K) in ((1, (14, 2, 64, 896)), (4, (12, 2, 128, 1536)), (2, (28, 4, 128, 3584))):
        xs, rs = (torch.randn(M, K, device=device, generator=g).bfloat16() for _ in range(2))
        nw = (1 + 0.1 * torch.randn(K, device=device, generator=g)).bfloat16()
        ws = (torch.randn((H + 2 * KV) * D, K, device=device, generator=g) / K**0.5).bfloat16()
        bs = torch.randn((H + 2 * KV) * D, device=device, generator=g).bfloat16()
        inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, device=device).float() / D))
        cs = F.rope_cos_sin(torch.randint(0, 30000, (M,), device=device, generator=g), inv, 1.0, torch.bfloat16)
        slots = torch.randperm(64 * 16, device=device, generator=g)[:M]
        caches = [torch.zeros(64, 16, KV, D, device=device, dtype=torch.bfloat16) for _ in range(4)]
        q_sep, r_sep = DL.norm_qkv_rope(xs, nw, 1e-6, ws, bs, rs, *cs, H, KV, caches[0], caches[1], slots,
                                        way=("separate", 0))
        for pairs in (2, 8):
            kc, vc = torch.zeros_like(caches[2]), torch.zeros_like(caches[3])
            q, r = DL.norm_qkv_rope(xs, nw, 1e-6, ws, bs, rs, *cs, H, KV, kc, vc, slots, way=("fused", pairs))
            # the separate path rounds the projection to bf16 before RoPE as the fused one does; the
            # fp32 sums differ in order, so a value may round to the neighbouring bf16
            diff = max((a.float() - b.float()).abs().max().item() for a, b in ((q, q_sep), (kc, caches[0]),
                                                                               (vc, caches[1])))
            scale = q_sep.float().abs().max().item()
            check(f"norm_qkv_rope fused/{pairs} bf16 {M}x{(H + 2 * KV) * D}x{K}",
                  diff <= 2**-6 * scale and torch.equal(r, r_sep), f"max diff {diff:.2e} (outputs up to {scale:.1f})")


def sampler(device) -> None:
    from slipstream.kernels.sampling import fused_sample

    logits = torch.randn(50, device=device) * 2
    N, T = 200_000, 0.8
    tokens, lp = fused_sample(logits.expand(N, -1).contiguous(), torch.full((N,), T, device=device), seed=11)
    target = (logits / T).softmax(-1).double()
    counts = torch.bincount(tokens, minlength=50).double()
    keep = target * N > 5
    stat = ((counts[keep] - target[keep] * N) ** 2 / (target[keep] * N)).sum()
    dof = torch.tensor((keep.sum().item() - 1) / 2.0, dtype=torch.float64)
    p = torch.special.gammaincc(dof, stat.cpu() / 2).item()
    lp_err = (lp.double() - target[tokens].log()).abs().max().item()
    check("fused sampler chi-square", p > 1e-4 and lp_err < 1e-4, f"p={p:.3g} logprob err {lp_err:.1e}")


def tiny_decoder(device, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from slipstream.models.weights import decoder_from_hf_module

    cfg = Qwen2Config(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                      intermediate_size=512, vocab_size=1000, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    return decoder_from_hf_module(model, dtype=dtype, device=device)


def graphs_vs_eager(device) -> None:
    from slipstream.rollout.engine import Engine, EngineConfig
    from slipstream.rollout.types import Request, SamplingParams

    decoder = tiny_decoder(device, torch.float32)
    for batch in (1, 3, 13, 64):
        g = torch.Generator().manual_seed(batch)
        prompts = [torch.randint(3, 1000, (int(torch.randint(5, 200, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(batch)]
        out = {}
        for graphs in (True, False):
            cfg = EngineConfig(block_size=16, num_blocks=2048, max_num_seqs=64, max_model_len=512, cuda_graphs=graphs)
            engine = Engine(decoder, [], cfg)
            reqs = [Request(p, SamplingParams(temperature=0.0, max_tokens=40), str(i), str(i))
                    for i, p in enumerate(prompts)]
            out[graphs] = engine.generate(reqs)
            if graphs:
                check(f"graphs captured b={batch}", bool(engine.runner.graphs.graphs))
        same = all(a.tokens == b.tokens for a, b in zip(out[True], out[False]))
        err = max(abs(x - y) for a, b in zip(out[True], out[False]) for x, y in zip(a.logprobs, b.logprobs))
        check(f"graphs == eager b={batch}", same and err < 1e-4, f"max logprob diff {err:.1e}")


def hf_parity(path: str, device) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slipstream.models.weights import decoder_from_hf_module
    from slipstream.rollout.engine import Engine, EngineConfig
    from slipstream.rollout.types import Request, SamplingParams

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    engine = Engine(decoder_from_hf_module(model, dtype=torch.float32, device=device), [],
                    EngineConfig(block_size=16, num_blocks=1024, max_model_len=512))
    prompts = ["What is 17 + 25?", "Write a haiku about the sea.", "List three prime numbers:",
               "The capital of France is"]
    ids = [tok(p)["input_ids"] for p in prompts]
    outs = engine.generate([Request(x, SamplingParams(temperature=0.0, max_tokens=64), str(i), str(i))
                            for i, x in enumerate(ids)])
    for i, (x, c) in enumerate(zip(ids, outs)):
        hf = model.generate(torch.tensor([x], device=device), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(x):].tolist()
        with torch.no_grad():
            logits = model(torch.tensor([x + c.tokens], device=device)).logits[0, len(x) - 1:-1].float()
        ref = logits.log_softmax(-1).gather(-1, torch.tensor(c.tokens, device=device)[:, None]).squeeze(-1)
        err = (ref.cpu() - torch.tensor(c.logprobs)).abs().max().item()
        check(f"SmolLM2 greedy == HF, prompt {i}", hf == c.tokens and err <= 1e-3, f"max |dlogprob| {err:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2", help="HF directory of SmolLM2-135M-Instruct")
    args = ap.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    fused_ops(device)
    sampler(device)
    graphs_vs_eager(device)
    if args.smollm2:
        hf_parity(args.smollm2, device)
    print(f"{len(FAILED)} failed" + (f": {FAILED}" if FAILED else ""))
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
