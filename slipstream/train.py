"""`python -m slipstream.train recipe=NAME key=value ...`: the training entry point (as `slipstream train`).

Under `torchrun --nproc_per_node=N -m slipstream.train ...` every rank runs this. `record` writes
an exception that escapes a rank to torchrun's error file, so the launcher's summary names the
failed rank with its traceback, and torchrun then stops the other ranks.
"""

import sys

from torch.distributed.elastic.multiprocessing.errors import record

from slipstream.cli import main


@record
def run() -> int:
    return main(["train", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(run())
