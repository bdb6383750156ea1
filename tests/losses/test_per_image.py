"""Tests for flatten_gt_inds: per-image assignment lists -> isr_p's flat gt_inds / img_inds."""

import pytest
import torch

from pisa.losses import flatten_gt_inds, isr_p
from .test_isr_p import delta_decode, random_batch

# Two images, C = 3 (label 3 = background). Image 0: samples 0..3, positives at 0 (GT 2) and 2 (GT 0);
# image 1: samples 4..6, positives at 5 (GT 1) and 6 (GT 0).
LABELS = torch.tensor([0, 3, 1, 3, 3, 2, 0])
EXPECTED_GT = [2, -1, 0, -1, -1, 1, 0]  # -1 on every non-positive
EXPECTED_IMG = [0, 0, 0, 0, 1, 1, 1]


def test_per_sample_lists_torchvision_matcher_style():
    # Matcher output: the matched GT of every anchor; -1 (below low) / -2 (between) for non-positives.
    per_sample = [torch.tensor([2, -1, 0, -2]), torch.tensor([-1, 1, 0])]
    gt_inds, img_inds = flatten_gt_inds(LABELS, 3, per_sample)
    assert gt_inds.tolist() == EXPECTED_GT and img_inds.tolist() == EXPECTED_IMG
    assert gt_inds.dtype == img_inds.dtype == torch.int64


def test_per_positive_lists_mmdetection_style():
    # pos_assigned_gt_inds: the positives' GT ids in ascending sample order, plus the anchor counts.
    per_positive = [torch.tensor([2, 0]), torch.tensor([1, 0])]
    gt_inds, img_inds = flatten_gt_inds(LABELS, 3, per_positive, num_samples_per_image=[4, 3])
    assert gt_inds.tolist() == EXPECTED_GT and img_inds.tolist() == EXPECTED_IMG
    # Forms may be mixed per image.
    mixed = [torch.tensor([2, 0]), torch.tensor([-1, 1, 0])]
    assert flatten_gt_inds(LABELS, 3, mixed, num_samples_per_image=[4, 3])[0].tolist() == EXPECTED_GT


def test_image_without_positives():
    labels = torch.tensor([3, 3, 1, 3])
    gt_inds, img_inds = flatten_gt_inds(labels, 3, [torch.zeros(0, dtype=torch.long), torch.tensor([4])],
                                        num_samples_per_image=[2, 2])
    assert gt_inds.tolist() == [-1, -1, 4, -1] and img_inds.tolist() == [0, 0, 1, 1]


def test_isr_p_with_flattened_inputs_equals_hand_built():
    # Three images of 30 samples: gt_inds / img_inds from per-positive lists give the same weights
    # as the hand-built flat tensors (isr_p reads positives only, so -1 elsewhere is fine).
    inputs = random_batch(0, 3)
    ref = isr_p(**inputs, num_classes=3, decode=delta_decode)
    pos = inputs["labels"] < 3
    per_positive = [inputs["gt_inds"][i * 30:(i + 1) * 30][pos[i * 30:(i + 1) * 30]] for i in range(3)]
    gt_inds, img_inds = flatten_gt_inds(inputs["labels"], 3, per_positive, num_samples_per_image=[30] * 3)
    assert torch.equal(img_inds, inputs["img_inds"])
    out = isr_p(**dict(inputs, gt_inds=gt_inds, img_inds=img_inds), num_classes=3, decode=delta_decode)
    assert torch.equal(out, ref)


def test_errors_name_the_image_and_what_to_give():
    with pytest.raises(ValueError) as err:
        flatten_gt_inds(LABELS, 3, [torch.tensor([2, 0, 1]), torch.tensor([1, 0])], num_samples_per_image=[4, 3])
    assert str(err.value) == ("flatten_gt_inds: gt_inds_per_image[0] has 3 entries, but image 0 has 4 samples "
                              "and 2 positives; give one GT index per sample (4) or per positive (2)")
    with pytest.raises(ValueError) as err:
        flatten_gt_inds(LABELS, 3, [torch.tensor([2, 0]), torch.tensor([1, 0])])
    assert str(err.value) == ("flatten_gt_inds: the lengths of gt_inds_per_image (one GT index per sample) add "
                              "up to 4 samples, but labels has 7; labels must be the images' samples "
                              "concatenated, image-major")
    with pytest.raises(ValueError, match="num_samples_per_image has 1 entries but gt_inds_per_image has 2"):
        flatten_gt_inds(LABELS, 3, [torch.tensor([2, 0]), torch.tensor([1, 0])], num_samples_per_image=[7])
    with pytest.raises(ValueError) as err:
        flatten_gt_inds(LABELS, 3, [torch.tensor([2, 0]), torch.tensor([-1, 0])], num_samples_per_image=[4, 3])
    assert str(err.value) == ("flatten_gt_inds: image 1 has a positive sample with GT index -1; positives need "
                              "their 0-based GT index (>= 0)")
    with pytest.raises(TypeError) as err:
        flatten_gt_inds(LABELS, 3, [torch.tensor([2.0, 0.0]), torch.tensor([1, 0])], num_samples_per_image=[4, 3])
    assert str(err.value) == ("flatten_gt_inds: gt_inds_per_image[0] must have shape (?,) and an integer dtype; "
                              "got shape (2,), dtype torch.float32")
