"""Two ranks with gloo on the CPU, launched by torchrun: the sharded backends against one process,
the RL loop end to end (kill and resume, export), and a failing rank ending the job."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SPMD = Path(__file__).parent / "spmd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], nproc: int = 2, monitor_interval_s: float = 0.1) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={_free_port()}", f"--monitor-interval={monitor_interval_s}", *args]


def _env() -> dict:
    # PYTHONFAULTHANDLER: a rank killed by a signal (SIGABRT, SIGSEGV) prints where every thread was
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1",
                PYTHONPATH=str(Path(__file__).parents[2]))


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "local.pt"
    p = _run([sys.executable, str(SPMD / "one_update.py"), "local", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    return torch.load(f"{out}.0")


def _compare(ref: dict, got: dict) -> None:
    for key in ("loss", "grad_norm", "kl_ref", "mismatch/kl"):
        assert got["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-4, abs=1e-7), key
    for key in ("critic/loss", "critic/grad_norm", "critic/value_mean"):
        assert got["critic_metrics"][key] == pytest.approx(ref["critic_metrics"][key], rel=1e-4, abs=1e-7), key
    # REINFORCE++'s batch statistics and the whitened GAE advantages are the global batch's
    assert torch.allclose(got["advantages"], ref["advantages"], atol=1e-5)
    assert torch.allclose(got["gae"], ref["gae"], atol=1e-5)
    for part in ("actor", "critic"):
        assert set(got[part]) == set(ref[part])
        for name, value in ref[part].items():
            # lr 1e-2 moves every weight by about 1e-2 in this Adam step: 1e-4 is 1% of a step
            assert torch.allclose(got[part][name], value, atol=1e-4), (part, name)
    # ... and the step is far larger than that tolerance
    assert min(float((ref["actor"][k] - ref["initial"][k]).abs().max()) for k in ref["actor"]) > 5e-3


def _distributed_update(tmp_path, *backend_args: str) -> dict:
    """Rank 0's results, after checking that every rank wrote the same ones and the job exited cleanly."""
    out = tmp_path / "dist.pt"
    p = _run(_torchrun([str(SPMD / "one_update.py"), backend_args[0], str(out), *backend_args[1:]]))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    rank0, rank1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    # the global metrics are all-reduced and the full parameters gathered: the same on both ranks
    assert rank1["metrics"] == pytest.approx(rank0["metrics"], rel=1e-6)
    for part in ("actor", "critic"):
        assert set(rank1[part]) == set(rank0[part])
        for name, value in rank0[part].items():
            assert torch.equal(rank1[part][name], value), (part, name)
    return rank0


@pytest.mark.parametrize("options", [[], ["keep-gathered"], ["grouped"], ["tokens"]],
                         ids=["reshard", "keep-gathered", "grouped", "token-budget"])
def test_fsdp2_step_matches_the_single_process_step(tmp_path, single_process, options):
    _compare(single_process, _distributed_update(tmp_path, "fsdp2", *options))


# deepspeed is in the dev extra, so these tests run (and fail without it) wherever the suite does;
# SLIPSTREAM_SKIP_DEEPSPEED=1 skips them explicitly on a machine that has no deepspeed.
needs_deepspeed = pytest.mark.skipif(os.environ.get("SLIPSTREAM_SKIP_DEEPSPEED") == "1",
                                     reason="SLIPSTREAM_SKIP_DEEPSPEED=1")


@needs_deepspeed
@pytest.mark.parametrize("zero", [["1"], ["2"], ["3"], ["2", "offload"]], ids=["zero1", "zero2", "zero3",
                                                                           "zero2-cpu-offload"])
def test_deepspeed_zero_step_matches_the_single_process_step(tmp_path, single_process, zero):
    _compare(single_process, _distributed_update(tmp_path, "deepspeed", *zero))


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_mixed_precision_keeps_float32_weights_that_move_by_the_learning_rate(tmp_path, stage):
    """bf16 compute over float32 weights: DeepSpeed's bf16 mode would round the weights (and the
    master copy made from them) to bf16, where a 1e-6 step leaves almost every weight unchanged."""
    out = tmp_path / "precision.pt"
    p = _run([sys.executable, str(SPMD / "deepspeed_precision.py"), str(stage), str(out)])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    r = torch.load(out)
    assert r["logits_dtypes"] == ["torch.bfloat16"] * 2  # the forward ran under autocast
    assert set(r["after"]) == set(r["initial"])
    for name, before in r["initial"].items():
        after = r["after"][name]
        assert after.dtype == torch.float32, name
        if before.dim() == 2:  # AdamW's first step moves each weight by about lr (sign of its gradient)
            moved = (after - before).abs() / r["lr"]
            assert 0.5 < float(moved.median()) < 1.5, (name, float(moved.median()))


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train_cmd(run_dir: Path, backend: str, steps: int, extra: list[str]) -> list[str]:
    return _torchrun(["-m", "slipstream.train", "recipe=smoke", f"trainer.backend={backend}", *extra,
                      f"trainer.run_dir={run_dir}", f"trainer.steps={steps}", "trainer.save_every=1",
                      "logger.wandb=false", "task.num_eval=4", "rollout.max_tokens=12", "rollout.eval_max_tokens=12",
                      # No reward for the random model; weight decay moves the weights every step, so a
                      # resumed run must really restore them (and hand them to every rank's engine).
                      "trainer.lr=0.01", "trainer.weight_decay=0.5"])


