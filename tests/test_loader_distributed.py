"""ReLabelLoader under a real `torchrun` with two gloo processes: the shards default to the
global rank and world size, and together they read the epoch exactly once."""
import json
import subprocess
import sys
import textwrap

from jpeg_data import NUM_IMAGES

WORKER = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    from dali_relabel import ReLabelLoader

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
""")


def test_torchrun_two_ranks_cover_the_epoch_once(dataset, tmp_path):  # noqa: F811
    root, store = dataset
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "ranks.json"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), root, store, str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert [(r["rank"], r["shard_id"], r["num_shards"]) for r in ranks] == [(0, 0, 2), (1, 1, 2)]
    assert [r["rows"] for r in ranks] == [r["order"] for r in ranks]
    assert sorted(ranks[0]["rows"] + ranks[1]["rows"]) == list(range(NUM_IMAGES))
