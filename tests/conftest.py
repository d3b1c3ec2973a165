"""Shared test set-up: offline, deterministic, one torch thread.

One thread because the models under test are tiny and the CI machine has 2 cores: two OpenMP threads on a busy
2-core box spin-wait for each other and ran 10-20x slower (measured while developing). Benchmarks, not tests,
measure multi-thread speed.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["qwen2", "qwen3"])
def backbone(request) -> str:
    """``UniXConfig.backbone``: a model test that takes this fixture runs on both stock decoder layers."""
    return request.param