@pytest.mark.parametrize("backend, extra", [
    ("fsdp2", ["algorithm=ppo"]),  # the critic is checkpointed and restored too
    pytest.param("deepspeed", ["algorithm.kl_coef=0.1"], marks=needs_deepspeed),  # and a frozen reference
])
def test_killed_job_resumes_like_the_uninterrupted_one_and_exports(tmp_path, backend, extra):
    full, broken = tmp_path / "full", tmp_path / "broken"
    p = _run(_train_cmd(full, backend, 3, extra))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    # the whole job (launcher and both ranks) killed hard once step 1 is checkpointed
    job = subprocess.Popen(_train_cmd(broken, backend, 3, extra), env=_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    marker = broken / "checkpoints" / "step_000001" / "COMPLETE"
    deadline = time.time() + 180
    while not marker.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert marker.exists()
    p = _run(_train_cmd(broken, backend, 3, extra))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "resumed from" in p.stdout
    a, b = _rows(full), _rows(broken)
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    assert ("critic/loss" in a[1]) == (backend == "fsdp2") and ("kl_ref" in a[1]) == (backend == "deepspeed")
    for ra, rb in zip(a, b):
        # mismatch/kl_max: both ranks' engines generate with the restored weights
        for key in ("reward/mean", "response_length/mean", "loss", "eval/accuracy", "mismatch/kl_max",
                    "critic/loss", "kl_ref"):
            if key in ra:
                assert abs(ra[key] - rb[key]) <= 1e-5 * max(1.0, abs(ra[key])), (ra["step"], key, ra[key], rb[key])

    from transformers import AutoModelForCausalLM

    from slipstream.trainer.export import export

    export(full, tmp_path / "hf_full")
    export(broken, tmp_path / "hf_broken")
    a_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_full")
    b_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_broken")
    initial = AutoModelForCausalLM.from_pretrained(Path(os.environ["SLIPSTREAM_CACHE"]) / "models" / "tiny-random")
    for (name, wa), (_, wb), (_, w0) in zip(a_model.named_parameters(), b_model.named_parameters(),
                                            initial.named_parameters()):
        # the killed-and-resumed job ends with the uninterrupted one's weights, which training moved
        assert torch.allclose(wa, wb, atol=1e-5), name
        if wa.dim() == 2:  # weight decay alone (lr 0.01 x 0.5, 3 steps) shrinks a matrix by 1.5%
            assert float((wa - w0).detach().norm() / w0.detach().norm()) > 0.01, name


@pytest.mark.parametrize("backend", ["fsdp2", pytest.param("deepspeed", marks=needs_deepspeed)])
def test_one_process_runs_a_sharded_backend_without_torchrun(tmp_path, backend):
    p = _run([sys.executable, "-m", "slipstream.train", "recipe=smoke", f"trainer.backend={backend}",
              f"trainer.run_dir={tmp_path}", "trainer.steps=1", "logger.wandb=false", "task.num_eval=2",
              "rollout.max_tokens=8", "rollout.eval_max_tokens=8"])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    actor = tmp_path / "checkpoints" / "step_000001" / "actor"
    expected = {"fsdp2": "dcp", "deepspeed": "deepspeed"}[backend]
    assert json.loads((actor / "format.json").read_text())["format"] == expected


@pytest.mark.parametrize("mode, says", [
    ("raise", "reward verifier crashed on rank one"),
    ("die", "Signal 9"),
    ("hang", "Timed out"),  # rank 0's collective times out (5 s) instead of waiting forever
    ("hang-host", "CollectiveTimeoutError"),  # the host-side deadline, when the backend's would come too late
])
def test_a_failing_rank_ends_the_job_naming_the_rank_and_error(mode, says):
    t0 = time.time()
    # torchrun looks at its ranks once a second here, not every 0.1 s: the healthy rank's own error
    # ("connection reset" by the dead one) comes well before, and must still not be named the cause
    p = _run(_torchrun([str(SPMD / "failing_rank.py"), mode], monitor_interval_s=1.0), timeout=120)
    elapsed = time.time() - t0
    log = p.stdout + p.stderr
    assert p.returncode != 0
    assert elapsed < 60, elapsed
    assert "Root Cause" in log and says in log, log[-3000:]
    root_cause = log[log.index("Root Cause"):]
    failed = re.search(r"rank\s*:\s*(\d+) \(local_rank", root_cause)
    # the rank that stops answering is named by the one whose collective timed out
    assert failed and failed.group(1) == ("0" if mode.startswith("hang") else "1"), root_cause


def test_a_batch_that_cannot_be_split_over_the_ranks_is_named_by_every_rank(tmp_path):
    p = _run(_torchrun(["-m", "slipstream.train", "recipe=smoke", "trainer.backend=fsdp2",
                        f"trainer.run_dir={tmp_path}", "trainer.prompts_per_step=3", "logger.wandb=false",
                        "task.num_eval=2"]), timeout=120)
    assert p.returncode != 0
    for rank in (0, 1):
        assert (f"slipstream [rank {rank}]: error: trainer.prompts_per_step=3 must be a multiple of the number of "
                f"ranks (2)") in p.stderr, p.stderr[-3000:]
