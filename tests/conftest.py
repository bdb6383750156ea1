"""Suite-wide settings and shared fixtures.

One intra-op thread per test process: tests run tiny tensors, where a second thread buys nothing
and, on a loaded 2-core machine, oversubscription slows convolutions by an order of magnitude.
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_mask_rcnn(tmp_path_factory):
    """A tiny Mask R-CNN (``test_export_two_stage.TINY_MASK``) trained for 32 iterations on 16 demo
    images (96 px), up to 100 detections per val image (score_thr 0): ``(checkpoint, --set args)``
    for ``configs/demo/mask_rcnn_r18_demo.yaml``. Shared by the export and precision tests."""
    from pisa import train as pisa_train
    from pisa.data.synthetic import ensure_demo_dataset
    from test_export_two_stage import MASK, TINY_MASK

    paths = ensure_demo_dataset(tmp_path_factory.mktemp("shapes") / "demo", num_train=16, num_val=4)
    work = tmp_path_factory.mktemp("run")
    sets = [f"data.train={{type: coco, ann_file: {paths['train_ann']}, img_dir: {paths['train_img_dir']}, "
            "with_masks: true}", f"data.val={{type: coco, ann_file: {paths['val_ann']}, img_dir: {paths['val_img_dir']}}}",
            "data.train_transforms.scales=[[96,96]]", "data.test_transforms.scales=[[96,96]]",
            "data.batch_size=4", "data.workers=0", "schedule.epochs=8", "schedule.steps=[]",
            "schedule.warmup_iters=4", "optim.ref_batch=4", "train.eval_interval=0", "train.ckpt_interval=0",
            "train.log_interval=8", *TINY_MASK, "model.roi_head.test.score_thr=0.0", f"train.work_dir={work}"]
    args = [arg for s in sets for arg in ("--set", s)]
    pisa_train.main([MASK, *args])
    return work / "latest.pth", args
