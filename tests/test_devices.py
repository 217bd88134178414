"""Device truth without a GPU: torch.cuda is mocked. DEVICE='auto' inside a GPU allocation without CUDA is an error
with both versions and the fix; PRECISION='auto' picks bf16 only on native-bf16 GPUs; every run logs its device."""

from __future__ import annotations

import pytest
import torch

from cellseg import devices
from cellseg.distributed import DistEnv, pick_device
from cellseg.training.trainer import resolve_precision


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_JOB_GPUS": "0"}, {"SLURM_JOB_GPUS": "0"}),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "0,1"}),
    ({"SLURM_GPUS_ON_NODE": "2"}, {"SLURM_GPUS_ON_NODE": "2"}),
    ({"SLURM_GPUS_PER_NODE": "a100:4"}, {"SLURM_GPUS_PER_NODE": "a100:4"}),
    ({"SLURM_GPUS_ON_NODE": "0", "CUDA_VISIBLE_DEVICES": ""}, {}),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, {}),
    ({"SLURM_JOB_GPUS": "NoDevFiles"}, {}),
    ({"SLURM_JOB_ID": "12", "SLURM_NTASKS": "4"}, {}),
])
def test_gpu_allocation_reads_slurm_and_cuda_variables(env, expected):
    assert devices.gpu_allocation(env) == expected


def test_auto_device_in_a_gpu_allocation_without_cuda_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("SLURM_JOB_GPUS", "0")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(devices, "driver_info", lambda: {"driver": "535.104.05", "driver_cuda": "12.2"})
    with pytest.raises(RuntimeError) as e:
        pick_device("auto", DistEnv())
    msg = str(e.value)
    for part in ("DEVICE='auto'", "SLURM_JOB_GPUS=0", "CUDA 13.0", "535.104.05", "12.2", "DEVICE='cpu'",
                 "download.pytorch.org/whl/cu126", "section 1"):
        assert part in msg, part


def test_auto_device_with_a_cpu_only_torch_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(RuntimeError, match="CPU-only build"):
        devices.check_auto_device({"CUDA_VISIBLE_DEVICES": "0"})


def test_auto_device_outside_a_gpu_allocation_is_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for var in devices.GPU_ID_VARS + devices.GPU_COUNT_VARS:
        monkeypatch.delenv(var, raising=False)
    assert pick_device("auto", DistEnv()) == torch.device("cpu")
    monkeypatch.setenv("SLURM_JOB_GPUS", "0")
    assert pick_device("cpu", DistEnv()) == torch.device("cpu")  # asked for on purpose


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp32"), ((7, 0), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_is_bf16_only_on_native_bf16_gpus(monkeypatch, capability, expected):
    # torch.cuda.is_bf16_supported() says True on a T4 (emulation): it must not decide
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_precision("auto", torch.device("cuda:0")) == expected
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


def test_memory_table_and_training_agree_on_bf16():
    from cellseg.memory import GPUS, resolve_estimate_precision

    assert not GPUS["t4-16gb"].bf16 and not GPUS["v100-32gb"].bf16 and GPUS["a100-40gb"].bf16
    assert resolve_estimate_precision("auto", "cuda", GPUS["t4-16gb"].bf16) == "fp32"


def test_describe_device_names_gpu_memory_driver_and_versions(monkeypatch):
    class Props:
        name, total_memory = "NVIDIA T4", 15 * 2**30

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Props())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(devices, "driver_info", lambda: {"driver": "550.54", "driver_cuda": "12.4"})
    line = devices.describe_device(torch.device("cuda:0"))
    for part in ("NVIDIA T4", "15.0 GiB", "7.5", "no native bf16", "550.54", torch.__version__, "CUDA build"):
        assert part in line, part
    assert torch.__version__ in devices.describe_device(torch.device("cpu"))


def test_every_run_logs_its_device_at_start(tmp_path, monkeypatch):
    from cellseg.config import resolve_config
    from cellseg.runtime import setup_run

    monkeypatch.chdir(tmp_path)
    cfg = resolve_config({"RUN_DIR": str(tmp_path / "run"), "DEVICE": "cpu"}, "00_prepare_data")
    seen = []
    monkeypatch.setattr("cellseg.devices.describe_device", lambda d: seen.append(d) or f"DEVICE LINE {d}")
    setup_run(cfg, "00_prepare_data")
    assert seen == [torch.device("cpu")]
    assert "DEVICE LINE cpu" in (tmp_path / "run" / "logs" / "00_prepare_data.log").read_text()


def test_ddp_on_gpus_never_falls_back_to_gloo(monkeypatch):
    import torch.distributed as dist

    from cellseg.distributed import init_distributed

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("must not start a process group"))
    with pytest.raises(RuntimeError, match="DDP on cuda:0 needs NCCL"):
        init_distributed(DistEnv(0, 2, 0, "slurm"), torch.device("cuda:0"))
