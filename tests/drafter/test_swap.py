"""Hot swap: every draft uses one version of the weights, all of it, and says which."""

import threading
import time

import torch

from slipstream.drafter import DraftContext, Drafter, DrafterConfig, DrafterSlot, TargetHead
from tests.drafter.random_target import random_target

V, H, K = 32, 32, 6


def _drafter() -> Drafter:
    c, target = random_target(V, H, heads=4, kv_heads=4, intermediate=64)
    torch.manual_seed(0)
    return Drafter(c, TargetHead.from_decoder(target), DrafterConfig(window=16))


def _weights(drafter: Drafter, version: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + version)
    return {k: torch.randn(v.shape, generator=g) * 0.3 + (1.0 if k.endswith("norm.weight") else 0.0)
            for k, v in drafter.state_dict().items()}


def _context() -> DraftContext:
    g = torch.Generator().manual_seed(5)
    return DraftContext.from_sequences([(torch.randn(12, H, generator=g), torch.randint(V, (13,), generator=g), 0)
                                        for _ in range(8)], window=16)


def test_drafts_never_mix_versions_while_weights_are_published_concurrently():
    drafter = _drafter()
    slot = DrafterSlot(drafter)
    versions = {0: drafter.state_dict()}
    ctx, temperature = _context(), torch.ones(8)
    stop = threading.Event()

    def publisher():
        v = 0
        while not stop.is_set():
            v += 1
            versions[v] = _weights(drafter, v)
            assert slot.publish(versions[v]) == v

    thread = threading.Thread(target=publisher)
    thread.start()
    drafts = []
    try:
        for i in range(60):
            drafts.append((i, slot.draft(ctx, K, temperature, generator=torch.Generator().manual_seed(i))))
    finally:
        stop.set()
        thread.join()
    seen = {d.version for _, d in drafts}
    assert len(seen) >= 3, f"the publisher did not interleave with drafting (versions {seen})"
    reference = drafter.replica()
    for i, d in drafts:
        reference.load_state_dict(versions[d.version])
        again = reference.draft(ctx, K, temperature, generator=torch.Generator().manual_seed(i))
        assert torch.equal(d.tokens, again.tokens), d.version
        assert torch.allclose(d.probs, again.probs, atol=1e-6, rtol=0), d.version


def test_publish_waits_while_a_draft_holds_the_copy_it_would_overwrite():
    drafter = _drafter()
    slot = DrafterSlot(drafter)
    assert slot.publish(_weights(drafter, 1)) == 1
    held = slot._acquire()  # a draft in flight on version 1's copy
    slot.publish(_weights(drafter, 2))  # writes the other copy: does not wait
    done = threading.Event()
    thread = threading.Thread(target=lambda: (slot.publish(_weights(drafter, 3)), done.set()))
    thread.start()
    time.sleep(0.3)
    assert not done.is_set()  # version 3 would overwrite the held copy
    assert slot.version == 2
    slot._release(held)
    assert done.wait(5.0)
    thread.join()
    assert slot.version == 3
    for k, v in slot.state_dict().items():
        assert torch.equal(v, _weights(drafter, 3)[k])
