"""The Ollama Modelfile beside each per-exit GGUF file, from the file's own tokenizer keys."""

from __future__ import annotations

import re
from pathlib import Path

import gguf
from gguf import Keys

CHATML_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)


STOP_TOKENS = ("<|im_end|>", "<|im_start|>", "<|endoftext|>")


def write_modelfile(gguf_path: Path, kv: list[tuple]) -> None:
    """The Ollama Modelfile next to a per-exit file, from the file's own tokenizer keys."""
    values = {k: v for k, v, _, _ in kv}
    template = values.get(Keys.Tokenizer.CHAT_TEMPLATE)
    tokens = set(values.get(Keys.Tokenizer.LIST, []))
    stops = [t for t in STOP_TOKENS if t in tokens] if template else []
    (gguf_path.parent / "Modelfile").write_text(
        modelfile(gguf_path.name, template, stops, default_system(template))
    )


def write_modelfile_for(gguf_path: Path) -> None:
    """The Modelfile of a GGUF file that exists (e.g. one llama.cpp's quantizer wrote)."""
    r = gguf.GGUFReader(str(gguf_path))
    kv = [
        (k, f.contents(), None, None)
        for k, f in r.fields.items()
        if k in (Keys.Tokenizer.CHAT_TEMPLATE, Keys.Tokenizer.LIST)
    ]
    write_modelfile(Path(gguf_path), kv)


def modelfile(gguf_file: str, chat_template: str | None, stops: list[str], system: str | None = None) -> str:
    """An Ollama Modelfile next to a per-exit file (ChatML templates are translated)."""
    lines = [f"FROM ./{gguf_file}"]
    if chat_template and "<|im_start|>" in chat_template:
        lines.append(f'TEMPLATE """{CHATML_TEMPLATE}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
    else:
        lines.append("# no TEMPLATE: the chat template is not ChatML; write one by hand")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += ["PARAMETER temperature 0.2", "PARAMETER num_ctx 2048"]
    return "\n".join(lines) + "\n"


def default_system(chat_template: str | None) -> str | None:
    """The system prompt a ChatML template inserts when none is given (SmolLM2 has one)."""
    if not chat_template:
        return None
    m = re.search(r"<\|im_start\|>system\\n([^<{]+?)<\|im_end\|>", chat_template)
    return m.group(1) if m else None
