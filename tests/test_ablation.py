"""benchmarks/ablation.py: the crop statistics against a pixel-level count, the paired
statistics against numpy, the table in docs/benchmarks.md, and a tiny end-to-end run."""
import json
import math

import numpy as np
import pytest

import ablation
from ablation import LOGIT_SCALE
from dali_relabel import LabelMapStore, write_labelmaps
from dali_relabel.loading import random_resized_crop_windows
from dali_relabel.tools import make_synthetic_imagenet

TINY_SCENES = dict(num_classes=4, train_per_class=3, val_per_class=2, image_size=(32, 44),
                   map_size=5, topk=4, seed=1, objects=(2, 4), main_side=(0.4, 0.6),
                   other_side=(0.25, 0.4), progress=False)


def densify(values, indices, num_classes):
    """[N, C, M, M] float64 from top-k [N, K, M, M] values and class indices."""
    n, _, height, width = values.shape
    dense = np.zeros((n, num_classes, height, width))
    np.add.at(dense, (np.arange(n)[:, None, None, None], indices,
                      np.arange(height)[None, None, :, None],
                      np.arange(width)[None, None, None, :]), values)
    return dense


def area_by_subpixels(dense, height, width, window):
    """[C] area of each class inside the crop, in cells, by stretching the [C, M, M] map over
    an M*H x M*W grid (each cell exactly H x W subpixels, each pixel M x M) and counting."""
    cells = dense.shape[1]
    grid = np.repeat(np.repeat(dense, height, axis=1), width, axis=2)
    y, x, h, w = (int(v) for v in window)
    part = grid[:, y * cells:(y + h) * cells, x * cells:(x + w) * cells]
    return part.sum(axis=(1, 2)) / (height * width)


def test_crop_coverage_counts_the_pixels(tmp_path):
    dataset = make_synthetic_imagenet(tmp_path / "data", **TINY_SCENES)
    with LabelMapStore.open(dataset.labelmaps, placement="memory") as store:
        coverage = store.values.double().numpy() / LOGIT_SCALE
        classes = store.indices.long().numpy()
        sizes = store.sizes.long().numpy()
        dense = densify(coverage, classes, store.num_classes)
    rng = np.random.default_rng(0)
    for _ in range(3):
        windows = random_resized_crop_windows(sizes, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        got = ablation.crop_coverage(coverage, classes, sizes, windows, dense.shape[1])
        want = np.stack([area_by_subpixels(dense[i], *sizes[i], windows[i])
                         for i in range(len(sizes))])
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_crop_coverage_and_statistics_on_hand_made_maps(tmp_path):
    # One 10 x 10 image, a 2 x 2 map; class 1 (the label) fills the left column of cells,
    # class 2 the top right cell. Crops: whole image; the right half; the top right quarter.
    values = np.zeros((1, 2, 2, 2), dtype=np.float16)
    indices = np.zeros((1, 2, 2, 2), dtype=np.int16)
    values[0, 0, :, 0] = LOGIT_SCALE
    indices[0, 0, :, 0] = 1
    values[0, 0, 0, 1] = LOGIT_SCALE
    indices[0, 0, 0, 1] = 2
    indices[0, 1] = 0
    path = tmp_path / "maps.h5"
    write_labelmaps(path, values, indices, np.array([1]), ["a/x.JPEG"], ["a", "b", "c"],
                    sizes=np.array([[10, 10]]))
    coverage, classes = values.astype(np.float64) / LOGIT_SCALE, indices.astype(np.int64)
    windows = np.array([[0, 0, 10, 10], [0, 5, 10, 5], [0, 5, 5, 5], [0, 3, 10, 4]])
    area = np.concatenate([ablation.crop_coverage(coverage, classes, np.array([[10, 10]]),
                                                  w[None], 3) for w in windows])
    # The last crop: x in [3, 7) holds 2/5 of each cell column, all rows.
    np.testing.assert_allclose(area, [[0, 2, 1], [0, 0, 1], [0, 0, 1], [0, 0.8, 0.4]])

    def overlap(start, length, low, high):
        return max(0.0, min(start + length, high) - max(start, low)) / 5

    rng, misses, others = np.random.default_rng(3), 0, 0
    for _ in range(50):
        y, x, h, w = random_resized_crop_windows(np.array([[10, 10]]), (0.08, 1.0),
                                                 (3 / 4, 4 / 3), rng)[0]
        top, rows = overlap(y, h, 0, 5), overlap(y, h, 0, 5) + overlap(y, h, 5, 10)
        labelled, other = overlap(x, w, 0, 5) * rows, overlap(x, w, 5, 10) * top
        misses += labelled < 0.5 * 2
        others += other > labelled
    stats = ablation.crop_statistics(str(path), draws=50, seed=3)
    assert stats == dict(less_than_half=misses / 50, other_class_more=others / 50, crops=50)
    assert 0 < misses < 50 and 0 < others < 50


def test_paired_difference_matches_numpy():
    better, worse = [91.2, 92.1, 90.5, 93.0], [88.6, 89.6, 89.1, 90.2]
    d = ablation.paired_difference(better, worse)
    diffs = np.subtract(better, worse)
    se = diffs.std(ddof=1) / math.sqrt(len(diffs))
    assert d["mean"] == pytest.approx(diffs.mean())
    assert d["se"] == pytest.approx(se)
    assert d["ci95"] == pytest.approx([diffs.mean() - 3.182 * se, diffs.mean() + 3.182 * se])
    assert d["beyond_two_se"] is True
    assert ablation.verdict({**d, "paper": 1.4}).startswith("reappears: ahead")
    # A difference that changes sign across seeds is not beyond two standard errors.
    mixed = ablation.paired_difference([1.0, 3.0, 2.0], [2.0, 1.0, 2.5])
    assert mixed["beyond_two_se"] is False
    assert ablation.verdict({**mixed, "paper": 1.4}).startswith("not shown")
    behind = ablation.paired_difference(worse, better)
    assert ablation.verdict({**behind, "paper": 1.4}).startswith("reversed here: behind")
    # Without a paper figure there is no ordering to reappear or reverse: only the sign.
    assert ablation.verdict(d).startswith("ahead")
    assert ablation.verdict(behind).startswith("behind")
    assert ablation.verdict(mixed).startswith("no difference shown")
    with pytest.raises(ValueError, match="better, worse: expected one value per seed"):
        ablation.paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])


