"""`ruyi-quant generate` and `ruyi-quant chat`: a family run directly by our int4 runtime
(runtime/), or an ONNX export by onnxruntime-genai. One loaded model, the exit chosen per call."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import UserError
from .eval import compiled
from .options import add_runtime_args, add_sampling_args, exits, one_exit, runtime, sampling

CHAT_HELP = "/exit E switches the exit, /exits lists them, /reset forgets the conversation, /quit ends"


def add_parser(sub) -> None:
    s = sub.add_parser(
        "generate",
        help="generate text at one exit (our int4 runtime, or onnx)",
        description="Generate at one exit of a quantized family on our int4 runtime "
        "(--family; several prompts run as one left-padded batch), or of an ONNX export "
        "with onnxruntime-genai (--onnx). Prompts go through the tokenizer's chat "
        "template (--no-chat: as they are); greedy unless --sample.",
    )
    s.add_argument("prompt", metavar="PROMPT", nargs="+")
    s.add_argument("--family", metavar="DIR", help="a family (quantized: int4 runtime; float: --dtype)")
    s.add_argument(
        "--onnx",
        metavar="DIR",
        help="an onnx export: the job's onnx-* folder, one exit-E/ folder, or the multi-exit folder",
    )
    add_sampling_args(s)
    add_runtime_args(s)
    s.add_argument("--no-chat", action="store_true", help="the prompt as it is, no chat template")
    s.set_defaults(func=run_generate)

    s = sub.add_parser(
        "chat",
        help="a terminal chat with a family, the exit switchable per turn",
        description=f"Chat with a quantized family on our int4 runtime. {CHAT_HELP}.",
    )
    s.add_argument("--family", metavar="DIR", required=True)
    s.add_argument("--system", help="a system message")
    add_sampling_args(s)
    add_runtime_args(s)
    s.set_defaults(func=run_chat)


class Session:
    """A quantized family loaded once on the int4 runtime (float when it has no grids)."""

    def __init__(self, args):
        from ..pipeline import open_family
        from ..quant.calibrate import pick_device
        from ..recipe import dtype_of
        from ..runtime.model import int4_model
        from ..text import load_tokenizer

        rt = runtime(args)
        self.device = pick_device(rt.device)
        self.dtype = rt.dtype
        self.fam, tok_dir = open_family(args.family)
        self.exit = one_exit(self.fam.config, args.exit)  # a bad exit: before any loading
        self.tok = load_tokenizer(tok_dir)
        self.model = int4_model(self.fam, self.device, dtype_of(rt.dtype))
        self.fam.verify()  # before the first token: the files were intact
        self.compiled = compiled(rt, self.device)
        self.eos = {
            t
            for t in (self.tok.eos_token_id, self.tok.convert_tokens_to_ids("<|im_end|>"))
            if isinstance(t, int) and t >= 0 and t != self.tok.unk_token_id
        }
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0

    def answer(self, prompts: list, exit: int, picking, chat: bool, stream: bool) -> list[str]:
        from ..runtime.generate import generate
        from ..text import chat_ids

        ids = [chat_ids(self.tok, p, chat) for p in prompts]
        printer = TextStream(self.tok) if stream and len(prompts) == 1 else None
        out = generate(
            self.model,
            ids,
            exit,
            picking.max_new_tokens,
            eos=self.eos,
            pad_id=self.pad,
            on_token=printer,
            compiled=self.compiled,
            **picking.search(),
        )
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
        if not text.endswith("\ufffd"):  # a character still incomplete
            print(text[len(self.shown) :], end="", flush=True)
            self.shown = text

    def end(self) -> None:
        print(self.tok.decode(self.ids)[len(self.shown) :], flush=True)


def run_generate(args) -> None:
    if (args.onnx is None) == (args.family is None):
        raise UserError("generate: give --family DIR (our int4 runtime) or --onnx DIR (onnxruntime-genai)")
    picking = sampling(args)
    if args.onnx is not None:
        if len(args.prompt) != 1:
            raise UserError("generate --onnx: give one prompt")
        return generate_onnx(args, picking)
    session = Session(args)
    exit = session.exit
    texts = session.answer(args.prompt, exit, picking, not args.no_chat, stream=True)
    if len(texts) > 1:
        for i, t in enumerate(texts):
            print(f"[{i}] {t}")
    print(
        f"[exit {exit}, {'int4' if session.fam.grids else session.dtype} on {session.device}]",
        file=sys.stderr,
    )


def generate_onnx(args, picking) -> None:
    """`generate --onnx DIR`: one prompt through onnxruntime-genai."""
    from ..errors import require

    require("onnxruntime_genai", "generate --onnx", "pip install 'ruyi-quant[onnx]'")
    from ..exporters.onnx.runner import generate

    exit = None if args.exit in (None, "last") else exits(args.exit, "--exit")
    if isinstance(exit, list) and len(exit) != 1:
        raise UserError(f"--exit {args.exit}: give one exit layer")
    res = generate(
        Path(args.onnx),
        args.prompt[0],
        exit[0] if exit else None,
        picking.max_new_tokens,
        chat=not args.no_chat,
        on_text=lambda piece: print(piece, end="", flush=True),
        **picking.search(),
    )
    print()
    print(
        f"[exit {res['exit']}: {res['prompt_tokens']} prompt tokens, {len(res['tokens'])} new]",
        file=sys.stderr,
    )


def run_chat(args) -> None:
    """A terminal chat: one model in memory, the exit switchable between turns."""
    picking = sampling(args)
    if sys.stdin is None or sys.stdin.closed:  # `0<&-`: there is no stream to read turns from
        raise UserError(
            "chat: standard input is closed; run it in a terminal or pipe the turns in, one per line"
        )
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
                exit = one_exit(config, line.removeprefix("/exit").strip() or None)
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
        reply = session.answer([history], exit, picking, True, stream=True)[0]
        history.append({"role": "assistant", "content": reply})
