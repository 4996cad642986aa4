"""`ibc local` on a node of GPUs: each model process sees only the devices the decision gave it.

A real `ibc local` subprocess with mock backends on a node declared as `devices: 2x40Gi`: two 30Gi
models get distinct CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES (read from the processes' own
/proc/<pid>/environ, not from ibc's word), and a third 30Gi model is refused with the per-device reason
even though the node as a whole still has 20Gi free.
"""

import openai
import pytest

from tests.integration.test_local_mode import MESSAGES, Local, _until

pytestmark = pytest.mark.integration

CONFIG = """\
nodes:
  - name: gpu-box
    devices: 2x40Gi
models:
""" + "".join(
    f"""\
  - name: {name}
    memory: 30Gi
    cooldown: 60s
    stop_grace_period: 5s
    command: ibc mock-backend --bind 127.0.0.1:{{port}} --model {name} --startup-delay 0.2
"""
    for name in ("model-b", "model-c", "model-d")
)


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    return {k.decode(): v.decode(errors="replace") for k, v in pairs}


@pytest.fixture
def local(tmp_path):
    started = Local(tmp_path, CONFIG)
    yield started
    started.cleanup()


def test_two_models_on_a_two_gpu_node_see_distinct_devices(local):
    client = local.client()
    for name in ("model-c", "model-d"):
        assert client.chat.completions.create(model=name, messages=MESSAGES).model == name
    assert _until(lambda: all(len(local.backend_pids(m)) == 1 for m in ("model-c", "model-d")), timeout=20)
    seen = {}
    for name in ("model-c", "model-d"):
        (pid,) = local.backend_pids(name)
        env = environ(pid)
        seen[name] = env.get("CUDA_VISIBLE_DEVICES")
        assert env.get("HIP_VISIBLE_DEVICES") == seen[name], env
    assert sorted(seen.values()) == ["0", "1"], seen

    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="model-b", messages=MESSAGES)
    body = info.value.response.json()
    assert body["available"] == "10Gi"
    assert "gpu-box: GPU 0 has 10Gi free of 40Gi, GPU 1 has 10Gi free of 40Gi" in body["message"]
    assert local.stop() == 0
