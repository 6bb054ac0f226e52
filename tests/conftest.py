"""Shared pytest setup: tests/ on sys.path (for the float64 references) and device parametrisation."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: Devices every operator test runs on: CPU always, CUDA when a GPU and a CUDA build are present.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def one_thread():
    """In-process work on one thread: CPU tests share the cores, where OpenMP's spinning threads crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def subprocess_pythonpath():
    """What a test's subprocess needs on PYTHONPATH to import the robust_diffusion under test: the source tree
    when it holds an in-place build (python setup.py build_ext --inplace), else nothing (the installed package)."""
    source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")
    built = any(name.startswith("_C") and name.endswith(".so")
                for name in os.listdir(os.path.join(source, "robust_diffusion")))
    return [source] if built else []


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: compiles or trains; still part of CI")


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
