"""Distillation from a frozen FP32 teacher (--distill-from): the loss, plain training at
weight 0, the teacher in the run's identity, and wrong teachers refused."""
import pytest
import torch
import torch.nn.functional as F

from ringq.engine import distillation_loss_sum
from run_helpers import metric_rows, save_checkpoint, tiny_args, train_main, weights

pytest_plugins = ["run_helpers"]
ONE_EPOCH = ("--epochs", 1, "--schedule")


def test_loss_is_the_weighted_sum_of_cross_entropy_and_softened_kl():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    y = torch.arange(6)
    ce = F.cross_entropy(student, y, reduction="sum")
    p_t, log_p_s = F.softmax(teacher / 4, 1), F.log_softmax(student / 4, 1)
    kl = (p_t * (p_t.log() - log_p_s)).sum()
    assert torch.allclose(distillation_loss_sum(student, y, teacher, 0.3, 4.0),
                          0.7 * ce + 0.3 * 16 * kl, atol=1e-5)
    assert torch.equal(distillation_loss_sum(student, y, teacher, 0.0, 4.0), ce)
    assert distillation_loss_sum(student, y, student, 1.0, 2.0).abs() < 1e-5  # same logits


@pytest.fixture(scope="module")
def teacher(idx_data, tmp_path_factory):
    """A one-epoch FP32 LeNet, the teacher of the tiny runs."""
    out = tmp_path_factory.mktemp("teacher") / "fp32"
    assert train_main("mnist", tiny_args(idx_data, out, "--quantization", "none",
                                         *ONE_EPOCH)) == 0
    return out / "last.pt"


def test_weight_zero_is_plain_training_exactly(teacher, idx_data, tmp_path, one_thread):
    plain, taught = tmp_path / "plain", tmp_path / "taught"
    assert train_main("mnist", tiny_args(idx_data, plain)) == 0
    assert train_main("mnist", tiny_args(idx_data, taught, "--distill-from", teacher,
                                         "--distill-weight", 0)) == 0
    a, b = weights(plain / "last.pt"), weights(taught / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in row.items() if k != "time_s"} for row in metric_rows(plain)]
    assert strip == metric_rows(taught)


def test_the_teacher_changes_training_and_the_fingerprint(teacher, idx_data, tmp_path):
    plain, taught = tmp_path / "plain", tmp_path / "taught"
    assert train_main("mnist", tiny_args(idx_data, plain, *ONE_EPOCH)) == 0
    assert train_main("mnist", tiny_args(idx_data, taught, "--distill-from", teacher,
                                         "--distill-weight", 0.9, *ONE_EPOCH)) == 0
    assert metric_rows(plain)[0]["train_loss"] != metric_rows(taught)[0]["train_loss"]
    cfg_plain = torch.load(plain / "last.pt", weights_only=True)["config"]
    cfg_taught = torch.load(taught / "last.pt", weights_only=True)["config"]
    assert cfg_plain["fingerprint"]["recipe"] != cfg_taught["fingerprint"]["recipe"]
    assert cfg_taught["distill_source"]["epoch"] == 1


def test_resume_keeps_the_teacher_and_refuses_another(teacher, idx_data, tmp_path):
    out = tmp_path / "taught"
    assert train_main("mnist", tiny_args(idx_data, out, "--distill-from", teacher,
                                         *ONE_EPOCH)) == 0
    assert train_main("mnist", ["--resume", out / "last.pt", "--epochs", 2]) == 0
    assert [r["epoch"] for r in metric_rows(out)] == ["1", "2"]
    other = tmp_path / "other"
    assert train_main("mnist", tiny_args(idx_data, other, "--quantization", "none", "--seed", 3,
                                         *ONE_EPOCH)) == 0
    assert train_main("mnist", ["--resume", out / "last.pt", "--epochs", 3, "--distill-from",
                                other / "last.pt"]) == 2


@pytest.mark.parametrize("kind,message", [
    ("other-architecture", "the teacher has model 'mlp', this run's network 'lenet'"),
    ("other-classes", "the teacher has num_classes 5, this run's network 10"),
    ("quantized", "not an FP32 checkpoint (quantization 'ring'); --distill-from needs"),
    ("packed", "a packed file holds a quantized model; --distill-from needs")])
def test_wrong_teachers_are_refused_in_one_line(kind, message, teacher, idx_data, tmp_path,
                                                capsys):
    if kind == "other-architecture":
        path = save_checkpoint(tmp_path / "t.pt", {"model": "mlp", "quantization": "none",
                                                   "num_classes": 10}, {"model": "mlp"})
    elif kind == "other-classes":
        path = save_checkpoint(tmp_path / "t.pt", {"model": "lenet", "quantization": "none",
                                                   "num_classes": 5}, {"model": "lenet"})
    else:
        ring = tmp_path / "ring"
        assert train_main("mnist", tiny_args(idx_data, ring, *ONE_EPOCH)) == 0
        path = ring / "last.pt"
        if kind == "packed":
            from export import main as export_main
            export_main(["--checkpoint", str(path), "--output", str(tmp_path / "t.rqp"),
                         "--quiet"])
            path = tmp_path / "t.rqp"
    capsys.readouterr()
    out = tmp_path / "student"
    assert train_main("mnist", tiny_args(idx_data, out, "--distill-from", path,
                                         *ONE_EPOCH)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (out / "last.pt").exists()


def test_a_teacher_of_another_split_is_refused(teacher, idx_data, tmp_path, capsys):
    out = tmp_path / "student"
    assert train_main("mnist", tiny_args(idx_data, out, "--distill-from", teacher,
                                         "--val-split", 20, *ONE_EPOCH)) == 2
    err = capsys.readouterr().err
    assert "no validation split, this run holds out" in err and "--distill-from needs" in err
