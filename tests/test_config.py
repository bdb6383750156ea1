"""Tests of pisa.config: merging, the one-base rule, --set, schema errors, defaults, shipped configs."""

import argparse
import copy
import glob
import os
import subprocess
import sys

import pytest
import yaml

from pisa import config as C
from pisa.config import ConfigError, apply_overrides, dump, load_config, merge, save, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))


def minimal() -> dict:
    """The smallest valid config: only required keys, synthetic data (no files needed)."""
    return {
        "model": {"type": "retinanet", "num_classes": 3},
        "data": {"train": {"type": "synthetic"}, "val": {"type": "synthetic", "split": "val"}},
        "train": {"work_dir": "work_dirs/x"},
    }


def write(path, data) -> str:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def with_key(dotted: str, value) -> dict:
    """minimal() with one key set (mapping path created as needed)."""
    cfg = minimal()
    *parents, last = dotted.split(".")
    node = cfg
    for name in parents:
        node = node.setdefault(name, {})
    node[last] = value
    return cfg


def error_of(cfg: dict, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        validate(cfg, **kw)
    return str(info.value)


# ----------------------------------------------------------------------------- merge


def test_merge_is_deep_lists_and_null_replace_inputs_untouched():
    base = {"a": {"b": 1, "c": [1, 2, 3], "d": {"e": 1}}, "f": 1}
    child = {"a": {"c": [9], "d": None}, "g": {"h": 2}}
    saved = copy.deepcopy((base, child))
    assert merge(base, child) == {"a": {"b": 1, "c": [9], "d": None}, "f": 1, "g": {"h": 2}}
    assert (base, child) == saved


def test_merge_replaces_a_mapping_when_its_variant_type_changes():
    base = {"data": {"train": {"type": "coco", "ann_file": "a.json", "img_dir": "d"}}}
    # The coco keys would be unknown for a synthetic set, so the mapping is replaced, not merged ...
    out = merge(base, {"data": {"train": {"type": "synthetic"}}})
    assert out["data"]["train"] == {"type": "synthetic"}
    # ... while the same type, or a type of a non-variant mapping (backbone), merges as usual.
    assert merge(base, {"data": {"train": {"type": "coco", "img_dir": "e"}}})["data"]["train"] == {
        "type": "coco", "ann_file": "a.json", "img_dir": "e"}
    backbone = merge({"model": {"backbone": {"type": "resnet50", "frozen_stages": 1}}},
                     {"model": {"backbone": {"type": "resnet101"}}})["model"]["backbone"]
    assert backbone == {"type": "resnet101", "frozen_stages": 1}


# ----------------------------------------------------------------------------- files and the base rule


def test_child_merges_over_base_relative_to_its_own_file(tmp_path, monkeypatch):
    (tmp_path / "bases").mkdir()
    base = minimal()
    base["optim"] = {"lr": 0.02, "momentum": 0.8}
    write(tmp_path / "bases" / "b.yaml", base)
    child = write(tmp_path / "child.yaml", {"base": "bases/b.yaml", "optim": {"lr": 0.005}})
    monkeypatch.chdir("/")  # base is found relative to the child file, not the current directory
    cfg = load_config(child)
    assert cfg["optim"]["lr"] == 0.005 and cfg["optim"]["momentum"] == 0.8
    assert cfg["model"]["num_classes"] == 3 and "base" not in cfg


def test_base_of_a_base_is_an_error(tmp_path):
    write(tmp_path / "c.yaml", minimal())
    write(tmp_path / "b.yaml", {"base": "c.yaml"})
    child = write(tmp_path / "a.yaml", {"base": "b.yaml"})
    with pytest.raises(ConfigError, match="only one level"):
        load_config(child)


def test_missing_config_or_base_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    child = write(tmp_path / "a.yaml", {"base": "missing.yaml"})
    with pytest.raises(ConfigError, match="names base 'missing.yaml', which does not exist"):
        load_config(child)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "model: [1, 2\n"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path / "list.yaml", "- 1\n"))


def test_exponent_floats_in_yaml_are_numbers(tmp_path):
    # Plain PyYAML reads 1e-4 as the string "1e-4"; the loader follows YAML 1.2 instead.
    path = write(tmp_path / "a.yaml", dump(minimal()) + "optim:\n  lr: 1e-4\n  weight_decay: 5E-4\n")
    cfg = load_config(path)
    assert cfg["optim"]["lr"] == 1e-4 and cfg["optim"]["weight_decay"] == 5e-4


