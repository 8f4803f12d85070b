"""Mixup and CutMix inside the training loader, with timm's semantics and localized targets.

The parameters follow timm.data.mixup.Mixup (per batch, pair or element; mixup or CutMix by
switch probability; CutMix's lambda corrected to the pasted area) and are planned on the host
with the epoch, seeded by (seed, rank, epoch). Partners are the batch reversed, as timm's
``x.flip(0)``. Mixup blends two images and their targets linearly.

CutMix with ReLabel's localized labels: the pasted rectangle's share of the target is
LabelPooling over exactly the partner's pasted pixels (the rectangle, in the partner's output
crop, mapped through its crop box and flip into its image). The base keeps the rest of its
crop, which is not a rectangle. Approximation: RoIAlign pools (nearly) the area mean of the
map's logits, so the remainder's mean logits are ``(L_crop - share * L_rect) / (1 - share)``,
with L_crop and L_rect the base map's pooled logits over the whole crop and over the pasted
rectangle (mapped into the base image) and `share` the rectangle's fraction of the crop; the
remainder's target is their softmax (or one-hot argmax). The two parts are weighted by area.
Token targets (S > 1) do this per token: a token's bin is a crop of its own, a token outside
the rectangle keeps its target, one inside it takes the partner's, and one the rectangle's
edge crosses is mixed as above. Label modes without localization mix by area, as timm does.

Label smoothing (``smooth_targets``, timm's Mixup's ``label_smoothing``) comes after mixing.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import torch

from dali_relabel import _checks, _transfer
from dali_relabel.augment.draws import PerSample
from dali_relabel.ops.label_pooling import label_pooling
from dali_relabel.ops.sparse_targets import SparseTargets

__all__ = ["MIXUP_MODES", "MixDraws", "Mixer", "Mixing", "check_label_smoothing",
           "crop_to_image", "localized_cutmix_targets", "mixing_fields", "smooth_targets"]

MIXUP_MODES = ("batch", "pair", "elem")


@dataclasses.dataclass(frozen=True)
class MixDraws(PerSample):
    """One epoch's mixing, per sample.

    Attributes:
        lam (ndarray[n]): float32 share of the base (1: not mixed).
        cut (ndarray[n]): bool, mixed by CutMix (else by mixup, where lam < 1).
        box (ndarray[n, 4]): int32 CutMix rectangle (top, left, bottom, right) in pixels of
            the output image; zeros without CutMix.
    """

    lam: np.ndarray
    cut: np.ndarray
    box: np.ndarray

    @classmethod
    def unmixed(cls, n: int) -> MixDraws:
        return cls(lam=np.ones(n, np.float32), cut=np.zeros(n, bool),
                   box=np.zeros((n, 4), np.int32))


@dataclasses.dataclass(frozen=True)
class Mixing:
    """The loader's mixing settings, checked (see ReLabelLoader's arguments).

    Attributes:
        mixup_alpha: Mixup's Beta(alpha, alpha); 0 = no mixup.
        cutmix_alpha: CutMix's Beta(alpha, alpha); 0 = no CutMix (1 when cutmix_minmax).
        cutmix_minmax: CutMix box sides as fractions of the image's, uniform in [min, max),
            instead of drawn from lambda.
        prob: Probability of mixing per batch, pair or element.
        switch_prob: Probability of CutMix instead of mixup when both are on.
        mode: "batch", "pair" or "elem".
    """

    mixup_alpha: float
    cutmix_alpha: float
    cutmix_minmax: Optional[tuple[float, float]]
    prob: float
    switch_prob: float
    mode: str

    @classmethod
    def create(cls, *, mixup_alpha: float, cutmix_alpha: float,
               cutmix_minmax: Optional[Sequence[float]], mixup_prob: float,
               mixup_switch_prob: float, mixup_mode: str, image_size: int) -> Mixing:
        mixup_alpha = _checks.check_float("mixup_alpha", mixup_alpha, 0.0)
        cutmix_alpha = _checks.check_float("cutmix_alpha", cutmix_alpha, 0.0)
        prob = _checks.check_probability("mixup_prob", mixup_prob)
        switch_prob = _checks.check_probability("mixup_switch_prob", mixup_switch_prob)
        if mixup_mode not in MIXUP_MODES:
            raise ValueError(f"mixup_mode must be one of {MIXUP_MODES}, got {mixup_mode!r}")
        if cutmix_minmax is not None:
            if (not isinstance(cutmix_minmax, Sequence) or len(cutmix_minmax) != 2
                    or not 0.0 <= cutmix_minmax[0] <= cutmix_minmax[1] <= 1.0
                    or int(image_size * cutmix_minmax[0]) >= int(image_size * cutmix_minmax[1])):
                raise ValueError(f"cutmix_minmax must be (min, max) with 0 <= min < max <= 1 "
                                 f"leaving at least one box side at image_size={image_size}, "
                                 f"got {cutmix_minmax!r}")
            cutmix_minmax = (float(cutmix_minmax[0]), float(cutmix_minmax[1]))
            cutmix_alpha = 1.0  # as timm: the box sides come from minmax, not from lambda
        return cls(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                   cutmix_minmax=cutmix_minmax, prob=prob, switch_prob=switch_prob,
                   mode=mixup_mode)

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def plan(self, n: int, batch_size: int, image_size: int,
             rng: np.random.Generator) -> MixDraws:
        """The mixing of `n` samples in batches of `batch_size`."""
        sample = np.arange(n)
        batch, local = np.divmod(sample, batch_size)
        length = np.minimum(batch_size, n - batch * batch_size)
        partner = length - 1 - local
        # What one draw covers: a batch, a pair (an element and its partner) or an element.
        if self.mode == "batch":
            unit, units = batch, -(-n // batch_size)
        elif self.mode == "pair":
            half = max(batch_size // 2, 1)
            unit, units = batch * half + np.minimum(local, partner), -(-n // batch_size) * half
        else:
            unit, units = sample, n
        lam, cut, box = self._draw(units, image_size, rng)
        alone = partner == local  # the middle of an odd batch is its own partner: unmixed
        return MixDraws(lam=np.where(alone, 1.0, lam[unit]).astype(np.float32),
                        cut=cut[unit] & ~alone,
                        box=np.where(alone[:, None], 0, box[unit]).astype(np.int32))

    def _draw(self, units: int, size: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """timm's Mixup parameters for `units` draws on size x size images."""
        mixing = rng.random(units) < self.prob
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = rng.random(units) < self.switch_prob
        else:
            use_cutmix = np.full(units, self.cutmix_alpha > 0)
        lam = np.ones(units)
        if self.mixup_alpha > 0:
            lam = np.where(use_cutmix, lam, rng.beta(self.mixup_alpha, self.mixup_alpha, units))
        if self.cutmix_alpha > 0:
            lam = np.where(use_cutmix, rng.beta(self.cutmix_alpha, self.cutmix_alpha, units), lam)
        lam = np.where(mixing, lam, 1.0)
        cut = mixing & use_cutmix
        if self.cutmix_minmax is not None:  # timm's rand_bbox_minmax
            low, high = (int(size * v) for v in self.cutmix_minmax)
            cut_h, cut_w = rng.integers(low, high, size=(2, units))
            top, left = rng.integers(0, size - cut_h + 1), rng.integers(0, size - cut_w + 1)
            bottom, right = top + cut_h, left + cut_w
        else:  # timm's rand_bbox: sides sqrt(1 - lam) of the image's, centre uniform
            cut_side = (size * np.sqrt(1.0 - np.where(cut, lam, 1.0))).astype(np.int64)
            cy, cx = rng.integers(0, size, size=(2, units))
            top, bottom = (np.clip(cy - cut_side // 2, 0, size),
                           np.clip(cy + (cut_side + 1) // 2, 0, size))
            left, right = (np.clip(cx - cut_side // 2, 0, size),
                           np.clip(cx + (cut_side + 1) // 2, 0, size))
        box = np.where(cut[:, None], np.stack([top, left, bottom, right], axis=1), 0)
        # timm's correct_lam: lambda is the share of the base that is left.
        area = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
        lam = np.where(cut, 1.0 - area / float(size * size), lam)
        return lam, cut, box


def check_label_smoothing(smoothing: float) -> float:
    """ValueError unless 0 <= smoothing < 1 (a float, as timm's --smoothing)."""
    return _checks.check_float("label_smoothing", smoothing, 0.0, 1.0, high_open=True)


def smooth_targets(targets: Union[torch.Tensor, SparseTargets],
                   smoothing: float) -> Union[torch.Tensor, SparseTargets]:
    """Label smoothing of soft targets: ``(1 - smoothing) * t + smoothing / C`` per row.

    timm's Mixup (``mixup_target(..., smoothing)``) smooths each one-hot (off value
    smoothing / C, on value 1 - smoothing + smoothing / C) and then mixes; the map is linear
    and mixing weights sum to 1, so smoothing the mixed targets gives the same targets, for
    soft ones as for one-hots. SparseTargets stay sparse and exact: every unlisted class
    has the fill, which is smoothed like the listed probabilities.

    Args:
        targets (Tensor[*R, C] or SparseTargets with rows R): targets whose rows sum to 1.
        smoothing: In [0, 1); 0 returns `targets` itself.

    Returns:
        The smoothed targets, in the form they came in.
    """
    if smoothing == 0:
        return targets
    if isinstance(targets, SparseTargets):
        off = smoothing / targets.num_classes
        listed = targets.classes >= 0  # unused slots keep probability 0
        probs = torch.where(listed, targets.probs * (1.0 - smoothing) + off, 0.0)
        return SparseTargets(targets.fill * (1.0 - smoothing) + off, targets.classes, probs,
                             targets.num_classes)
    return targets * (1.0 - smoothing) + smoothing / targets.shape[-1]


def crop_to_image(boxes: torch.Tensor, flip: torch.Tensor, rects: torch.Tensor,
                  vflip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Map rectangles of the output crops to the original images.

    Args:
        boxes (Tensor[M, 4]): the crops (x1, y1, x2, y2), normalized to their images.
        flip (Tensor[M]): bool, crops shown mirrored.
        rects (Tensor[M, 4]): rectangles (u1, v1, u2, v2) of the output images as shown
            (after the flips), normalized to them.
        vflip (Tensor[M], optional): bool, crops shown upside down.

    Returns:
        Tensor[M, 4]: each rectangle as a box of its original image.
    """
    u1, v1, u2, v2 = rects.unbind(1)
    if vflip is not None:
        v1, v2 = torch.where(vflip, 1.0 - v2, v1), torch.where(vflip, 1.0 - v1, v2)
    left, right = torch.where(flip, 1.0 - u2, u1), torch.where(flip, 1.0 - u1, u2)
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return torch.stack([boxes[:, 0] + left * width, boxes[:, 1] + v1 * height,
                        boxes[:, 0] + right * width, boxes[:, 1] + v2 * height], dim=1)


def localized_cutmix_targets(values: torch.Tensor, indices: torch.Tensor, *,
                             boxes: torch.Tensor, flip: torch.Tensor,
                             sample_index: torch.Tensor, partner_boxes: torch.Tensor,
                             partner_flip: torch.Tensor, partner_index: torch.Tensor,
                             rects: torch.Tensor, num_classes: int,
                             single: bool = False, vflip: Optional[torch.Tensor] = None,
                             partner_vflip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Targets of crops into which `rects` of their partners' crops were pasted.

    Args:
        values (Tensor[N, K, H, W]), indices (Tensor[N, K, H, W]): the label-map store.
        boxes (Tensor[M, 4]), flip (Tensor[M]), sample_index (Tensor[M]): the base crops
            (normalized boxes, mirrored or not) and their store rows.
        partner_boxes, partner_flip, partner_index: the same for the partners.
        rects (Tensor[M, 4]): the pasted rectangles (u1, v1, u2, v2), normalized to the
            output image as shown.
        num_classes: C.
        single: one-hot argmax targets ("localized_single") instead of softmax.
        vflip, partner_vflip (Tensor[M], optional): crops shown upside down.

    Returns:
        Tensor[M, C]: float32 targets, each summing to 1.
    """
    share = ((rects[:, 2] - rects[:, 0]) * (rects[:, 3] - rects[:, 1]))[:, None]
    kind = "argmax" if single else "softmax"
    pool = functools.partial(label_pooling, values, indices, num_classes=num_classes,
                             check_inputs=False)
    pasted = pool(crop_to_image(partner_boxes, partner_flip, rects, partner_vflip),
                  sample_index=partner_index, mode=kind)
    whole = pool(boxes, sample_index=sample_index, mode="logits")
    covered = pool(crop_to_image(boxes, flip, rects, vflip), sample_index=sample_index,
                   mode="logits")
    kept = torch.where(share < 1.0, share, 0.0)  # a whole paste leaves no remainder to pool
    remainder = (whole - kept * covered) / (1.0 - kept)
    if single:
        base = torch.zeros_like(remainder).scatter_(1, remainder.argmax(1, keepdim=True), 1.0)
    else:
        base = remainder.softmax(dim=1)
    return (1.0 - share) * base + share * pasted


def mixing_fields(draws: Optional[MixDraws], n: int, image_size: int,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """ReLabelBatch's mixing fields of a batch of `n` on `device`: lam, cutmix, cut_box
    ((x1, y1, x2, y2) normalized to the output image as shown) and partner; from the batch's
    draws, or for a batch left unmixed (`draws` None)."""
    if draws is None:
        draws = MixDraws.unmixed(n)
    cut_box = (draws.box[:, [1, 0, 3, 2]] / np.float32(image_size)).astype(np.float32)
    fields = dict(lam=draws.lam, cutmix=draws.cut, cut_box=cut_box,
                  partner=np.arange(n)[::-1])
    return {name: _transfer.to_device(value, device) for name, value in fields.items()}


def _token_bins(size: int) -> np.ndarray:
    """The S*S token bins (u1, v1, u2, v2) of an output image as shown, row by row."""
    edges = np.arange(size + 1) / size
    v, u = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    return np.stack([edges[u], edges[v], edges[u + 1], edges[v + 1]], axis=-1).reshape(-1, 4)


class Mixer:
    """Mixes a batch as planned: images on the device, targets by label mode.

    Args:
        targets: The loader's target maker (store, device, label mode, output size, timer).
        image_size: Side of the output images.
    """

    def __init__(self, targets: Any, image_size: int) -> None:
        self._targets = targets
        self._size = image_size
        self._localized = targets.label_mode.startswith("localized")
        self._bins = _token_bins(targets.output_size)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, boxes: torch.Tensor,
                 flips: torch.Tensor, rows: torch.Tensor, draws: MixDraws,
                 vflips: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed images and targets (boxes, flips, rows and vflips on the CPU, the rest on
        the device); `draws` are this batch's."""
        lam, cut, box = draws.lam, draws.cut, draws.box
        localized_cut = cut if self._localized else np.zeros_like(cut)
        if (lam == 1.0).all():
            return images, targets
        device = images.device
        partners, mixed = images.flip(0), images
        blend = np.where(cut, 1.0, lam).astype(np.float32)  # mixup's share of the base
        if (blend < 1.0).any():
            w = _transfer.to_device(blend, device).to(images.dtype).view(-1, 1, 1, 1)
            mixed = images * w + partners * (1 - w)
        if cut.any():
            spans = _transfer.to_device(box, device)
            top, left, bottom, right = (spans[:, i, None] for i in range(4))
            pixels = torch.arange(self._size, device=device)
            inside = (((pixels >= top) & (pixels < bottom))[:, None, :, None]
                      & ((pixels >= left) & (pixels < right))[:, None, None, :])
            mixed = torch.where(inside, partners, mixed)
        # Targets mix by area, CutMix's too, except where they are localized.
        weight = np.where(localized_cut, 1.0, lam).astype(np.float32)
        w = _transfer.to_device(weight, device).view(-1, *([1] * (targets.dim() - 1)))
        mixed_targets = targets * w + targets.flip(0) * (1 - w)
        if localized_cut.any():
            with self._targets.timer:
                mixed_targets = self._localized_cutmix(targets, mixed_targets, boxes, flips,
                                                       rows, localized_cut, box, vflips)
        return mixed, mixed_targets

    def _localized_cutmix(self, targets: torch.Tensor, mixed: torch.Tensor, boxes: torch.Tensor,
                          flips: torch.Tensor, rows: torch.Tensor, cut: np.ndarray,
                          box: np.ndarray, vflips: Optional[torch.Tensor]) -> torch.Tensor:
        """CutMix samples' targets token by token: outside the rectangle the base's, inside
        the partner's, and where its edge crosses a token pooled by localized_cutmix_targets."""
        b, tokens = len(boxes), len(self._bins)
        device = targets.device
        rects = box[:, [1, 0, 3, 2]] / self._size  # (u1, v1, u2, v2)
        base = np.flatnonzero(cut)
        # Each CutMix token: the rectangle's part of its bin, relative to the bin.
        bins = np.tile(self._bins, (len(base), 1))
        rect = np.repeat(rects[base], tokens, axis=0)
        low, high = np.maximum(rect[:, :2], bins[:, :2]), np.minimum(rect[:, 2:], bins[:, 2:])
        part = np.clip(high - low, 0.0, None)
        share = part.prod(axis=1) * tokens
        sample = np.repeat(base, tokens)
        token = np.tile(np.arange(tokens), len(base))
        flat_targets, flat_mixed = targets.reshape(b * tokens, -1), mixed.reshape(b * tokens, -1)
        whole = share >= 1.0 - 1e-6
        partner = b - 1 - sample
        if whole.any():
            dst = _transfer.to_device(sample[whole] * tokens + token[whole], device)
            src = _transfer.to_device(partner[whole] * tokens + token[whole], device)
            flat_mixed[dst] = flat_targets[src]
        edge = (share > 1e-6) & ~whole
        if edge.any():
            relative = (np.concatenate([low[edge], high[edge]], axis=1)
                        - bins[edge][:, [0, 1, 0, 1]]) * self._targets.output_size
            dst = _transfer.to_device(sample[edge] * tokens + token[edge], device)
            flat_mixed[dst] = self._edge_targets(boxes, flips, rows, sample[edge],
                                                 partner[edge], bins[edge], relative, vflips)
        return flat_mixed.view_as(mixed)

    def _edge_targets(self, boxes: torch.Tensor, flips: torch.Tensor, rows: torch.Tensor,
                      sample: np.ndarray, partner: np.ndarray, bins: np.ndarray,
                      relative: np.ndarray, vflips: Optional[torch.Tensor]) -> torch.Tensor:
        """localized_cutmix_targets of the tokens the rectangle's edge crosses (each token's
        bin mapped into its image is the crop, `relative` the pasted part of it)."""
        maker, device = self._targets, self._targets.device
        store = maker.store
        boxes, flips = _transfer.to_device(boxes, device), _transfer.to_device(flips, device)
        if maker.fused_gather:
            values, indices, index = store.values, store.indices, _transfer.to_device(rows, device)
        else:  # the batch's rows (partners are in the batch) gathered on the host
            values, indices = (_transfer.to_device(torch.index_select(data, 0, rows), device)
                               for data in (store.values, store.indices))
            index = torch.arange(len(rows), device=device)
        sample, partner = _transfer.to_device(sample, device), _transfer.to_device(partner, device)
        bins = _transfer.to_device(bins.astype(np.float32), device)
        up = down = None
        if vflips is not None:
            vflips = _transfer.to_device(vflips, device)
            up, down = vflips[sample], vflips[partner]
        return localized_cutmix_targets(
            values, indices,
            boxes=crop_to_image(boxes[sample], flips[sample], bins, up), flip=flips[sample],
            sample_index=index[sample],
            partner_boxes=crop_to_image(boxes[partner], flips[partner], bins, down),
            partner_flip=flips[partner], partner_index=index[partner],
            rects=_transfer.to_device(relative.astype(np.float32), device),
            num_classes=store.num_classes, single=maker.label_mode == "localized_single",
            vflip=up, partner_vflip=down)
