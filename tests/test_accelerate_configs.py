"""The shipped accelerate configs parse with accelerate's own loader and launch-argument validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType

CONFIG_DIR = Path(__file__).resolve().parents[1] / "accelerate_configs"
GPU_CONFIGS = {
    "ddp.yaml": DistributedType.MULTI_GPU,
    "fsdp2.yaml": DistributedType.FSDP,
    "zero2.yaml": DistributedType.DEEPSPEED,
    "zero3.yaml": DistributedType.DEEPSPEED,
}


def test_all_configs_present():
    names = {p.name for p in CONFIG_DIR.glob("*.yaml")}
    # fsdp2_cpu: tests/test_fsdp2.py; zero2_cpu / zero3_cpu: tests/test_deepspeed.py
    assert names == set(GPU_CONFIGS) | {
        "multi_cpu.yaml",
        "fsdp2_cpu.yaml",
        "zero2_cpu.yaml",
        "zero3_cpu.yaml",
    }


@pytest.mark.parametrize("name", sorted(GPU_CONFIGS))
def test_gpu_configs_parse(name):
    config = load_config_from_file(str(CONFIG_DIR / name))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == GPU_CONFIGS[name]
    assert config.num_processes == 8
    assert config.num_machines == 1
    assert config.mixed_precision == "bf16"
    assert config.use_cpu is False


def test_gpu_config_details():
    fsdp = load_config_from_file(str(CONFIG_DIR / "fsdp2.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # adapters gathered with real weights
    assert load_config_from_file(str(CONFIG_DIR / "zero2.yaml")).deepspeed_config["zero_stage"] == 2
    zero3 = load_config_from_file(str(CONFIG_DIR / "zero3.yaml")).deepspeed_config
    assert zero3["zero_stage"] == 3
    assert zero3["zero3_save_16bit_model"] is True


def test_multi_cpu_config():
    config = load_config_from_file(str(CONFIG_DIR / "multi_cpu.yaml"))
    # MULTI_GPU on purpose: it is what makes `accelerate launch` start num_processes ranks via torchrun
    # (MULTI_CPU / --cpu start one process); the ranks pick gloo because they run with use_cpu.
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert config.num_processes == 2
    assert config.mixed_precision == "no"
    assert config.dynamo_config == {}


@pytest.mark.parametrize("name", sorted([*GPU_CONFIGS, "multi_cpu.yaml", "zero2_cpu.yaml", "zero3_cpu.yaml"]))
def test_launch_validation_accepts_config(name):
    """`accelerate launch --config_file X` validation passes and every nested key is a real launch option."""
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(CONFIG_DIR / name), "train.py"])
    known = set(vars(args))
    config = load_config_from_file(str(CONFIG_DIR / name))
    for section in ("fsdp_config", "deepspeed_config"):
        for key in getattr(config, section):
            assert key in known, f"{name}: {section}.{key} is not an `accelerate launch` option"
    args, defaults, _ = _validate_launch_command(args)
    assert args.num_processes == config.num_processes
    assert args.mixed_precision == config.mixed_precision
    if name == "multi_cpu.yaml":
        assert args.multi_gpu and not args.cpu
    if name == "fsdp2.yaml":
        assert args.use_fsdp and args.fsdp_version == 2
    if name.startswith("zero"):
        assert args.use_deepspeed


def test_num_processes_override():
    """The documented way to change the process count: `--num_processes` on the launch line."""
    parser = launch_command_parser()
    args = parser.parse_args(
        ["--config_file", str(CONFIG_DIR / "ddp.yaml"), "--num_processes", "4", "train.py"]
    )
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == 4
