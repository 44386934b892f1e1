"""One rank of a small distributed training run, for tests/test_distributed.py (not a test
module). The test starts one process per rank with torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

usage: python dist_worker.py MODE RUN_DIR
MODE "ddp": DistributedDataParallel, live mode on.
MODE "fsdp": FSDP2 (fully_shard on every Linear and the root), live mode on.
MODE "fsdp_kill": FSDP2; rank 1 SIGKILLs itself at the start of step KILL_AT, having
    flushed its telemetry only up to step FLUSHED_UNTIL - 1; rank 0 flushes every step
    and fails at its next collective.

The model and the global batches are defined here once, so that the test can train the
same model on the same global batches in one process and compare.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys

import torch
import torch.distributed as dist
from torch import nn

STEPS = 4
KILL_AT = 4
FLUSHED_UNTIL = 2
GLOBAL_BATCH = 16
LR = 0.1


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # 3 output rows do not divide by 2 ranks: FSDP2 shards them unevenly.
    return nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3)
    )


def global_batches(steps: int = STEPS):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(GLOBAL_BATCH, 8, generator=gen)
        yield x, torch.randint(0, 3, (GLOBAL_BATCH,), generator=gen)


def main() -> None:
    import torchvitals

    mode, path = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    if mode == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    kill = mode == "fsdp_kill"
    mon = torchvitals.Monitor(
        model, path, optimizer=opt, weight_every=1, live=not kill, flush_interval=60.0
    )
    for step, (x, y) in enumerate(global_batches(KILL_AT + 2 if kill else STEPS)):
        if kill and rank == 1 and step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        loss = nn.functional.cross_entropy(model(x.chunk(world)[rank]), y.chunk(world)[rank])
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(loss=loss)
        if kill and (rank == 0 or step < FLUSHED_UNTIL):
            mon.writer.flush()
    mon.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
