"""torch.compile of a ring ResNet-20: same results as eager mode, and no recompiles when sigma
anneals, the weight mode switches (soft, STE, hard) or positions move."""
import pytest
import torch
import torch._dynamo

from models import build_model
from ringq import data as data_lib
from ringq.engine import apply_epoch_schedule, evaluate_all_modes, train_one_epoch
from run_helpers import random_images

pytest_plugins = ["run_helpers"]
CPU = torch.device("cpu")
SCHEDULE = {"epochs": 3, "sigma_final": 0.05, "ste_epochs": 1, "channels_last": False,
            "clip_grad": 5.0, "nan_policy": "stop"}


def _loaders():
    ds = random_images(48)
    mean, std = data_lib.NORMALIZATION["cifar10"]
    common = dict(mean=mean, std=std, device=CPU, seed=0)
    return (data_lib.make_loader("memory", ds, 16, shuffle=True, augment=True, **common),
            data_lib.make_loader("memory", ds, 24, shuffle=False, augment=False, **common))


def _train(compiled):
    """Three epochs (sigma 2 -> 0.05, STE in the last); per-epoch stats, final state dict."""
    torch.manual_seed(0)
    model = build_model(dict(model="resnet20", quantization="ring", ring_size=4,
                             ring_layout="distinct", sigma=2.0))
    net = torch.compile(model, backend="eager") if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train, val = _loaders()
    history = []
    for epoch in range(1, SCHEDULE["epochs"] + 1):
        apply_epoch_schedule(model, SCHEDULE, 2.0, epoch)
        train.set_epoch(epoch)
        history.append((train_one_epoch(net, train, optimizer, SCHEDULE, epoch, CPU,
                                        progress=False), evaluate_all_modes(net, val, CPU)))
    return history, model.state_dict()


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def test_compiled_training_equals_eager_and_compiles_at_most_three_times(fresh_dynamo, one_thread):
    eager_history, eager_state = _train(compiled=False)
    compiled_history, compiled_state = _train(compiled=True)
    assert compiled_history == eager_history
    assert all(torch.equal(eager_state[k], compiled_state[k]) for k in eager_state)
    frames = fresh_dynamo["frames"]["total"]
    assert 1 <= frames <= 3  # the first compile and at most 2 recompiles (train, eval)

