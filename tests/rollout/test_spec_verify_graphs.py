"""The static input layout of verification graphs: real rows as the eager step packs them,
padding confined to the scratch block."""

import torch

from slipstream.models.decoder import AttentionMetadata, Decoder, DecoderConfig
from slipstream.rollout.block_manager import BlockManager
from slipstream.rollout.scheduler import Scheduler
from slipstream.rollout.sequence import Sequence
from slipstream.rollout.spec.verify_graphs import VerifyGraphs
from slipstream.rollout.types import SamplingParams


def _decoder() -> Decoder:
    cfg = DecoderConfig(model_type="llama", vocab_size=16, hidden_size=16, num_layers=1, num_heads=2,
                        num_kv_heads=1, head_dim=8, intermediate_size=32)
    dec = Decoder(cfg, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        for p in dec.parameters():
            p.normal_(0, 0.3)
    return dec


def test_real_rows_match_the_packed_step_and_padding_writes_only_the_scratch_block():
    bs, num_blocks = 4, 32
    bm = BlockManager(num_blocks, bs)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=256, eos_token_ids=[])
    seqs = [Sequence([1, 2, 3, 4, 5, 6, 7][:n], SamplingParams(max_tokens=50)) for n in (7, 3, 5)]
    sched.add(seqs)
    sched.postprocess(sched.schedule(), [9, 9, 9], [0.0] * 3)
    batch = sched.schedule({seqs[0].seq_id: [1, 2, 3, 4, 5], seqs[1].seq_id: [6]})  # drafts of 5, 1 and none
    assert [len(e.draft) for e in batch.entries] == [5, 1, 0]
    dec = _decoder()
    graphs = VerifyGraphs(dec, dec.allocate_kv_cache(num_blocks + 1, bs), bs, max_model_len=64,
                          scratch_block=num_blocks, max_batch=8, capture=False)
    B, Q = graphs.shape_for(len(batch.entries), 5)
    assert (B, Q) == (4, 8)  # 3 sequences in the bucket of 4; 6 query rows in the width of 8
    graphs._fill(batch.entries, B, Q)
    h, R, W = graphs.host_np, B * Q, graphs.width
    ids, pos, slots = (h[i * R:(i + 1) * R].reshape(B, Q) for i in range(3))
    lens, tables = h[3 * R:3 * R + B], h[3 * R + B:3 * R + B + B * W].reshape(B, W)
    packed = batch.build_inputs()
    cu = packed.cu_seqlens_q.tolist()
    scratch = set(range(num_blocks * bs, (num_blocks + 1) * bs))
    for i, e in enumerate(batch.entries):
        n = e.num_new
        assert ids[i, :n].tolist() == packed.input_ids[cu[i]:cu[i + 1]].tolist()
        assert pos[i].tolist() == list(range(e.start, e.start + Q))
        assert slots[i, :n].tolist() == packed.slot_mapping[cu[i]:cu[i + 1]].tolist()
        assert set(slots[i, n:].tolist()) <= scratch  # padding rows never write a real block
        assert lens[i] == e.start + Q
        table = e.seq.block_table
        assert tables[i, :len(table)].tolist() == table and set(tables[i, len(table):].tolist()) == {num_blocks}
    assert set(slots[3].tolist()) <= scratch and lens[3] == Q and set(tables[3].tolist()) == {num_blocks}
    # The padded forward's real rows give the packed eager step's logits (both from the same cache).
    eager_caches = [(k.clone(), v.clone()) for k, v in graphs.kv_caches]
    logits = graphs.replay(batch.entries, B, Q)
    attn = AttentionMetadata(packed.cu_seqlens_q, packed.seq_lens, packed.block_tables, packed.slot_mapping,
                             packed.max_q_len)
    eager = dec.compute_logits(dec(packed.input_ids, packed.positions, attn, eager_caches))
    for i, e in enumerate(batch.entries):
        torch.testing.assert_close(logits[i, :e.num_new], eager[cu[i]:cu[i + 1]], atol=1e-5, rtol=1e-4)
    for (k, v), (ek, ev) in zip(graphs.kv_caches, eager_caches):  # the same K/V in every real block
        torch.testing.assert_close(k[:num_blocks], ek[:num_blocks])
        torch.testing.assert_close(v[:num_blocks], ev[:num_blocks])
    assert graphs.shape_for(9, 3) is None and graphs.shape_for(2, 16) is None  # too many sequences or drafts
