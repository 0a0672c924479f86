"""`ruyi-quant generate`, `ruyi-quant chat` and `ruyi-quant eval --runtime int4`: a family run
directly by our int4 runtime (runtime/), or an ONNX export by onnxruntime-genai (cli_onnx.py).
One loaded model, the exit chosen per call."""

from __future__ import annotations

import sys
from pathlib import Path

from .cli_options import _exits
from .errors import UserError

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": "float32", "float32": "float32"}


def _dtype(name: str):
    import torch
    if name not in DTYPES:
        raise UserError(f"--dtype {name}: give bf16, fp16 or fp32")
    return getattr(torch, DTYPES[name])


def _one_exit(config, text: str | None) -> int:
    if text in (None, "last"):
        return config.exits[-1]
    exits = _exits(text, "--exit")
    if not isinstance(exits, list) or len(exits) != 1:
        raise UserError(f"--exit {text}: give one exit layer")
    return config.exit_list(exits)[0]


def _search(args) -> dict:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: give at least 1")
    if args.temperature <= 0 or not 0 < args.top_p <= 1 or args.top_k < 1:
        raise UserError("sampling: --temperature must be > 0, --top-p in (0, 1], --top-k >= 1")
    return {"sample": args.sample, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "seed": args.seed}


def _compiled(args, device) -> bool:
    return args.compile == "on" or (args.compile == "auto" and device.type == "cuda")


class Session:
    """A quantized family loaded once on the int4 runtime (float when it has no grids)."""

    def __init__(self, args):
        from .pipeline import open_family
        from .quant.calibrate import pick_device
        from .data import load_tokenizer
        from .runtime.model import int4_model
        self.device = pick_device(args.device)
        dtype = _dtype(args.dtype)
        self.fam, tok_dir = open_family(args.family)
        self.exit = _one_exit(self.fam.config, args.exit)       # a bad exit: before any loading
        self.tok = load_tokenizer(tok_dir)
        self.model = int4_model(self.fam, self.device, dtype)
        self.fam.verify()                      # before the first token: the files were intact
        self.compiled = _compiled(args, self.device)
        self.eos = {t for t in (self.tok.eos_token_id, self.tok.convert_tokens_to_ids("<|im_end|>"))
                    if isinstance(t, int) and t >= 0 and t != self.tok.unk_token_id}
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0

    def answer(self, prompts: list, exit: int, search: dict, max_new_tokens: int, chat: bool,
               stream: bool) -> list[str]:
        from .data import chat_ids
        from .runtime.generate import generate
        ids = [chat_ids(self.tok, p, chat) for p in prompts]
        printer = TextStream(self.tok) if stream and len(prompts) == 1 else None
        out = generate(self.model, ids, exit, max_new_tokens, eos=self.eos, pad_id=self.pad,
                       on_token=printer, compiled=self.compiled, **search)
        if printer:
            printer.end()
        return [self.tok.decode(o) for o in out]


class TextStream:
    """Prints one row's text as its tokens come (whole characters only)."""

    def __init__(self, tok):
        self.tok, self.ids, self.shown = tok, [], ""

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):         # a character still incomplete
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text

    def end(self) -> None:
        print(self.tok.decode(self.ids)[len(self.shown):], flush=True)


def cmd_generate(args) -> None:
    if (args.onnx is None) == (args.family is None):
        raise UserError("generate: give --family DIR (our int4 runtime) or --onnx DIR (onnxruntime-genai)")
    search = _search(args)
    if args.onnx is not None:
        if len(args.prompt) != 1:
            raise UserError("generate --onnx: give one prompt")
        from .cli_onnx import generate_onnx
        return generate_onnx(args, search)
    session = Session(args)
    exit = session.exit
    texts = session.answer(args.prompt, exit, search, args.max_new_tokens, not args.no_chat,
                           stream=True)
    if len(texts) > 1:
        for i, t in enumerate(texts):
            print(f"[{i}] {t}")
    print(f"[exit {exit}, {'int4' if session.fam.grids else args.dtype} on {session.device}]",
          file=sys.stderr)


CHAT_HELP = "/exit E switches the exit, /exits lists them, /reset forgets the conversation, /quit ends"


