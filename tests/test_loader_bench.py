"""Smoke test of benchmarks/loader_bench.py: tiny settings, synthetic images, real loaders;
and of the harness's JPEG set and official pipeline that it times."""
import json

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import dali_relabel
import loader_bench
from harness import jpegs, official


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One in-process run; `--source synthetic` so it never needs scikit-image/-learn."""
    cache, out = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("results")
    result = loader_bench.main([
        "--source", "synthetic", "--images", "24", "--batch-size", "4", "--batches", "2",
        "--warmup", "1", "--threads", "2", "--device", "cpu", "--rounds", "1",
        "--wait-idle", "0", "--max-other-cpu", "100", "--pairs", "3", "--segment-batches", "1",
        "--boundary-epochs", "3", "--cache", str(cache), "--out", str(out)])
    return result, cache, out


def test_writes_positive_rates_for_every_method(bench_run):
    result, _, out = bench_run
    saved = json.loads((out / "loader_bench.json").read_text())
    assert (out / "loader_bench.png").stat().st_size > 0
    assert set(saved["methods"]) == set(loader_bench.METHODS)
    for name in loader_bench.METHODS:
        assert saved["methods"][name]["images_per_s"] > 0, name
    assert saved["dataset"]["source"] == "synthetic"
    assert saved["dataset"]["mean_jpeg_kb"] > 0
    summary = saved["summary"]
    assert summary["ratio_vs_official"] > 0 and summary["percent_of_bare_decode"] > 0
    # ReLabel's cost: the geometric mean of the paired segments' ratios, with a t interval.
    segments = saved["paired_segments"]["segments_images_per_s"]
    assert len(segments["relabel_loader"]) == len(segments["plain_dali"]) == 3
    log_ratios = np.log(np.divide(segments["relabel_loader"], segments["plain_dali"]))
    se = log_ratios.std(ddof=1) / np.sqrt(3)
    assert summary["percent_of_plain"] == pytest.approx(100 * np.exp(log_ratios.mean()))
    assert summary["percent_of_plain_ci95"] == pytest.approx(
        100 * np.exp(log_ratios.mean() + np.array([-4.303, 4.303]) * se))
    assert summary["relabel_cost_percent"] == pytest.approx(100 - summary["percent_of_plain"])
    assert summary["pairs"] == 3 and "interleaved pairs" in loader_bench.summary_line(
        {**summary, "ratio_vs_official": 2.0})
    assert summary["plan_ms_imagenet"] > 0
    assert saved["machine"]["cpu_count"] >= 1
    assert result["methods"].keys() == saved["methods"].keys()


def test_several_crops_against_the_plain_graph_in_the_same_rounds(bench_run):
    _, _, out = bench_run
    saved = json.loads((out / "loader_bench.json").read_text())
    crops, methods = saved["summary"]["crops"], saved["methods"]
    assert list(crops) == ["1", "2", "4"]
    for n, entry in crops.items():
        assert entry["method"] == loader_bench.CROPS[int(n)]
        mine = methods[entry["method"]]
        assert entry["samples_per_s"] == mine["images_per_s"] > 0
        # One round: the ratio is that round's.
        assert entry["percent_of_plain"] == pytest.approx(
            100 * mine["rounds_images_per_s"][0] / methods["plain_dali"]["rounds_images_per_s"][0])
        assert entry["percent_of_official"] > 0


def test_epoch_boundary_waits_against_the_median(bench_run):
    _, _, out = bench_run
    saved = json.loads((out / "loader_bench.json").read_text())
    for name in ("relabel_loader", "plain_dali"):
        row = saved["epoch_boundary"][name]
        waits = row["waits_ms"]
        assert row["epochs"] == len(waits) == 3 and row["batches_per_epoch"] == 24 // 4
        assert all(len(epoch) == 6 and min(epoch) > 0 for epoch in waits)
        assert row["median_wait_ms"] == pytest.approx(np.median(waits[1:]))
        assert [b["epoch"] for b in row["boundaries"]] == [1, 2]
        for b in row["boundaries"]:
            window = waits[b["epoch"] - 1][-3:] + waits[b["epoch"]][:2]
            assert b["max_wait_ms"] == max(window)
        assert row["max_boundary_wait_ms"] == max(b["max_wait_ms"] for b in row["boundaries"])
        assert row["ratio_to_median"] == pytest.approx(
            row["max_boundary_wait_ms"] / row["median_wait_ms"])
        assert row["within_twice_median"] == (row["ratio_to_median"] <= 2.0)
    summary = saved["summary"]
    assert summary["boundary_ratio_to_median"] == \
        saved["epoch_boundary"]["relabel_loader"]["ratio_to_median"]
    assert "epoch boundary over 2 boundaries" in loader_bench.boundary_line(
        saved["epoch_boundary"]["relabel_loader"])


def test_reuses_the_cache(bench_run):
    _, cache, _ = bench_run
    manifest = json.loads((cache / "manifest.json").read_text())
    stamp = (cache / "labelmaps.h5").stat().st_mtime_ns
    again = jpegs.prepare_dataset(cache, 24, "synthetic", 0, workers=1)
    assert again == manifest
    assert (cache / "labelmaps.h5").stat().st_mtime_ns == stamp


def test_pt_files_hold_the_store_maps(bench_run):
    _, cache, _ = bench_run
    store = dali_relabel.LabelMapStore.open(cache / "labelmaps.h5")
    assert len(store) == 24
    for row, relative in enumerate(store.paths):
        score_map = torch.load(cache / "relabel" / official.pt_path(relative))
        assert score_map.shape == (2, 5, 15, 15) and score_map.dtype == torch.float32
        assert torch.equal(score_map[0], store.values[row].float())
        assert torch.equal(score_map[1].long(), store.indices[row].long())


def test_official_targets_match_reference_label_pooling(bench_run):
    _, cache, _ = bench_run
    torch.manual_seed(0)
    loader = official.official_loader(str(cache / "images"), str(cache / "relabel"), 4,
                                      workers=0, device=torch.device("cpu"))
    images, _, coords, label_maps = next(iter(loader))
    assert images.shape == (4, 3, 224, 224)
    boxes = official.official_boxes(coords)
    assert boxes.shape == (4, 4)
    assert bool(((boxes >= 0) & (boxes <= 1)).all())
    assert bool((boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all())
    targets = official.official_targets(label_maps, boxes, torch.device("cpu"))
    expected = dali_relabel.reference_label_pooling(
        label_maps[:, 0], label_maps[:, 1].long(), boxes, num_classes=1000)
    assert_close(targets, expected, atol=1e-6, rtol=1e-5)
    sparse = dali_relabel.label_pooling(label_maps[:, 0], label_maps[:, 1].long(), boxes,
                                        num_classes=1000)
    assert_close(sparse, expected, atol=1e-5, rtol=1e-4)
