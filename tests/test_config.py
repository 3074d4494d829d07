"""The option table, YAML loading and precedence, and configs recorded in checkpoints."""
import pytest

from ringq import config as config_lib
from ringq.errors import RingqError
from ringq.train import get_args_parser


def resolved(argv, task="mnist"):
    return config_lib.resolve(get_args_parser(task).parse_args([str(a) for a in argv]), task)


def test_precedence_defaults_task_yaml_flags(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("ring-size: 4\nlr: 1\nweight_decay: 5e-4\nepochs: 20\n")
    cfg = resolved(["--config", config, "--epochs", 12])
    assert cfg["model"] == "lenet"            # task default (the table says resnet20)
    assert cfg["momentum"] == 0.9             # table default
    assert cfg["ring_size"] == 4              # YAML, dashed key accepted
    assert cfg["lr"] == 1.0 and isinstance(cfg["lr"], float)   # int accepted for a float
    assert cfg["weight_decay"] == 5e-4        # YAML 1.1 reads 5e-4 as a string
    assert cfg["epochs"] == 12                # flag beats YAML
    assert cfg["output_dir"] == "runs/lenet_ring4"


def test_empty_yaml_is_no_options(tmp_path):
    config = tmp_path / "empty.yaml"
    config.write_text("# nothing\n")
    assert config_lib.load_yaml(config) == {}


def test_model_config_names_fp32_first_layer_only_when_it_applies():
    keys = set(config_lib.model_config(resolved([])))
    assert "fp32_first_layer" not in keys  # earlier checkpoints' model configs stay equal
    assert config_lib.model_config(resolved(["--fp32-first-layer"]))["fp32_first_layer"] is True
    fp32 = resolved(["--fp32-first-layer", "--quantization", "none"])
    assert "fp32_first_layer" not in config_lib.model_config(fp32)


def test_saved_config_loads_back(tmp_path):
    cfg = resolved(["--val-split", 10, "--sigma", 0.7])
    config_lib.save_yaml(cfg, tmp_path / "config.yaml")
    assert config_lib.load_yaml(tmp_path / "config.yaml") == cfg


YAML_ERRORS = [  # (file text or None for no file, fragment of the message)
    (None, "config file not found"),
    ("- 1\n- 2\n", "must hold a mapping of options, got list"),
    ("just text\n", "must hold a mapping of options, got str"),
    ("epochs: [1\n", "is not valid YAML"),
    ("learning_rate: 0.1\n", "unknown key 'learning_rate'"),
    ("epochs: three\n", "key 'epochs': expected int, got 'three'"),
    ("epochs: 2.5\n", "key 'epochs': expected int"),
    ("ring_size: true\n", "key 'ring_size': expected int, got True"),
    ("download: 'no'\n", "key 'download': expected bool"),
    ("schedule: 5\n", "key 'schedule': expected a list of integers"),
    ("lr: fast\n", "key 'lr': expected float, got 'fast'"),
    ("model: null\n", "key 'model': expected str, got None"),
]


@pytest.mark.parametrize("text, fragment", YAML_ERRORS)
def test_yaml_errors_name_file_and_problem(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(RingqError, match="^[^\n]*$") as info:
        config_lib.load_yaml(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_yaml_that_is_not_text(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(RingqError, match="cannot read config file"):
        config_lib.load_yaml(path)


def test_yaml_values_are_range_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ring_size: 1\n")
    with pytest.raises(RingqError, match="ring_size must be between 2 and 256, got 1"):
        resolved(["--config", path])


def test_recorded_config_of_an_older_checkpoint_is_completed():
    recorded = {k: v for k, v in resolved([]).items() if k != "nan_policy"}
    cfg = config_lib.recorded_config({**recorded, "versions": {"torch": "x"}}, "ckpt", "mnist")
    assert cfg["nan_policy"] == "stop" and "versions" not in cfg


@pytest.mark.parametrize("bad, fragment", [
    ({"epochs": "3"}, "ckpt: key 'epochs': expected int"),
    ({"model": "resnet20"}, "ckpt: model: 'resnet20' is not a mnist model"),
])
def test_recorded_config_is_checked(bad, fragment):
    with pytest.raises(RingqError, match=fragment):
        config_lib.recorded_config({**resolved([]), **bad}, "ckpt", "mnist")


def test_fixed_on_resume_are_options():
    assert set(config_lib.FIXED_ON_RESUME) - set(config_lib.SOURCE_KEYS) <= \
        set(config_lib.OPTION_BY_NAME)
