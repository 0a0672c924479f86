"""Generation from an exported ONNX folder: onnxruntime-genai runs the graph and its own search
(greedy or sampled, stop at the end-of-sequence token); our tokenizer (the one beside the graph)
applies the chat template and decodes, so the prompt is tokenized exactly as transformers does."""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import UserError, read_json
from ...model.layout import folder_exit
from ...recipe import Sampling
from ...text import chat_ids, load_tokenizer

DEFAULT = Sampling()
GENAI_CONFIG = "genai_config.json"


def resolve(folder: Path, exit: int | None) -> tuple[Path, str, int]:
    """(folder, graph file, exit layer) of one exit in an export: a job's onnx folder (exit-E/
    inside), one exit's folder, or a multi-exit folder (exit-E.onnx inside). exit None: the last."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such directory")
    if (folder / GENAI_CONFIG).is_file():
        graphs = {
            folder_exit(p.stem): p.name for p in folder.glob("*.onnx") if folder_exit(p.stem) is not None
        }
        if graphs:  # the multi-exit folder
            e = max(graphs) if exit is None else exit
            if e not in graphs:
                raise UserError(f"--exit {e}: {folder} holds exits {sorted(graphs)}")
            return folder, graphs[e], e
        cfg = read_json(folder / GENAI_CONFIG, "genai config")
        e = int(cfg["model"]["decoder"]["num_hidden_layers"]) - 1
        if exit is not None and exit != e:
            raise UserError(f"--exit {exit}: {folder} holds exit {e} only")
        return folder, cfg["model"]["decoder"]["filename"], e
    subs = {
        folder_exit(p.name): p
        for p in folder.iterdir()
        if folder_exit(p.name) is not None and (p / GENAI_CONFIG).is_file()
    }
    if not subs:
        multi = folder / "multi-exit"
        if (multi / GENAI_CONFIG).is_file():
            return resolve(multi, exit)
        raise UserError(f"{folder}: not an ONNX export of ruyi-quant (no {GENAI_CONFIG}, no exit-E/ folders)")
    e = max(subs) if exit is None else exit
    if e not in subs:
        raise UserError(f"--exit {e}: {folder} holds exits {sorted(subs)}")
    return resolve(subs[e], e)


def load(folder: Path, exit: int | None):
    """(onnxruntime-genai Model of the exit, exit layer, folder, end-of-sequence ids)."""
    import onnxruntime_genai as og

    d, graph, e = resolve(folder, exit)
    config = og.Config(str(d))
    written = read_json(d / GENAI_CONFIG, "genai config")["model"]
    if graph != written["decoder"]["filename"]:  # another exit of a multi-exit folder
        config.overlay(json.dumps({"model": {"decoder": {"filename": graph, "num_hidden_layers": e + 1}}}))
    eos = written.get("eos_token_id")
    return og.Model(config), e, d, set(eos if isinstance(eos, list) else [eos])


def generate_ids(
    model,
    ids: list[int],
    max_new_tokens: int,
    eos=(),
    sample: bool = DEFAULT.sample,
    temperature: float = DEFAULT.temperature,
    top_k: int = DEFAULT.top_k,
    top_p: float = DEFAULT.top_p,
    seed: int = DEFAULT.seed,
    on_token=None,
) -> list[int]:
    """New tokens after `ids`, up to an end-of-sequence token (not included)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    opts = dict(max_length=len(ids) + max_new_tokens, do_sample=sample)
    if sample:
        opts.update(temperature=temperature, top_k=top_k, top_p=top_p, random_seed=seed)
    params.set_search_options(**opts)
    gen = og.Generator(model, params)
    gen.append_tokens(list(ids))
    out: list[int] = []
    while not gen.is_done():
        gen.generate_next_token()
        t = int(gen.get_next_tokens()[0])
        if t in eos:
            break
        out.append(t)
        if on_token:
            on_token(t)
    return out


def generate(
    folder: Path,
    prompt: str,
    exit: int | None = None,
    max_new_tokens: int = DEFAULT.max_new_tokens,
    chat: bool = True,
    on_text=None,
    **search,
) -> dict:
    """The exit's answer to `prompt` (a user message in the chat template when the tokenizer has
    one and chat is True). on_text(piece) streams the decoded text."""
    model, e, d, eos = load(folder, exit)
    tok = load_tokenizer(d)
    ids = chat_ids(tok, prompt, chat)
    out: list[int] = []
    shown = 0

    def stream(t: int) -> None:
        nonlocal shown
        out.append(t)
        full = tok.decode(out, skip_special_tokens=True)
        on_text(full[shown:])
        shown = len(full)

    tokens = generate_ids(model, ids, max_new_tokens, eos, on_token=stream if on_text else None, **search)
    return {
        "exit": e,
        "prompt_tokens": len(ids),
        "tokens": tokens,
        "text": tok.decode(tokens, skip_special_tokens=True),
    }
