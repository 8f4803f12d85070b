"""Worker of tests/test_loader_distributed.py, one per torchrun process: the rows this
rank's ReLabelLoader reads in epoch 0, gathered into a JSON file by rank 0.

Usage: torchrun --nproc_per_node=2 loader_shards.py IMAGE_ROOT LABELMAPS OUT.json
"""
import json
import sys

import torch.distributed as dist

from dali_relabel import ReLabelLoader


def main() -> None:
    root, store, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    loader = ReLabelLoader(root, store, 4, device="cpu", image_size=16, drop_last=False,
                           return_meta=True, num_threads=1)
    rows = [row for batch in loader for row in batch.sample_index.tolist()]
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, dict(rank=dist.get_rank(), shard_id=loader.shard_id,
                                            num_shards=loader.num_shards, rows=rows,
                                            order=loader.epoch_order(0).tolist()))
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(everything, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
