"""What the engine tier and the engine bench share: where the built engine is, the generated models, and
how a user runs llama.cpp's server for one model. No pytest here: bench/engine_bench.py imports it."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from tests.engine import make_gguf

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build-engine.sh"
CACHE = Path(os.environ.get("IBC_ENGINE_CACHE", Path.home() / ".cache" / "ibc" / "engine"))
PRESETS = ("tiny", "small", "medium")


def built_engine_python() -> str | None:
    """The engine venv's python when build-engine.sh has built it for this machine, else None."""
    if subprocess.run(["bash", str(BUILD_SCRIPT), "--check"], check=False).returncode != 0:
        return None
    out = subprocess.run(["bash", str(BUILD_SCRIPT), "--python"], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def cached_models(presets: tuple[str, ...] = PRESETS) -> dict[str, Path]:
    """preset -> GGUF file, written once per version of the generator (seconds cold, nothing warm)."""
    digest = hashlib.sha256(Path(make_gguf.__file__).read_bytes()).hexdigest()[:12]
    out = CACHE / "models" / digest
    paths = {name: out / f"{name}.gguf" for name in presets}
    for name, path in paths.items():
        if not path.exists():
            make_gguf.write_model(path, name)
    return paths


def engine_argv(python: str, model_file: Path | str, port: int | str, alias: str) -> list[str]:
    """How a user runs llama.cpp's server for one model (the same flags by hand and under ibc local)."""
    return [
        python, "-m", "llama_cpp.server",
        "--model", str(model_file),
        "--model_alias", alias,
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "512",
        # Without it, a second request interrupts a running one (streams end with only [DONE]).
        "--interrupt_requests", "false",
    ]  # fmt: skip
