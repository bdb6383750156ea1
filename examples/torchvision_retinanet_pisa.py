"""PISA (ISR-P + CARL) in your own training step for torchvision's RetinaNet.

The model, anchors, matcher and box coder are torchvision's; only the loss is written here, with
``pisa.losses``:

1. run torchvision's transform, backbone and head, and match anchors with ``model.proposal_matcher``;
2. flatten everything to ``(N, ...)`` over the batch (image-major, as the head outputs are);
3. ``isr_p`` returns new classification weights for the positives (prime samples get more);
4. focal loss with those weights, SmoothL1 box loss, and ``carl_loss`` next to it.

A small RetinaNet (ResNet-18 FPN, random weights, tiny random images) keeps this runnable on a CPU in
seconds::

    python examples/torchvision_retinanet_pisa.py --steps 5 --image-size 128
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import box_iou
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from pisa.losses import carl_loss, isr_p, sigmoid_focal_loss, smooth_l1_loss

NUM_CLASSES = 3
BOX_BETA = 0.11  # SmoothL1 beta of PISA RetinaNet (regression loss and CARL)


def build_model(num_classes: int = NUM_CLASSES, image_size: int = 128) -> RetinaNet:
    """A small torchvision RetinaNet: ResNet-18 + FPN (P3-P7), random init, fixed square input size."""
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                   returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    return RetinaNet(backbone, num_classes=num_classes, min_size=image_size, max_size=image_size)


def random_batch(batch_size: int, image_size: int, num_classes: int, generator: torch.Generator):
    """Random images and targets: 1-3 boxes of 24-56 px per image, labels in ``0..num_classes-1``."""
    images, targets = [], []
    for _ in range(batch_size):
        n = int(torch.randint(1, 4, (1,), generator=generator))
        size = 24 + torch.rand(n, 2, generator=generator) * 32
        xy = torch.rand(n, 2, generator=generator) * (image_size - size)
        targets.append({"boxes": torch.cat([xy, xy + size], dim=1),
                        "labels": torch.randint(0, num_classes, (n,), generator=generator)})
        images.append(torch.rand(3, image_size, image_size, generator=generator))
    return images, targets


def match_anchors(model: RetinaNet, anchors: Tensor, target: dict, num_classes: int):
    """Per-image targets in pisa's convention (background label = ``num_classes``).

    Returns ``labels (A,)``, ``label_weights (A,)`` (0 for anchors between the IoU thresholds),
    ``bbox_targets (A, 4)`` encoded deltas and ``gt_inds (A,)`` (GT index, read for positives only).
    """
    num_anchors = anchors.shape[0]
    if target["boxes"].numel() == 0:  # no GT: every anchor is background
        zeros = torch.zeros(num_anchors, dtype=torch.long)
        return zeros + num_classes, torch.ones(num_anchors), torch.zeros(num_anchors, 4), zeros
    matched = model.proposal_matcher(box_iou(target["boxes"], anchors))  # -1 background, -2 ignore
    gt_inds = matched.clamp(min=0)
    labels = torch.where(matched >= 0, target["labels"][gt_inds], torch.full_like(matched, num_classes))
    label_weights = (matched != model.proposal_matcher.BETWEEN_THRESHOLDS).float()
    bbox_targets = model.box_coder.encode_single(target["boxes"][gt_inds], anchors)
    return labels, label_weights, bbox_targets, gt_inds


def pisa_retinanet_losses(model: RetinaNet, images: list[Tensor], targets: list[dict],
                          num_classes: int = NUM_CLASSES) -> dict[str, Tensor]:
    """RetinaNet training losses with ISR-P and CARL, from torchvision's own head outputs."""
    image_list, targets = model.transform(images, targets)
    features = list(model.backbone(image_list.tensors).values())
    head = model.head(features)  # cls_logits (B, A, C), bbox_regression (B, A, 4)
    anchors = model.anchor_generator(image_list, features)  # B x (A, 4)

    per_image = [match_anchors(model, a, t, num_classes) for a, t in zip(anchors, targets)]
    labels, label_weights, bbox_targets, gt_inds = (torch.cat(parts) for parts in zip(*per_image))
    cls_score = head["cls_logits"].flatten(0, 1)
    bbox_pred = head["bbox_regression"].flatten(0, 1)
    priors = torch.cat(anchors)
    img_inds = torch.arange(len(anchors)).repeat_interleave(anchors[0].shape[0])
    positive = labels < num_classes
    num_pos = torch.zeros(len(anchors)).index_add_(0, img_inds[positive], torch.ones(int(positive.sum())))
    avg_factor = num_pos.clamp(min=1).sum()  # Σ_img max(#pos_img, 1)

    def decode(priors: Tensor, deltas: Tensor) -> Tensor:
        return model.box_coder.decode_single(deltas, priors)

    label_weights = isr_p(cls_score, bbox_pred, labels, label_weights, bbox_targets, priors, gt_inds, img_inds,
                          num_classes=num_classes, decode=decode, k=2.0, bias=0.0)
    focal = sigmoid_focal_loss(cls_score, labels) * label_weights[:, None]
    box = smooth_l1_loss(bbox_pred[positive], bbox_targets[positive], beta=BOX_BETA)
    return {
        "loss_cls": focal.sum() / avg_factor,
        "loss_bbox": box.sum() / avg_factor,
        "loss_carl": carl_loss(cls_score, labels, bbox_pred, bbox_targets, num_classes=num_classes,
                               avg_factor=avg_factor, sigmoid=True, k=1.0, bias=0.2, beta=BOX_BETA),
    }


def main(steps: int = 5, image_size: int = 128, batch_size: int = 2, lr: float = 0.01,
         seed: int = 0) -> tuple[RetinaNet, list[dict[str, float]]]:
    """Train a few SGD steps on random data; returns the model (gradients of the last step kept)
    and the per-step losses."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_model(NUM_CLASSES, image_size).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                                weight_decay=1e-4)
    history = []
    for step in range(steps):
        images, targets = random_batch(batch_size, image_size, NUM_CLASSES, generator)
        losses = pisa_retinanet_losses(model, images, targets)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append({name: value.item() for name, value in losses.items()})
        print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in history[-1].items()))
    return model, history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args()
    main(steps=args.steps, image_size=args.image_size, batch_size=args.batch_size)
