"""The step's metrics over ranks, with a stand-in for a second rank's collectives."""

from types import SimpleNamespace

import torch

from slipstream.trainer.distributed import global_metrics


class TwoRanks:
    """This rank's collectives, as if a second rank contributed `other` (by collective and call)."""

    world_size = 2

    def __init__(self, gathered: torch.Tensor, summed: list[torch.Tensor], maxed: list[torch.Tensor]):
        self.gathered, self.summed, self.maxed = gathered, summed, maxed

    def all_gather(self, t):
        return [t, self.gathered]

    def all_reduce_sum(self, t):
        return t + self.summed.pop(0)

    def all_reduce_max(self, t):
        return torch.maximum(t, self.maxed.pop(0))


def test_throughputs_divide_by_the_slowest_rank_and_its_tail_is_logged():
    completions = [SimpleNamespace(tokens=[1] * n, finish_reason=r) for n, r in ((10, "stop"), (30, "length"))]
    batch = SimpleNamespace(attention_mask=torch.ones(2, 50))
    # the other rank: 2 samples of 20 and 40 tokens; its rollout took 6 s (ours 2 s), its update 1 s
    other_rows = torch.tensor([[20.0, 1.0, 0.0], [40.0, 0.0, 0.0]], dtype=torch.float64)
    ctx = TwoRanks(other_rows, [torch.tensor([0.0, 100.0, 6.0], dtype=torch.float64)],
                   [torch.tensor([6.0, 1.0], dtype=torch.float64)])
    m, lengths, _ = global_metrics(ctx, completions, [0.5, 1.0], batch, 0.0, t_rollout=2.0, t_update=0.5)
    assert lengths == [10, 30, 20, 40] and m["tokens/generated"] == 100
    assert m["throughput/rollout_tokens_per_s_per_gpu"] == 100 / 6.0 / 2
    assert m["throughput/train_tokens_per_s_per_gpu"] == 200 / 1.0 / 2
    assert m["time/rollout_slowest"] == 6.0
    assert m["tokens/trained"] == 200 and m["time/update_slowest"] == 1.0
    assert m["time/rollout_slowest_over_mean"] == 6.0 / 4.0
    assert m["response/truncated_frac"] == 0.25


def test_nccl_failure_defaults_are_set_unless_the_user_set_them():
    from slipstream.trainer.distributed import NCCL_FAILURE_DEFAULTS, set_nccl_failure_defaults

    env: dict[str, str] = {}
    set_nccl_failure_defaults(env)
    assert env == NCCL_FAILURE_DEFAULTS
    assert env["NCCL_RUNTIME_CONNECT"] == "0" and int(env["TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC"]) <= 5000
    for name in ("TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC", "TORCH_FR_WAIT_TIMEOUT_DUMP_MILSEC", "NCCL_RUNTIME_CONNECT"):
        env = {name: "7"}
        set_nccl_failure_defaults(env)
        assert env[name] == "7"
        assert ("TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC" in env) == (name != "TORCH_FR_WAIT_TIMEOUT_DUMP_MILSEC")


def test_only_an_error_that_says_a_peer_is_gone_makes_the_rank_wait(monkeypatch):
    from slipstream.trainer import distributed

    reset = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:43432: Connection reset by peer")
    try:
        try:
            raise reset
        except RuntimeError as e:
            raise ValueError("reduce-scatter of the gradients failed") from e  # a backend's wrapper
    except ValueError as wrapped:
        assert distributed.peer_lost(wrapped)
    assert not distributed.peer_lost(RuntimeError("reward verifier crashed"))
    assert not distributed.peer_lost(RuntimeError("Timed out waiting 5000ms for recv operation to complete"))

    waits = []
    monkeypatch.setattr(distributed.time, "sleep", waits.append)

    @distributed.rank_entry_point
    def fails(error):
        raise error

    for error, waited in ((reset, [distributed.PEER_LOST_WAIT_S]), (KeyError("x"), [])):
        waits.clear()
        try:
            fails(error)
        except type(error) as e:
            assert e is error  # the error itself escapes, after the wait
        assert waits == waited
