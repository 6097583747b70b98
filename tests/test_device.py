"""The device is chosen once, and an environment variable overrides it."""

import pytest
import torch

from course_runtime import device as dev


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch):
    dev.device.cache_clear()
    yield monkeypatch
    dev.device.cache_clear()


def test_default_follows_the_hardware(fresh_choice):
    fresh_choice.delenv(dev.ENV, raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert dev.device().type == expected
    assert dev.describe().endswith("detected)")


def test_environment_overrides(fresh_choice):
    fresh_choice.setenv(dev.ENV, "cpu")
    assert dev.device() == torch.device("cpu")
    assert "from $COURSE_DEVICE" in dev.describe()


def test_bad_value_says_what_is_wrong(fresh_choice):
    fresh_choice.setenv(dev.ENV, "tpu-please")
    with pytest.raises(ValueError, match="COURSE_DEVICE='tpu-please'"):
        dev.device()


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="this machine has a GPU; the check is for one without")
def test_asking_for_a_missing_gpu_fails_loudly(fresh_choice):
    fresh_choice.setenv(dev.ENV, "cuda")
    with pytest.raises(RuntimeError, match="torch sees none"):
        dev.device()
