"""Two-process DDP training on CPU (gloo), run as a script by tests/test_training.py.

Each rank builds its model from a different seed (DDP must broadcast rank 0's weights), trains a few steps on
different data (gradients must be all-reduced for the replicas to stay equal) and saves its final state to
``<out>/rank<r>.pt`` together with the losses it saw, for the test to compare.

SyncBatchNorm (train.py ``--sync-bn``) is not exercised here: torch's DDP refuses it on CPU ("SyncBatchNorm layers
only work with GPU modules"); its conversion is tested structurally in test_training.py.

Usage: python tests/_train_ddp.py OUT_DIR [STEPS]
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

WORLD_SIZE = 2


def _worker(rank: int, out_dir: str, steps: int) -> None:
    torch.set_num_threads(1)
    import timm  # noqa: F401  (registers the plugin's variants through the start-up hook)
    import timm_convmixer  # noqa: F401
    from timm.optim import create_optimizer_v2
    from timm.utils import distribute_bn

    dist.init_process_group(
        'gloo', init_method='file://' + os.path.join(out_dir, 'store'), rank=rank, world_size=WORLD_SIZE)
    torch.manual_seed(100 + rank)  # different initial weights per rank on purpose
    model = timm.create_model('convmixer_256_8_ks5_p2', dim=16, depth=2, num_classes=4)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    ddp = DistributedDataParallel(model)
    optimizer = create_optimizer_v2(ddp, 'adamw', lr=1e-2, weight_decay=0.05)
    gen = torch.Generator().manual_seed(1000 + rank)  # different data per rank
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 3, 16, 16, generator=gen)
        y = torch.randint(0, 4, (4,), generator=gen)
        loss = F.cross_entropy(ddp(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # plain BN keeps per-rank running statistics (DDP broadcasts rank 0's buffers at the *start* of each
    # forward); train.py averages them at the end of an epoch (--dist-bn reduce), as done here
    distribute_bn(model, WORLD_SIZE, reduce=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({'state_dict': state, 'initial': initial, 'losses': torch.tensor(losses)},
               os.path.join(out_dir, f'rank{rank}.pt.tmp'))
    os.replace(os.path.join(out_dir, f'rank{rank}.pt.tmp'), os.path.join(out_dir, f'rank{rank}.pt'))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == '__main__':
    out = os.path.abspath(sys.argv[1])
    n_steps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    os.makedirs(out, exist_ok=True)
    mp.spawn(_worker, args=(out, n_steps), nprocs=WORLD_SIZE, join=True)