def test_target_statistics_count_with_the_loaders_pooling(tmp_path):
    dataset = make_synthetic_imagenet(tmp_path / "data", **TINY_SCENES)
    stats = ablation.target_statistics(dataset.labelmaps)
    assert stats["single_matches_original"] == 1.0
    assert 1 / 4 < stats["global_multi_label_weight"] < stats["localized_multi_top_weight"] < 1
    with LabelMapStore.open(dataset.labelmaps, placement="memory") as store:
        # Reference: the mean of the densified map over its cells, in float64 (a whole-image
        # box of RoIAlign samples every cell alike), then softmax.
        logits = densify(store.values.double().numpy(), store.indices.long().numpy(),
                         store.num_classes).mean(axis=(2, 3))
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        weight = probs[np.arange(len(store)), store.labels.numpy()].mean()
    assert stats["global_multi_label_weight"] == pytest.approx(weight, rel=1e-4)
    with LabelMapStore.open(dataset.labelmaps, placement="memory") as store:
        labels = store.labels.clone()
        labels[0] = (labels[0] + 1) % store.num_classes  # no longer the largest object
        path = tmp_path / "relabelled.h5"
        write_labelmaps(path, store.values.numpy(), store.indices.numpy(), labels.numpy(),
                        store.paths, store.classes, sizes=store.sizes.numpy())
        expected = 1 - 1 / len(store)
    assert ablation.target_statistics(str(path))["single_matches_original"] == pytest.approx(
        expected)


def test_update_docs_replaces_only_the_marked_table(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"intro\n{ablation.DOCS_START}\nold\n{ablation.DOCS_END}\nafter\n")
    ablation.update_docs("| new |\n", docs)
    assert docs.read_text() == (f"intro\n{ablation.DOCS_START}\n\n| new |\n\n"
                                f"{ablation.DOCS_END}\nafter\n")
    docs.write_text("no markers\n")
    with pytest.raises(ValueError, match="marker"):
        ablation.update_docs("| new |\n", docs)


def check_figures_come_from_the_runs(result):
    """Every configuration's values are its runs' (global_single's, when untrained, the
    original's), and every comparison's differences are those values' per seed."""
    seeds = result["settings"]["seeds"]
    for name, row in result["configs"].items():
        source = name if row["trained"] else "original"
        runs = sorted((r for r in result["runs"] if r["config"] == source),
                      key=lambda r: r["seed"])
        assert [r["seed"] for r in runs] == list(range(seeds))
        for key in ("val_top1", "val_real", "val_top5"):
            assert row[key]["values"] == [r[key] for r in runs]
            assert row[key]["mean"] == pytest.approx(np.mean(row[key]["values"]))
    configs = result["configs"]
    expected = [pair for pair in ablation.COMPARISONS + ablation.CROPS_COMPARISONS
                if set(pair) <= configs.keys()] if seeds > 1 else []
    assert [(c["better"], c["worse"]) for c in result["comparisons"]] == expected
    for c in result["comparisons"]:
        better = result["configs"][c["better"]]["val_top1"]["values"]
        worse = result["configs"][c["worse"]]["val_top1"]["values"]
        assert c["diffs"] == pytest.approx(np.subtract(better, worse).tolist())
        assert c["beyond_two_se"] == (c["mean"] > 2 * c["se"])


