"""Config loading: bad input is reported by file, field and fix; overrides work."""

from __future__ import annotations

from pathlib import Path

import pytest

from fm9g.rundir import config as cfg
from fm9g.rundir.config import ConfigError


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_unknown_key_names_file_key_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "run.yaml", "train:\n  lrr: 0.1\n  warmup_iter: 3\n")
    with pytest.raises(ConfigError) as info:
        cfg.load(path)
    message = str(info.value)
    assert str(path) in message
    assert "unknown key 'train.lrr'" in message and "did you mean 'train.lr'" in message
    assert "did you mean 'train.warmup_iters'" in message


def test_key_in_wrong_section_points_to_the_right_one(tmp_path: Path) -> None:
    path = write(tmp_path, "run.yaml", "train:\n  max_length: 512\n")
    with pytest.raises(ConfigError, match=r"did you mean 'data.max_length'"):
        cfg.load(path)


def test_wrong_type_says_what_was_expected(tmp_path: Path) -> None:
    path = write(tmp_path, "run.json", '{"cluster": {"nodes": "four"}}')
    with pytest.raises(ConfigError) as info:
        cfg.load(path)
    assert "'cluster.nodes'" in str(info.value) and "integer" in str(info.value) and '"four"' in str(info.value)


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    path = write(tmp_path, "run.yaml", "train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"run.yaml:\d+:\d+: invalid YAML"):
        cfg.load(path)


def test_overrides_win_and_parse_scalars(tmp_path: Path) -> None:
    path = write(tmp_path, "run.yaml", "train:\n  lr: 0.1\n")
    config, name = cfg.load(
        path, ["train.lr=3e-4", "cluster.nodes=4", "train.use_checkpoint=true", "cluster.exclude=[node1, node2]"]
    )
    assert config.train.lr == pytest.approx(3e-4)
    assert config.cluster.nodes == 4 and config.train.use_checkpoint is True
    assert config.cluster.exclude == ["node1", "node2"]
    assert name == "run"


def test_override_of_unknown_field_is_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown key 'cluster.partion'.*cluster.partition"):
        cfg.load(None, ["cluster.partion=gpu"])


def test_guide_scheduler_spelling_is_accepted() -> None:
    config, _ = cfg.load(None, ["train.lr_scheduler=Cosine"])
    assert config.train.lr_scheduler == "cosine"


def test_every_guide_argument_is_a_field() -> None:
    guide = [
        "model_unique",
        "resume_ckpt",
        "flash",
        "local",
        "dataloader",
        "save",
        "load_grad",
        "grad_ckpt_num",
        "exp_group",
        "ignore_cuda_oom",
        "tensorboard_all_tasks",
        "stop_when_end",
        "only_run_dataloader",
        "eps",
        "inspect_iters",
        "strict_state_dict",
        "resume_no_optimze",
        "tp_size",
        "async_save",
        "batch_size",
        "save_iters",
        "train_iters",
        "lr",
        "warmup_iters",
        "drop_iters",
        "only_load_model",
        "lr_scheduler",
        "load_dataloader_ckpt",
        "drop_begin",
        "drop_rate",
        "use_checkpoint",
    ]
    data_args = [
        "max_length",
        "tokenizer_path",
        "dataset_config",
        "dataloader_num_threads",
        "dataloader_prefetch",
        "dataloader_prefetch_factor",
        "dataloader_num_workers",
        "parallel_load_datastate",
    ]
    assert not [a for a in guide if a not in cfg.TrainConfig.model_fields]
    assert not [a for a in data_args if a not in cfg.DataConfig.model_fields]
    assert "config" in cfg.ModelConfig.model_fields


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    sub = tmp_path / "conf"
    sub.mkdir()
    path = write(sub, "run.yaml", "data:\n  dataset_config: mix.json\nmodel:\n  config: tiny\n")
    config, _ = cfg.load(path)
    assert config.data.dataset_config == str(sub / "mix.json")
    assert config.model.config == "tiny"


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config, _ = cfg.load(None, ["train.lr=0.5", "cluster.setup=['module load cuda']"])
    path = write(tmp_path, "config.yaml", cfg.dump(config))
    assert cfg.load_resolved(path) == config


def test_tp_size_above_one_is_rejected_with_reason() -> None:
    with pytest.raises(ConfigError, match="tensor parallelism is not implemented"):
        cfg.load(None, ["train.tp_size=2"])


def test_backend_options_that_do_not_go_together_are_rejected() -> None:
    with pytest.raises(ConfigError, match="fsdp is a torch-backend option"):
        cfg.load(None, ["model.backend=bmtrain", "model.fsdp=true"])
    with pytest.raises(ConfigError, match="offload is a bmtrain option"):
        cfg.load(None, ["model.offload=true"])
    bmtrain, _ = cfg.load(None, ["model.backend=bmtrain", "model.offload=false"])
    assert (bmtrain.model.backend, bmtrain.model.offload) == ("bmtrain", False)


# ---------------------------------------------------------------- issue 18: strict parsing, --set blame


def test_yaml_section_written_twice_is_an_error_naming_file_line_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "run.yaml", "train:\n  lr: 0.1\nmodel:\n  config: tiny\ntrain:\n  seed: 7\n")
    with pytest.raises(ConfigError) as info:
        cfg.load(path)
    message = str(info.value)
    assert f"{path}:5:" in message and "'train'" in message and "first at line 1" in message