# ----------------------------------------------------------------------------- defaults and types


def test_defaults_fill_every_optional_key():
    cfg = validate(minimal())
    assert cfg["optim"] == {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0001, "ref_batch": 16,
                            "clip_grad": None}
    assert cfg["pisa"] is None and cfg["load_from"] is None
    assert cfg["model"]["backbone"]["pretrained"] is None  # never download unless asked
    assert cfg["data"]["train"] == {"type": "synthetic", "split": "train", "root": None,
                                    "filter_empty": False, "with_masks": False, "on_error": "raise"}
    assert cfg["train"]["amp"] is None and cfg["schedule"]["max_iters"] is None
    # An empty optional block switches the feature on with its defaults.
    pisa = validate(with_key("pisa", {"isr_p": {}}))["pisa"]
    assert pisa == {"isr_p": {"k": 2.0, "bias": 0.0}, "carl": None, "isr_n": None,
                    "compat": {"legacy_gt_offset": False, "legacy_float_keys": False}}


def test_ints_become_floats_where_floats_are_expected():
    cfg = validate(with_key("optim.lr", 1))
    assert cfg["optim"]["lr"] == 1.0 and isinstance(cfg["optim"]["lr"], float)
    ratios = validate(with_key("model.anchors.ratios", [1, 2]))["model"]["anchors"]["ratios"]
    assert all(isinstance(r, float) for r in ratios)


@pytest.mark.parametrize("dotted, value, expected", [
    ("optim.lr", "abc", "config key 'optim.lr' must be a number, got 'abc' (a string)"),
    ("schedule.epochs", 12.5, "config key 'schedule.epochs' must be an integer, got 12.5"),
    ("train.seed", True, "config key 'train.seed' must be an integer, got True"),
    ("model.backbone.norm_eval", "yes", "'model.backbone.norm_eval' must be true or false"),
    ("optim.clip_grad", 35, "'optim.clip_grad' must be a mapping, got 35"),
    ("model.backbone", None, "'model.backbone' must be a mapping, got None (null)"),
    ("data.train_transforms.scales", [[1333]], "'data.train_transforms.scales[0]' must be a list of 2 items"),
    ("data.train_transforms.scales", [[1333, "x"]],
     "'data.train_transforms.scales[0][1]' must be an integer"),
    ("model.backbone.frozen_stages", 5, "'model.backbone.frozen_stages' must be >= -1 and <= 4, got 5"),
    ("optim.lr", 0, "'optim.lr' must be > 0.0, got 0.0"),
    ("schedule.steps", [11, 8], "'schedule.steps' must be increasing epoch numbers, got [11, 8]"),
    ("model.anchors.strides", [], "'model.anchors.strides' must be a list of at least 1 item(s), got []"),
])
def test_wrong_types_and_ranges_name_key_expectation_and_value(dotted, value, expected):
    assert expected in error_of(with_key(dotted, value))


# ----------------------------------------------------------------------------- unknown keys and names


@pytest.mark.parametrize("dotted, suggestion", [
    ("optm", "optim"),
    ("optim.lr_rate", "optim.lr"),
    ("model.backbone.frozen_stage", "model.backbone.frozen_stages"),
    ("model.head.stacked_conv", "model.head.stacked_convs"),
    ("data.train.splt", "data.train.split"),
    ("pisa.isr_p.bais", "pisa.isr_p.bias"),
    ("model.lr", "optim.lr"),  # right name, wrong section
])
def test_misspelled_keys_at_every_depth_suggest_the_closest(dotted, suggestion):
    cfg = with_key(dotted, 1)
    if dotted.startswith("pisa.isr_p"):
        cfg["pisa"]["isr_p"]["k"] = 2.0
    assert error_of(cfg) == f"config key '{dotted}' is not known; did you mean '{suggestion}'?"


def test_unknown_key_without_a_close_match_lists_the_valid_keys():
    msg = error_of(with_key("optim.zzz", 1))
    assert msg.startswith("config key 'optim.zzz' is not known; valid keys under 'optim': lr, momentum")


