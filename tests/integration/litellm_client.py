"""Runs inside LiteLLM's own venv (not the project's): LiteLLM as a client of `ibc local`, results as JSON.

argv[1] is the proxy's base URL (`http://127.0.0.1:PORT/v1`). Steps: start model-a (it fills the node),
ask for model-b once without retries (the 429's message must reach the exception), then through a
Router with retries (it must wait as `Retry-After` says and then be served).
"""

import json
import os
import sys
import time

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch at import

import httpx
import litellm

base = sys.argv[1]
messages = [{"role": "user", "content": "hi"}]
out: dict = {}
httpx.post(f"{base}/chat/completions", json={"model": "model-a", "messages": messages}, timeout=60).raise_for_status()
try:
    litellm.completion(model="openai/model-b", api_base=base, api_key="unused", messages=messages, num_retries=0)
    out["plain"] = {"type": "none"}
except Exception as exc:
    out["plain"] = {"type": type(exc).__name__, "str": str(exc), "status": getattr(exc, "status_code", None)}
deployment = {"model_name": "model-b", "litellm_params": {"model": "openai/model-b", "api_base": base, "api_key": "x"}}
router = litellm.Router(model_list=[deployment], num_retries=3)
started = time.monotonic()
try:
    answer = router.completion(model="model-b", messages=messages)
    out["router"] = {"model": answer.model, "elapsed": time.monotonic() - started}
except Exception as exc:
    out["router"] = {"type": type(exc).__name__, "str": str(exc)[:2000], "elapsed": time.monotonic() - started}
print(json.dumps(out))
