"""Shared pytest setup: tests/ on sys.path (for the float64 references) and device parametrisation."""

import contextlib
import importlib.util
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: Devices every operator test runs on: CPU always, CUDA when a GPU and a CUDA build are present.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@contextlib.contextmanager
def example_module(name: str):
    """examples/<name>.py imported as the module ``name`` for the duration (registered in sys.modules, where
    dataclasses look their module up)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


class FixedLogits(torch.nn.Module):
    """A classifier whose logits are the image's first three pixels (class-histogram and accuracy tests)."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x.flatten(1)[:, :3]


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


#: The test files that take longest, longest first. pytest-xdist's --dist loadfile hands whole files to the
#: workers in collection order, so starting with these keeps both workers busy until the end instead of leaving
#: one file running alone (tools/test.sh).
SLOWEST_FIRST = ("test_build.py", "test_example_runs.py", "test_example.py", "test_example_notebook.py",
                 "test_label_noise_example.py", "test_training.py", "test_audit.py",
                 "test_integration.py", "test_fused_gradient.py", "test_coherence.py", "test_fault_injection.py",
                 "test_benchmarks.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