@pytest.mark.parametrize("dotted, value, valid", [
    ("model.type", "retina", "valid names: retinanet"),
    ("data.val.type", "lvis", "valid names: coco, synthetic"),
    ("model.backbone.type", "resnet55",
     "valid values: resnet18, resnet34, resnet50, resnet101, resnext101_32x4d (did you mean 'resnet50'?)"),
    ("train.amp", "bf32", "valid values: null, bf16, fp16"),
    ("model.loss_bbox.type", "giou", "valid values: l1, smooth_l1"),
])
def test_unknown_names_list_the_valid_names(dotted, value, valid):
    msg = error_of(with_key(dotted, value))
    assert repr(value) in msg or f"'{value}'" in msg
    assert valid in msg


def test_num_classes_is_auto_when_absent_and_refuses_other_words():
    cfg = minimal()
    del cfg["model"]["num_classes"]
    assert validate(cfg)["model"]["num_classes"] == "auto"  # resolved from the training set at run start
    assert validate(with_key("model.num_classes", "auto"))["model"]["num_classes"] == "auto"
    assert "valid values: auto" in error_of(with_key("model.num_classes", "many"))
    assert "must be >= 1" in error_of(with_key("model.num_classes", 0))


@pytest.mark.parametrize("remove, missing", [
    (("train", "work_dir"), "train.work_dir"),
    (("data", "val"), "data.val"),
    (("model", "type"), "model.type"),
])
def test_missing_required_keys(remove, missing):
    cfg = minimal()
    del cfg[remove[0]][remove[1]]
    assert f"config key '{missing}' is required" in error_of(cfg)


def test_missing_coco_keys_and_a_base_left_in_validate():
    assert "'data.train.ann_file' is required" in error_of(with_key("data.train", {"type": "coco"}))
    assert "merge it with load_config" in error_of(with_key("base", "b.yaml"))


# ----------------------------------------------------------------------------- files named by keys


def coco_cfg(tmp_path) -> dict:
    ann = tmp_path / "ann.json"
    ann.write_text("{}")
    cfg = minimal()
    cfg["data"]["train"] = {"type": "coco", "ann_file": str(ann), "img_dir": str(tmp_path)}
    return cfg


@pytest.mark.parametrize("dotted, kind", [
    ("data.train.ann_file", "file"),
    ("data.train.img_dir", "dir"),
    ("model.backbone.pretrained", "file"),
    ("load_from", "file"),
])
def test_missing_files_name_key_and_path(tmp_path, dotted, kind):
    cfg = coco_cfg(tmp_path)
    validate(cfg)  # the existing files pass
    *parents, last = dotted.split(".")
    node = cfg
    for name in parents:
        node = node.setdefault(name, {})
    node[last] = "no/such/thing"
    msg = error_of(cfg)
    assert msg.startswith(f"config key '{dotted}': {kind} 'no/such/thing' does not exist")
    assert f"--set {dotted}=PATH" in msg
    validate(cfg, check_paths=False)
    validate(cfg, check_paths=["data.val"])  # only the listed prefixes are checked
    assert "does not exist" in error_of(cfg, check_paths=[dotted.split(".")[0]])


def test_pretrained_keyword_is_not_a_path():
    assert validate(with_key("model.backbone.pretrained", "torchvision"))["model"]["backbone"][
        "pretrained"] == "torchvision"


# ----------------------------------------------------------------------------- --set


def test_set_parses_values_as_yaml():
    cfg = apply_overrides(minimal(), [
        "optim.lr=0.02", "optim.weight_decay=1e-3", "schedule.epochs=3",
        "data.train_transforms.scales=[[320,320],[256, 256]]", "train.amp=bf16",
        "optim.clip_grad={max_norm: 35}", "pisa.isr_p={k: 3, bias: 0.1}", "pisa.carl.k=2",
    ])
    cfg = validate(cfg)
    assert cfg["optim"]["lr"] == 0.02 and cfg["optim"]["weight_decay"] == 0.001
    assert cfg["schedule"]["epochs"] == 3 and cfg["train"]["amp"] == "bf16"
    assert cfg["data"]["train_transforms"]["scales"] == [[320, 320], [256, 256]]
    assert cfg["optim"]["clip_grad"] == {"max_norm": 35.0, "norm_type": 2.0}
    assert cfg["pisa"]["isr_p"] == {"k": 3.0, "bias": 0.1} and cfg["pisa"]["carl"] == {"k": 2.0, "bias": 0.2}


def test_set_null_and_later_items_win():
    cfg = validate(apply_overrides(with_key("pisa", {"carl": {}}), ["pisa=null"]))
    assert cfg["pisa"] is None
    cfg = validate(apply_overrides(minimal(), ["optim.lr=0.1", "optim.lr=0.2"]))
    assert cfg["optim"]["lr"] == 0.2


