"""PinnedStaging: many small arrays in one copy; the views must equal the arrays whatever
their dtypes, sizes (empty ones too) and order, across steps and buffer growth."""

import numpy as np
import pytest
import torch
from fastserve.worker.staging import PinnedStaging

DTYPES = [np.int64, np.int32, np.float32, np.float64, np.uint8, np.bool_]


def random_arrays(rng, count):
    out = []
    for _ in range(count):
        dtype = DTYPES[rng.integers(len(DTYPES))]
        shape = (
            (int(rng.integers(0, 40)),) if rng.random() < 0.8 else (int(rng.integers(1, 5)), int(rng.integers(1, 9)))
        )
        if dtype == np.bool_:
            a = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            a = rng.integers(np.iinfo(dtype).min // 2, np.iinfo(dtype).max // 2, size=shape, dtype=dtype)
        else:
            a = rng.standard_normal(shape).astype(dtype)
        out.append(a)
    return out


def check(staging, rng, count):
    arrays = random_arrays(rng, count)
    for a in arrays:
        a.setflags(write=False)  # the Rust core's arrays are read-only
    views = staging.to_device(arrays)
    for a, v in zip(arrays, views):
        assert v.device.type == staging.device.type and tuple(v.shape) == a.shape
        np.testing.assert_array_equal(v.cpu().numpy(), a)
    return views


devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", devices)
def test_views_equal_arrays_across_steps_and_growth(device):
    rng = np.random.default_rng(0)
    staging = PinnedStaging(torch.device(device), capacity=256)
    for step in range(30):
        check(staging, rng, int(rng.integers(1, 24)))
    assert staging.capacity > 256, "the buffer never had to grow: the test missed the growth path"


def test_only_known_dtypes():
    staging = PinnedStaging(torch.device("cpu"))
    with pytest.raises(ValueError, match="cannot stage"):
        staging.to_device([np.zeros(3, dtype=np.complex64)])


@pytest.mark.parametrize("device", devices)
def test_sampling_tensors_staged_equal_unstaged(device):
    """SamplingTensors.from_rows gives the same tensors through one staged copy as array by
    array, on real Batches with penalties, bans and logprobs in play."""
    from fastserve._core import RequestParams, Scheduler
    from fastserve.layers.sampler import SamplingTensors
    from fastserve.worker.sampler_state import SamplerState

    s = Scheduler(num_blocks=64, max_model_len=128, block_size=4, eos_token_ids=[2])
    s.add_request(
        "a",
        [5, 6, 7, 8, 9],
        RequestParams(
            max_tokens=4,
            temperature=0.7,
            top_p=0.9,
            top_k=5,
            presence_penalty=0.5,
            repetition_penalty=1.2,
            min_tokens=2,
            seed=3,
            logprobs=2,
        ),
    )
    s.add_request(
        "b",
        [11, 12],
        RequestParams(
            max_tokens=4, temperature=0.0, frequency_penalty=0.3, bad_words_token_ids=[[13], [14, 15]], min_p=0.1
        ),
    )
    staging = PinnedStaging(torch.device(device))
    state = SamplerState(device, 1000)
    for _ in range(3):
        b = s.schedule()
        state.apply(b)
        rows = state.rows(b)
        plain = SamplingTensors.from_rows(rows, device, 1000, None, state)
        staged = SamplingTensors.from_rows(rows, device, 1000, staging, state)
        assert plain.any_penalties and plain.any_banned
        for name, value in vars(plain).items():
            other = getattr(staged, name)
            if isinstance(value, torch.Tensor):
                assert other.dtype == value.dtype and torch.equal(other.cpu(), value.cpu()), name
            else:
                assert other == value, name
        s.update(np.array([20 + i for i in range(b.num_samples)], dtype=np.int64))
