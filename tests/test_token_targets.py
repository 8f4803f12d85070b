"""Token targets end to end: ReLabelLoader(sparse_targets=True) against the dense loader,
train/run.py's token labeling (--token-targets) on a ViT over the tiny synthetic dataset, and
benchmarks/token_targets_bench.py on small sizes."""

import pytest
import torch
from torch.testing import assert_close

from dali_relabel import ReLabelLoader, SparseTargets, reference_label_pooling
from dali_relabel.tools.synthetic import make_synthetic_imagenet

import run
from token_labeling import TokenLabelingModel, create_token_model

import token_targets_bench


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_synthetic_imagenet(tmp_path_factory.mktemp("synthetic"), num_classes=4,
                                   train_per_class=8, val_per_class=2, topk=3,
                                   image_size=(40, 64), progress=False)


@pytest.mark.parametrize("label_mode", ["localized_multi", "global_single"])
def test_loader_sparse_targets_equal_the_dense_ones(tiny, label_mode):
    kwargs = dict(device="cpu", image_size=32, output_size=3, label_mode=label_mode, seed=3,
                  return_meta=True, num_threads=1)
    dense = list(ReLabelLoader(tiny.train_root, tiny.labelmaps, 8, **kwargs))
    loader = ReLabelLoader(tiny.train_root, tiny.labelmaps, 8, sparse_targets=True,
                           crop_targets=True, **kwargs)
    store = loader.store
    for want, batch in zip(dense, loader):
        assert isinstance(batch.targets, SparseTargets) and batch.targets.fill.shape == (8, 9)
        assert_close(batch.targets.dense(), want.targets, atol=1e-6, rtol=0)
        # The class token's target: the crop's own, pooled at S = 1 from the same box.
        mode = "localized_multi" if label_mode == "localized_multi" else "global_single"
        boxes = batch.boxes if mode == "localized_multi" else torch.tensor(
            [[0.0, 0.0, 1.0, 1.0]]).expand(8, 4)
        crop = reference_label_pooling(store.values, store.indices, boxes,
                                       num_classes=store.num_classes,
                                       sample_index=batch.sample_index,
                                       mode="softmax" if mode == "localized_multi" else "argmax")
        assert batch.crop_targets.shape == (8, store.num_classes)
        assert_close(batch.crop_targets, crop, atol=1e-5, rtol=0)


def demo_args(tiny, tmp_path, *extra):
    return ["--data", tiny.train_root, "--labelmaps", tiny.labelmaps, "--val-data",
            tiny.val_root, "--model", "vit_tiny_patch16_224", "--image-size", "64",
            "--val-resize", "72", "--batch-size", "8", "--threads", "1", "--epochs", "1",
            "--opt", "adamw", "--output", str(tmp_path / "run"), *extra]


def test_one_epoch_of_token_labeling_on_a_vit(tiny, tmp_path):
    record = run.main(demo_args(tiny, tmp_path, "--token-targets", "4"))
    assert torch.isfinite(torch.tensor(record["train_loss"]))
    assert 0 <= record["val_top1"] <= 100 and record["label_pooling_ms"] > 0
    # The saved model is the plain timm model (the token head is its own head).
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert "head.weight" in state["model"]


def test_token_model_gives_class_and_patch_token_logits():
    """Class logits as the model's own; token logits are the patch tokens through its head."""
    model = create_token_model("vit_tiny_patch16_224", token_targets=4, image_size=64,
                               num_classes=4).eval()
    images = torch.randn(2, 3, 64, 64)
    logits, tokens = TokenLabelingModel(model)(images)
    assert_close(logits, model(images))
    features = model.forward_features(images)
    assert tokens.shape == (2, 16, 4)
    assert_close(tokens, model.head(features[:, 1:]))


@pytest.mark.parametrize("extra, message", [
    (["--token-targets", "5"], "--token-targets 5: --model vit_tiny_patch16_224 at "
                               "--image-size 64 has a 4 x 4 token grid; pass --token-targets 4"),
    (["--token-targets", "4", "--model", "resnet10t"], "needs a ViT-style timm model"),
    (["--token-targets", "4", "--cutmix-prob", "0.5"], "does not combine with --cutmix-prob"),
    (["--token-targets", "-1"], "--token-targets must be >= 0"),
    (["--token-targets", "4", "--label-mode", "global_multi"],
     "--token-targets with --label-mode global_multi"),
])
def test_bad_token_options_are_named(tiny, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        run.main(demo_args(tiny, tmp_path, *extra))


def test_benchmark_runs_and_writes_its_results(tmp_path):
    result = token_targets_bench.main(["--configs", "4x50,2x40000", "--output-size", "3",
                                       "--repeats", "1", "--max-seconds", "0",
                                       "--out", str(tmp_path)])
    assert (tmp_path / "token_targets_bench.json").exists()
    assert (tmp_path / "token_targets_bench.png").exists()
    small, many = result["rows"]
    assert small["dense_bytes"] == 4 * 9 * 50 * 4 and many["sparse_bytes"] < many["dense_bytes"]
    for key in ("sparse_step_ms", "dense_step_ms", "sparse_targets_ms", "dense_targets_ms"):
        assert small[key] > 0