def test_set_type_switches_a_dataset_variant(tmp_path):
    cfg = apply_overrides(coco_cfg(tmp_path), ["data.train.type=synthetic"])
    assert validate(cfg)["data"]["train"]["type"] == "synthetic"
    assert "ann_file" not in validate(cfg)["data"]["train"]


@pytest.mark.parametrize("item, expected", [
    ("optim.lr_rate=0.1", "--set optim.lr_rate=0.1: config key 'optim.lr_rate' is not known; "
                          "did you mean 'optim.lr'?"),
    ("pisa.isr_p.kk=1", "did you mean 'pisa.isr_p.k'?"),
    ("optim.lr.x=1", "config key 'optim.lr' is a single value, not a mapping"),
    ("optim.lr", "--set expects KEY.PATH=VALUE"),
    ("optim..lr=1", "--set expects KEY.PATH=VALUE"),
    ("optim.lr=", "no value; write 'optim.lr=null'"),
    ("optim.lr=[1,", "not valid YAML"),
])
def test_bad_set_items(item, expected):
    with pytest.raises(ConfigError) as info:
        apply_overrides(minimal(), [item])
    assert expected in str(info.value)


def test_add_config_args_collects_repeated_set():
    parser = argparse.ArgumentParser()
    C.add_config_args(parser)
    assert parser.parse_args([]).overrides == []
    assert parser.parse_args(["--set", "a=1", "--set", "b.c=[2]"]).overrides == ["a=1", "b.c=[2]"]


# ----------------------------------------------------------------------------- shipped configs, dump, CLI


@pytest.mark.parametrize("path", SHIPPED, ids=[os.path.relpath(p, REPO) for p in SHIPPED])
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path, check_paths=False)
    assert cfg["model"]["type"] in C.SCHEMA.keys["model"].options and cfg["train"]["work_dir"]
    name = os.path.basename(path)
    assert (cfg["pisa"] is not None) == name.startswith("pisa_")
    if "x101" in name:
        assert cfg["model"]["backbone"]["type"] == "resnext101_32x4d"


def test_shipped_pisa_config_carries_the_paper_settings():
    path = os.path.join(REPO, "configs/pisa/pisa_retinanet_r50_fpn_1x_coco.yaml")
    cfg = load_config(path, check_paths=False)
    assert cfg["pisa"]["isr_p"] == {"k": 2.0, "bias": 0.0} and cfg["pisa"]["carl"] == {"k": 1.0, "bias": 0.2}
    assert cfg["model"]["loss_bbox"] == {"type": "smooth_l1", "beta": 0.11, "weight": 1.0}
    assert cfg["model"]["backbone"]["frozen_stages"] == 1  # inherited from the base


def test_dump_and_save_round_trip(tmp_path):
    retinanet = os.path.join(REPO, "configs/_base_/retinanet_r18_demo.yaml")
    cfg = load_config(retinanet, ["pisa.isr_p={k: 2}", "optim.lr=1e-5"], check_paths=False)
    path = save(cfg, str(tmp_path / "run"))
    assert path == str(tmp_path / "run" / "config.yaml")
    assert os.listdir(tmp_path / "run") == ["config.yaml"]  # no temp file left behind
    assert load_config(path, check_paths=False) == cfg
    assert "strides: [8, 16, 32, 64, 128]" in dump(cfg)  # scalar lists stay on one line


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pisa.config", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60)


def test_cli_prints_the_resolved_config_and_exits_2_on_errors():
    config = "configs/pisa/pisa_retinanet_r50_fpn_1x_coco.yaml"
    ok = run_cli(config, "--no-check-paths", "--set", "optim.lr=0.02")
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout) == load_config(os.path.join(REPO, config), ["optim.lr=0.02"],
                                                     check_paths=False)
    bad = run_cli(config, "--no-check-paths", "--set", "optim.lr_rate=0.02")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "error: --set optim.lr_rate=0.02: config key 'optim.lr_rate' is not known; did you mean 'optim.lr'?"]


def test_docs_describe_every_key():
    with open(os.path.join(REPO, "docs", "config.md"), encoding="utf-8") as f:
        text = f.read()
    missing = [p for p in C._ALL_PATHS if f"`{p}`" not in text]
    assert not missing, f"docs/config.md does not describe: {missing}"
