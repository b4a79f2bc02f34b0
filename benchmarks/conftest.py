"""pytest-benchmark hooks shared by the benchmark files: record the torch build and thread count with each run."""

from __future__ import annotations

import pytest


@pytest.hookimpl(optionalhook=True)  # pytest-benchmark may be absent
def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
