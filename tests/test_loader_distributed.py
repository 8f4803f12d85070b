"""ReLabelLoader under a real `torchrun` with two gloo processes: the shards default to the
global rank and world size, and together they read the epoch exactly once."""
import json

from jpeg_data import NUM_IMAGES
from script_runner import WORKERS, run_python


def test_torchrun_two_ranks_cover_the_epoch_once(dataset, tmp_path):
    root, store = dataset
    out = tmp_path / "ranks.json"
    result = run_python(WORKERS / "loader_shards.py", root, store, out, torchrun=2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert [(r["rank"], r["shard_id"], r["num_shards"]) for r in ranks] == [(0, 0, 2), (1, 1, 2)]
    assert [r["rows"] for r in ranks] == [r["order"] for r in ranks]
    assert sorted(ranks[0]["rows"] + ranks[1]["rows"]) == list(range(NUM_IMAGES))
