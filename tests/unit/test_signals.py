"""A replica's vLLM metrics, read from Prometheus text as vLLM writes it (old and new KV names)."""

import pytest

from serving.signals import ReplicaMetrics, parse_in_flight, parse_metrics

pytestmark = pytest.mark.unit

VLLM_0_10 = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="chat"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="chat"} 7.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="chat"} 0.42
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="chat"} 1234.0
"""

OLD = """\
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="chat"} 0.9
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="chat"} 0.0
"""

CASES = {
    "vllm 0.10 names": (VLLM_0_10, ReplicaMetrics(7, 3, 0.42)),
    "old kv name": (OLD, ReplicaMetrics(0, None, 0.9)),
    "new name wins over old": (
        OLD + "# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc 0.5\n",
        ReplicaMetrics(0, None, 0.5),
    ),
    "two engines are summed": (
        '# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{engine="0"} 2\n'
        'vllm:num_requests_waiting{engine="1"} 3\n',
        ReplicaMetrics(5, None, None),
    ),
    "a backend without vllm metrics": (
        "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1.5\n",
        ReplicaMetrics(),
    ),
    "empty": ("", ReplicaMetrics()),
}


@pytest.mark.parametrize(("text", "want"), CASES.values(), ids=CASES.keys())
def test_parse(text: str, want: ReplicaMetrics) -> None:
    assert parse_metrics(text) == want


def test_garbage_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_metrics("vllm:num_requests_waiting{ 3\n")


PROXY = """\
# HELP ibc_proxy_backend_in_flight Requests sent to one backend and not finished yet.
# TYPE ibc_proxy_backend_in_flight gauge
ibc_proxy_backend_in_flight{backend="http://10.0.0.1:8000"} 3.0
ibc_proxy_backend_in_flight{backend="http://10.0.0.2:8000"} 0.0
# TYPE ibc_proxy_queue_depth gauge
ibc_proxy_queue_depth{model="chat"} 4.0
"""

IN_FLIGHT_CASES = {
    "per backend": (PROXY, {"http://10.0.0.1:8000": 3, "http://10.0.0.2:8000": 0}),
    "a negative livesum is none": (
        '# TYPE ibc_proxy_backend_in_flight gauge\nibc_proxy_backend_in_flight{backend="http://a:1"} -1\n',
        {"http://a:1": 0},
    ),
    "no backend label is skipped": ("# TYPE ibc_proxy_backend_in_flight gauge\nibc_proxy_backend_in_flight 2\n", {}),
    "a replica's page has none": (VLLM_0_10, {}),
}


@pytest.mark.parametrize(("text", "want"), IN_FLIGHT_CASES.values(), ids=IN_FLIGHT_CASES.keys())
def test_parse_in_flight(text: str, want: dict[str, int]) -> None:
    assert parse_in_flight(text) == want