def test_yaml_nested_duplicate_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "run.yaml", "train:\n  lr: 0.1\n  seed: 3\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"run.yaml:4: key 'lr' appears twice"):
        cfg.load(path)


def test_yaml_merge_key_override_is_not_a_duplicate(tmp_path: Path) -> None:
    text = "x-base: &base\n  lr: 0.1\n  seed: 3\n"
    raw = cfg.load_yaml_strict(text + "train:\n  <<: *base\n  lr: 0.2\n")
    assert raw["train"] == {"lr": 0.2, "seed": 3}


def test_json_duplicate_key_names_file_line_and_key(tmp_path: Path) -> None:
    path = write(
        tmp_path, "run.json", '{\n  "train": {"lr": 0.1},\n  "model": {"config": "tiny"},\n  "train": {"seed": 7}\n}\n'
    )
    with pytest.raises(ConfigError) as info:
        cfg.load(path)
    assert f"{path}:4:" in str(info.value) and "'train'" in str(info.value) and "first at line 2" in str(info.value)


def test_same_key_in_different_json_objects_is_fine() -> None:
    assert cfg.load_json_strict('[{"a": 1}, {"a": 2}]') == [{"a": 1}, {"a": 2}]


def test_set_error_names_the_option_not_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "run.yaml", "train:\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        cfg.load(path, ["cluster.nodes=zero"])
    message = str(info.value)
    assert "--set cluster.nodes=zero" in message and "'cluster.nodes'" in message
    assert str(path) not in message  # the file is fine; the option is at fault


def test_file_error_still_names_the_file_when_set_is_given(tmp_path: Path) -> None:
    path = write(tmp_path, "run.yaml", "train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        cfg.load(path, ["train.seed=3"])
    message = str(info.value)
    assert message.startswith(f"{path}: invalid config") and "train.lrr" in message
    assert "--set train.seed" not in message


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "nan", "inf", "1e400"])
def test_non_finite_float_override_is_refused(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfg.load(None, [f"train.lr={value}"])
    assert f"--set train.lr={value}" in str(info.value) and "finite" in str(info.value)


def test_non_finite_float_in_the_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "run.yaml", "train:\n  clip_grad: .nan\n")
    with pytest.raises(ConfigError, match=r"'train.clip_grad'.*finite"):
        cfg.load(path)


def test_unknown_key_without_suggestion_points_at_something_that_exists() -> None:
    with pytest.raises(ConfigError) as info:
        cfg.load(None, ["qqqwwwzzzxxkk=1"])
    assert "config --help" not in str(info.value) and "fm9g/rundir/config.py" in str(info.value)