def test_the_docs_table_is_the_one_the_committed_results_give():
    result = json.loads((ablation.RESULTS / "ablation.json").read_text())
    check_figures_come_from_the_runs(result)
    docs = ablation.DOCS.read_text(encoding="utf-8")
    start = docs.index(ablation.DOCS_START) + len(ablation.DOCS_START)
    assert docs[start:docs.index(ablation.DOCS_END)].strip() == \
        ablation.render_table(result).strip()


def test_from_json_renders_the_committed_runs_again(tmp_path):
    result = ablation.main(["--from-json", str(ablation.RESULTS / "ablation.json"),
                            "--out", str(tmp_path)])
    assert (tmp_path / "ablation.md").read_text() == ablation.render_table(result)
    assert json.loads((tmp_path / "ablation.json").read_text()) == json.loads(
        (ablation.RESULTS / "ablation.json").read_text())


def test_a_tiny_ablation_runs_end_to_end(tmp_path, monkeypatch):
    """Two configurations, one seed: every training run is a child process (train/run.py, as
    from the command line), which costs seconds of start-up each; --configs keeps the test
    to two (the comparisons are checked on made-up runs below)."""
    monkeypatch.setenv("DALI_RELABEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ablation, "RECIPE", dict(ablation.RECIPE, batch_size=8))
    configs = ["original", "localized_multi (4 crops)"]
    result = ablation.main(["--seeds", "1", "--epochs", "1", "--train-per-class", "2",
                            "--val-per-class", "2", "--data", str(tmp_path / "data"),
                            "--configs", ",".join(configs),
                            "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    written = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert (tmp_path / "out" / "ablation.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "ablation.md").read_text() == ablation.render_table(written)
    assert list(written["configs"]) == configs and written["comparisons"] == []
    assert [r["config"] for r in written["runs"]] == configs
    assert all(r["train_seconds"] > 0 and r["run_seconds"] > r["train_seconds"]
               for r in written["runs"])
    assert written["configs"]["localized_multi (4 crops)"]["flags"] == ["--num-crops", "4"]
    check_figures_come_from_the_runs(written)
    assert "One seed: no standard errors" in ablation.render_table(written)
    premise = written["premise"]["cluttered"]
    assert 0 < premise["other_class_more"] < 1 and premise["crops"] == 4 * 10 * 2


def test_four_crops_are_compared_in_top1_and_training_time():
    """The crops row against localized_multi: a paired top-1 difference without a paper
    figure, and the paired ratio of training times; the paper's orderings are counted
    without it."""
    seeds = 3
    top1 = {"original": [80.0, 81.0, 79.0], "localized_multi": [82.0, 83.5, 81.0],
            "localized_multi (4 crops)": [83.0, 84.0, 82.5]}
    seconds = {"original": [10.0, 11.0, 10.5], "localized_multi": [10.0, 11.0, 10.5],
               "localized_multi (4 crops)": [8.0, 8.8, 8.4]}
    runs = [dict(config=name, seed=seed, val_top1=top1[name][seed], val_top5=99.0,
                 val_real=99.5, train_seconds=seconds[name][seed], run_seconds=20.0)
            for name in top1 for seed in range(seeds)]
    configs = {name: dict(label_mode=ablation.CONFIGS[name][0],
                          flags=list(ablation.CONFIGS[name][1]),
                          paper_top1=ablation.CONFIGS[name][2], trained=True,
                          **{key: ablation.summarize([r[key] for r in runs if r["config"] == name])
                             for key in ("val_top1", "val_real", "val_top5", "train_seconds")})
               for name in top1}
    comparisons = ablation.compare(configs)
    assert [(c["better"], c["worse"]) for c in comparisons] == [
        ("localized_multi", "original"), ("localized_multi (4 crops)", "localized_multi")]
    crops = comparisons[1]
    assert crops["paper"] is None and crops["mean"] == pytest.approx(1.0)
    ratios = np.divide(seconds["localized_multi (4 crops)"], seconds["localized_multi"])
    assert crops["train_time"]["percent"] == pytest.approx(
        100 * np.exp(np.log(ratios).mean()))
    result = dict(settings=dict(ablation.RECIPE, seeds=seeds, epochs=2, train_images=20,
                                val_images=20),
                  premise=dict(cluttered=dict(less_than_half=0.5, other_class_more=0.4),
                               default=dict(less_than_half=0.3, other_class_more=0.2)),
                  targets=dict(single_matches_original=1.0, global_multi_label_weight=0.4,
                               localized_multi_top_weight=0.6),
                  minutes=1.0, machine="2 CPU cores", runs=runs, configs=configs,
                  comparisons=comparisons)
    check_figures_come_from_the_runs(result)
    table = ablation.render_table(result)
    assert "| localized_multi (4 crops) | 83.2 ± 0.4 | 99.5 ± 0.0 | — |" in table
    assert "| localized_multi (4 crops) vs localized_multi | +1.00 ±" in table
    assert "1 of the paper's 1 orderings reappear" in table
    assert f"training time (the steps' wall clock) {crops['train_time']['percent']:.0f}%" in table
