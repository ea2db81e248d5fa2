"""One DeepSpeed update in bf16 mixed precision (the CUDA setting), run alone on the CPU.

`python deepspeed_precision.py STAGE OUT` writes the dtype of the logits, and the parameters
before and after one AdamW step at an RL learning rate, to OUT.
"""

import sys

import torch
from transformers import LlamaForCausalLM

from slipstream.models.tiny import tiny_config
from slipstream.trainer.backends import OptimizerSpec, build_backend
from slipstream.trainer.distributed import init_distributed, shutdown_distributed

LR = 1e-6


def main(stage: int, out: str) -> None:
    torch.set_num_threads(1)
    ctx = init_distributed("cpu", timeout_s=60, need_group=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(32, 2)).float()
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    backend = build_backend("deepspeed", model, ctx, OptimizerSpec(LR, max_grad_norm=1.0), zero_stage=stage,
                            autocast=True)
    ids = torch.randint(3, 200, (4, 12), generator=torch.Generator().manual_seed(1))
    dtypes = []
    for i in range(2):
        logits = backend.module(input_ids=ids[2 * i : 2 * i + 2]).logits
        dtypes.append(str(logits.dtype))
        backend.backward(logits.float().log_softmax(-1)[..., 5].mean(), last=i == 1)
    backend.step()
    after = {k: v.detach().clone() for k, v in backend.named_full_parameters()}
    torch.save({"lr": LR, "logits_dtypes": dtypes, "initial": initial, "after": after}, out)
    shutdown_distributed()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
