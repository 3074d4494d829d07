"""Run identity: fingerprints, the validation split apart from the seed, and sources of
another split refused."""
import argparse

import pytest
import torch

from ringq import config as config_lib
from ringq import data as data_lib
from ringq import identity
from ringq.train import load_datasets
from run_helpers import train_main, tiny_args

pytest_plugins = ["run_helpers"]


def resolved(**options):
    return config_lib.resolve(argparse.Namespace(**options), "mnist")


def test_fingerprints_leave_out_device_paths_and_verbosity():
    base = resolved(seed=1)
    same = resolved(seed=1, device="cpu", data_dir="/elsewhere", output_dir="/x", quiet=True,
                    workers=0)
    assert identity.fingerprints(base) == identity.fingerprints(same)
    for other in (resolved(seed=1, epochs=20), resolved(seed=1, ring_size=4),
                  resolved(seed=1, val_split=20), resolved(seed=1, precision="fp32")):
        assert identity.recipe_fingerprint(other) != identity.recipe_fingerprint(base)


def test_seeds_share_a_recipe_not_a_run():
    one, two = resolved(seed=1), resolved(seed=2)
    assert identity.recipe_fingerprint(one) == identity.recipe_fingerprint(two)
    assert identity.run_fingerprint(one) != identity.run_fingerprint(two)
    assert identity.differences(one, two) == "seed 1 -> 2"
    assert identity.run_fingerprint(resolved(seed=1, val_seed=2)) != \
        identity.run_fingerprint(one)


def test_an_init_source_is_its_identity_not_its_path():
    source = {"fingerprint": "abc", "epoch": 30, "split": ["cifar10", 5000, 1]}
    a = {**resolved(seed=1), "init_from": "/a/fp32.pt", "init_source": {**source, "file": "a"}}
    b = {**resolved(seed=1), "init_from": "b/fp32.pt", "init_source": {**source, "file": "b"}}
    assert identity.run_fingerprint(a) == identity.run_fingerprint(b)
    c = {**b, "init_source": {**source, "epoch": 29}}
    assert "init_source" in identity.differences(a, c)


def test_validation_split_follows_val_seed_not_seed(monkeypatch, idx_data):
    drawn = []
    real = data_lib.train_val_split
    monkeypatch.setattr(data_lib, "train_val_split",
                        lambda labels, size, seed: drawn.append(seed) or real(labels, size, seed))
    from ringq.distributed import init_distributed
    splits = []
    for seed in (1, 2):
        cfg = resolved(seed=seed, val_split=20, dataset="fashion-mnist", data_dir=str(idx_data),
                       download=False)
        _, val, _ = load_datasets(cfg, init_distributed("cpu"), torch.device("cpu"))
        splits.append(val.labels.tolist())
    assert drawn == [1, 1] and splits[0] == splits[1]


def test_old_records_drew_their_split_with_the_seed():
    assert config_lib.with_recorded_split({"seed": 3})["val_seed"] == 3
    assert config_lib.with_recorded_split({"seed": 3, "val_seed": 1})["val_seed"] == 1
    cfg = config_lib.recorded_config({"seed": 2, "val_split": 10}, "ckpt", "cifar10")
    assert cfg["val_seed"] == 2


@pytest.fixture(scope="module")
def fp32_source(idx_data, tmp_path_factory):
    """An FP32 LeNet trained with a 20-image validation split of val_seed 1."""
    out = tmp_path_factory.mktemp("source") / "fp32"
    assert train_main("mnist", tiny_args(idx_data, out, "--quantization", "none", "--val-split",
                                         20, "--epochs", 1, "--schedule")) == 0
    return out / "last.pt"


@pytest.mark.parametrize("split,message", [
    (("--val-split", 20, "--val-seed", 2), "trained with fashion-mnist, 20-image validation "
     "split of val_seed 1, this run holds out a fashion-mnist, 20-image validation split of "
     "val_seed 2"),
    (("--val-split", 30), "20-image validation split of val_seed 1, this run holds out a "
     "fashion-mnist, 30-image")])
def test_init_from_refuses_a_source_of_another_split(split, message, fp32_source, idx_data,
                                                     tmp_path, capsys):
    out = tmp_path / "ring"
    args = tiny_args(idx_data, out, "--init-from", fp32_source, "--epochs", 1, "--schedule",
                     *split)
    assert train_main("mnist", args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "--init-from needs a source" in err
    assert not out.exists()


def test_init_from_a_source_of_the_same_split_records_its_identity(fp32_source, idx_data,
                                                                   tmp_path):
    out = tmp_path / "ring"
    args = tiny_args(idx_data, out, "--init-from", fp32_source, "--val-split", 20, "--seed", 7,
                     "--epochs", 1, "--schedule")
    assert train_main("mnist", args) == 0
    source = torch.load(out / "last.pt", weights_only=True)["config"]["init_source"]
    assert source["file"] == "last.pt" and source["epoch"] == 1
    assert source["split"] == ["fashion-mnist", 20, 1]
