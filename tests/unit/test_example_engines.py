"""The shipped real-engine examples are valid configurations with the flags and health paths each engine needs."""

import pytest

from ibc.__main__ import main

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("path", "must_say"),
    [
        pytest.param("examples/llama-cpp.yaml", ["--interrupt_requests false", "/v1/models"], id="llama-cpp"),
        pytest.param("examples/vllm.yaml", ["--gpu-memory-utilization", "CUDA_VISIBLE_DEVICES"], id="vllm"),
    ],
)
def test_engine_example_is_valid_and_carries_the_engine_flags(path, must_say, capsys):
    assert main(["local", "--config", path, "--check"]) == 0
    out = capsys.readouterr().out
    assert f"{path}: " in out and "3 model(s)" in out
    text = open(path).read()
    for fragment in must_say:
        assert fragment in text