def cmd_chat(args) -> None:
    """A terminal chat: one model in memory, the exit switchable between turns."""
    search = _search(args)
    if sys.stdin is None or sys.stdin.closed:       # `0<&-`: there is no stream to read turns from
        raise UserError("chat: standard input is closed; run it in a terminal or pipe the turns in, "
                        "one per line")
    session = Session(args)
    config, exit = session.fam.config, session.exit
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    tty = sys.stdin.isatty()
    print(f"[exit {exit} of {config.exits}; {CHAT_HELP}]", file=sys.stderr)
    while True:
        try:
            line = input("you> " if tty else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/q"):
            break
        if line == "/exits":
            print(f"[exits {config.exits}; now {exit}]", file=sys.stderr)
            continue
        if line == "/reset":
            history = history[:1] if args.system else []
            print("[conversation cleared]", file=sys.stderr)
            continue
        if line.startswith("/exit"):
            try:
                exit = _one_exit(config, line.removeprefix("/exit").strip() or None)
            except UserError as e:
                print(f"[{e}]", file=sys.stderr)
                continue
            print(f"[exit {exit}]", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"[{line.split()[0]}: unknown; {CHAT_HELP}]", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        print(f"ruyi@{exit}> ", end="", flush=True)
        reply = session.answer([history], exit, search, args.max_new_tokens, True, stream=True)[0]
        history.append({"role": "assistant", "content": reply})


def cmd_eval_runtime(args, ref, fam, tok_dir, ev) -> None:
    """`eval --runtime int4`: the reference in bf16 (or --dtype) against the family in int4."""
    import json
    from .fsutil import atomic_dir, write_marker
    from .pipeline import eval_windows
    from .quant.calibrate import pick_device
    from .report import rich_table, runtime_cells, runtime_markdown, runtime_plot
    from .runtime.validate import runtime_report
    from .cli_options import _console
    if args.prefill < 1 or args.decode_tokens < 1 or args.prompts < 1 or args.repeats < 1:
        raise UserError("--prefill, --decode-tokens, --prompts and --repeats must be at least 1")
    device, dtype = pick_device(args.device), _dtype(args.dtype)
    con = _console()
    windows = eval_windows(tok_dir, ev)
    exits = ref.config.exit_list(ev.exits)

    def run():
        return runtime_report(ref, fam, windows, exits, device, dtype, args.prefill,
                              args.decode_tokens, args.prompts, args.repeats, ev.batch,
                              say=lambda m: con.print(m, markup=False),
                              compiled=_compiled(args, device))
    if args.out:
        with atomic_dir(Path(args.out), force=args.force, inputs=[args.reference, args.quantized],
                        kind="eval") as tmp:
            report = run()
            ref.verify()
            fam.verify()
            report["source"] = ev.source
            (tmp / "runtime.json").write_text(json.dumps(report, indent=2) + "\n")
            (tmp / "runtime.md").write_text(runtime_markdown(report))
            runtime_plot(report, tmp / "runtime.png")
            write_marker(tmp, {"kind": "eval"})
    else:
        report = run()
        ref.verify()
        fam.verify()
    con.print(rich_table(runtime_markdown(report).splitlines()[0], *runtime_cells(report)))


def add_runtime_args(s) -> None:
    """Options every command that loads a family on the runtime takes."""
    s.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    s.add_argument("--dtype", default="bf16", help="activations (and the float side): bf16 (default), "
                   "fp16, fp32")
    s.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="decode steps on a "
                   "static cache through torch.compile: auto (on CUDA, with CUDA graphs), on (the CPU too: "
                   "a minute of compiling per exit), off (eager)")


def add_eval_args(s) -> None:
    s.add_argument("--runtime", choices=["int4"], help="int4: run both families on the runtime, the "
                   "reference in --dtype against the quantized family in int4: accuracy, prefill and "
                   "decode tokens/s and peak memory per exit (runtime.json, .md, .png in --out)")
    add_runtime_args(s)
    s.add_argument("--prefill", type=int, default=256, help="--runtime: prompt tokens timed (default 256)")
    s.add_argument("--decode-tokens", type=int, default=32, help="--runtime: tokens decoded (default 32)")
    s.add_argument("--prompts", type=int, default=1, help="--runtime: batch of prompts timed (default 1)")
    s.add_argument("--repeats", type=int, default=3, help="--runtime: timed runs, median (default 3)")


def _search_args(s) -> None:
    s.add_argument("--exit", help="exit layer (default: the last)")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--sample", action="store_true", help="sample instead of greedy")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=50)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)


def add_parsers(sub) -> None:
    s = sub.add_parser("generate", help="generate text at one exit (our int4 runtime, or onnx)",
                       description="Generate at one exit of a quantized family on our int4 runtime "
                       "(--family; several prompts run as one left-padded batch), or of an ONNX export "
                       "with onnxruntime-genai (--onnx). Prompts go through the tokenizer's chat "
                       "template (--no-chat: as they are); greedy unless --sample.")
    s.add_argument("prompt", metavar="PROMPT", nargs="+")
    s.add_argument("--family", metavar="DIR", help="a family (quantized: int4 runtime; float: --dtype)")
    s.add_argument("--onnx", metavar="DIR", help="an onnx export: the job's onnx-* folder, one exit-E/ "
                   "folder, or the multi-exit folder")
    _search_args(s)
    add_runtime_args(s)
    s.add_argument("--no-chat", action="store_true", help="the prompt as it is, no chat template")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="a terminal chat with a family, the exit switchable per turn",
                       description=f"Chat with a quantized family on our int4 runtime. {CHAT_HELP}.")
    s.add_argument("--family", metavar="DIR", required=True)
    s.add_argument("--system", help="a system message")
    _search_args(s)
    add_runtime_args(s)
    s.set_defaults(func=cmd_chat)
