"""The mock backend: a fast OpenAI-compatible test and demo server standing in for vLLM (`ibc mock-backend`).

Not part of the proxy: the proxy's tests and benchmarks, and local-mode demos, run it as the model server.
"""
