"""The ``qwen2audio`` command: ``ask``, ``chat`` and ``transcribe`` from a terminal.

User errors (unreadable audio, a bad checkpoint, invalid options) are printed as one line
``qwen2audio: error: <message>`` on stderr with exit status 2; Ctrl-C exits with status 130.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time

from .errors import Qwen2AudioError

PROG = "qwen2audio"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

CHAT_HELP = """\
commands inside the chat (one per line):
  /audio PATH   attach an audio file to your next message (repeatable)
  /reset        forget the conversation (and any attached audio)
  /help         show these commands
  /exit, /quit  quit (end of input quits too)
any other line is your message; an empty line sends the attached audio alone (voice
chat), or is ignored when no audio is attached"""


class UserError(Qwen2AudioError):
    """An error caused by the command's input, reported without a traceback."""


def _version() -> str:
    from . import __version__

    return __version__


# ---- argument parsing --------------------------------------------------------------------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16"]


def add_model_options(parser: argparse.ArgumentParser, title: str = "model", note: str = ""):
    """--model, --device and --dtype, as every command takes them (one definition for ask, chat,
    transcribe, serve and eval). Returns the group, for a command's own model options."""
    model = parser.add_argument_group(title)
    model.add_argument("--model", metavar="DIR", default=None,
                       help=f"checkpoint directory in the Hugging Face layout (config.json, safetensors weights, "
                            f"tokenizer files){note}; default: the project's default model (Whisper base encoder + "
                            f"Qwen2.5-Coder-0.5B-Instruct), assembled from its pinned packages on first use into "
                            f"$QWEN2AUDIO_HOME/default-model (~/.cache/qwen2audio/default-model)")
    model.add_argument("--device", default="auto", metavar="DEVICE",
                       help="auto (cuda when available, else cpu), cpu, cuda or cuda:N (default: auto)")
    model.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                       help="weight and compute dtype; auto is float32 on cpu and the checkpoint's stored dtype "
                            "on cuda (default: auto)")
    model.add_argument("--quantize", default=None, choices=["int8", "int4"],
                       help="weight-only quantisation of the language model, done on load: int8 (per channel) or "
                            "int4 (groups of 32; lm_head int8); faster decoding on cpu (default: none)")
    return model


def add_truncate_option(group) -> None:
    group.add_argument("--truncate", action="store_true",
                       help="keep only the first 30 s of every audio, like the reference implementation "
                            "(default: longer audio is split into consecutive 30 s windows, all given to the model)")


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-new-tokens", type=positive_int, default=256, metavar="N",
                          help="stop after N generated tokens (default: 256)")
    sampling.add_argument("--temperature", type=float, default=0.0, metavar="T",
                          help="sampling temperature; 0 picks the most likely token (greedy) (default: 0)")
    sampling.add_argument("--top-p", type=float, default=1.0, metavar="P",
                          help="nucleus sampling: sample from the smallest set of most likely tokens whose "
                               "probabilities add up to P; 1 disables it; only with --temperature > 0 (default: 1)")
    sampling.add_argument("--top-k", type=int, default=0, metavar="K",
                          help="sample from the K most likely tokens only; 0 disables it; only with --temperature > 0 "
                               "(default: 0)")
    sampling.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                          help="divide positive / multiply negative logits of tokens already in the prompt or "
                               "answer by R; 1 disables it (default: 1)")
    sampling.add_argument("--seed", type=int, default=None, metavar="N",
                          help="random seed for sampling, for reproducible answers (used only with "
                               "--temperature > 0)")
    sampling.add_argument("--stop", action="append", default=None, metavar="TEXT",
                          help="end the answer where TEXT appears; TEXT itself is not printed (repeatable)")


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ask, chat and transcribe: model loading, then sampling."""
    add_truncate_option(add_model_options(parser))
    add_sampling_options(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Qwen2-Audio from the command line: ask about audio files, chat, transcribe speech.",
        epilog="Run 'qwen2audio COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    ask = sub.add_parser(
        "ask", help="ask one question about audio files (or text only)",
        description="Ask one question and print the answer. With audio files only, the audio is the whole "
                    "user message (voice chat: the model answers what is said). With --prompt, the audio "
                    "files come first and the prompt text after them (audio analysis). With --prompt and no "
                    "audio, the question is text only.",
    )
    ask.add_argument("audio", nargs="*", metavar="AUDIO",
                     help="audio files (wav, flac, mp3, ogg, m4a, ...), in the order the model sees them")
    ask.add_argument("--prompt", "-p", metavar="TEXT", default=None,
                     help="the question or instruction, placed after the audio")
    ask.add_argument("--system", metavar="TEXT", default=None,
                     help="system message (default: the chat template's 'You are a helpful assistant.'); "
                          "not used with --raw")
    ask.add_argument("--stream", action="store_true", help="print the answer's text as it is generated (with --raw the answer is printed "
                          "once complete)")
    ask.add_argument("--raw", action="store_true",
                     help="use the base model's raw prompt (one <|audio_bos|><|AUDIO|><|audio_eos|> block per "
                          "audio, then the prompt text) instead of the chat template, e.g. with --prompt "
                          "'Generate the caption in English:'")

    chat = sub.add_parser(
        "chat", help="interactive multi-turn chat (reads lines from stdin)",
        description=textwrap.fill("Multi-turn chat: each input line is a user message, the answer is printed "
                                  "as it is generated, and the conversation so far is sent with every turn.", 78),
        epilog=CHAT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chat.add_argument("--audio", action="append", default=None, metavar="FILE",
                      help="attach an audio file to the first message (repeatable)")
    chat.add_argument("--system", metavar="TEXT", default=None,
                      help="system message (default: the chat template's 'You are a helpful assistant.')")

    tr = sub.add_parser(
        "transcribe", help="transcribe speech in audio files",
        description="Transcribe each audio file with the ASR prompt ('Detect the language and recognize the "
                    "speech:' in the base model's raw format) and print one line per file, prefixed with "
                    "'FILE: ' when several files are given. Tags such as <|en|> are removed from the "
                    "transcript and line breaks inside it become spaces.",
    )
    tr.add_argument("audio", nargs="+", metavar="AUDIO", help="audio files to transcribe")
    tr.add_argument("--language", metavar="LANG", default=None,
                    help="language code of the speech (e.g. en, zh): the tag <|LANG|> is appended to the ASR "
                         "prompt so the model does not have to detect the language")
    tr.add_argument("--chat", action="store_true",
                    help="ask through the chat template ('Transcribe the speech.') instead of the raw ASR "
                         "prompt; --language is then ignored")
    for command in (ask, chat, tr):
        add_common_options(command)
    for module in feature_modules():
        COMMANDS.update(module.register(sub))
    return parser


# Subcommands that live next to their feature (serve, train, eval, synth, assemble). Each such module defines
# `register(subparsers) -> {name: handler(args) -> int}`, importing heavy dependencies only inside
# the handlers, so that `--help` stays fast. Errors they raise follow the same rules as below.
FEATURE_MODULES = ("qwen2audio.server.cli", "qwen2audio.train.cli", "qwen2audio.eval.cli", "qwen2audio.synth.cli",
                   "qwen2audio.bundle.cli")


def feature_modules():
    import importlib
    import importlib.util

    for name in FEATURE_MODULES:
        if importlib.util.find_spec(name.rsplit(".", 1)[0]) and importlib.util.find_spec(name):
            yield importlib.import_module(name)


# ---- helpers -----------------------------------------------------------------------------------
def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text


def _report(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def sampling_params(args):
    """The sampling flags of `add_sampling_options` as checked SamplingParams (before any model loads)."""
    from .engine.sampling import SamplingError, SamplingParams

    try:
        return SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            repetition_penalty=args.repetition_penalty, seed=args.seed, stop=list(args.stop or []),
        )
    except SamplingError as e:  # name the command-line flag, not the Python field
        message = str(e)
        for field in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop"):
            message = message.replace(field, "--" + field.replace("_", "-"), 1) if message.startswith(field) else message
        raise UserError(message) from None


def resolve_device(name: str) -> str | None:
    """--device: None for auto (load() picks), else the checked device name (DeviceError if unusable)."""
    if name == "auto":
        return None
    from .api import check_device

    check_device(name)
    return name


def load_pipeline(args, truncate: bool | None = None):
    """The model of `add_model_options`' flags, loaded with progress on stderr."""
    from . import api

    device = resolve_device(args.device)
    where = args.model
    if where is None:
        from .bundle.assemble import default_model

        where = default_model()  # assembled first (one line on stderr) when missing or out of date
    print(f"Loading model from {where} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    pipe = api.load(where, device=device, dtype=args.dtype, progress=True,
                    truncate=args.truncate if truncate is None else truncate, quantize=getattr(args, "quantize", None))
    print(f"Model loaded in {time.perf_counter() - start:.1f} s.", file=sys.stderr, flush=True)
    return pipe


def _decode_audio(path: str):
    """Decode a file up front (fast failure, with the file name in the message) to 16 kHz mono."""
    from .audio import load_audio

    return load_audio(path)


def _audio_parts(clips) -> list[dict]:
    return [{"type": "audio", "audio": clip} for clip in clips]


def _emit(pieces) -> str:
    """Print streamed pieces as they come, then a newline; return the whole text."""
    out = []
    try:
        for piece in pieces:
            out.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except BaseException:
        if out:  # end the partial answer's line before the error is reported
            sys.stdout.write("\n")
            sys.stdout.flush()
        raise
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(out)


# ---- subcommands -------------------------------------------------------------------------------
def ask_messages(clips, prompt: str | None, system: str | None = None) -> list[dict]:
    """The single user turn `ask` sends: audio parts then the prompt (voice chat when no prompt)."""
    if clips:
        content = _audio_parts(clips) + ([{"type": "text", "text": prompt}] if prompt is not None else [])
    else:
        content = prompt
    messages = [{"role": "user", "content": content}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def cmd_ask(args) -> int:
    if not args.audio and args.prompt is None:
        raise UserError("ask needs audio files, --prompt TEXT, or both")
    sampling = sampling_params(args)
    clips = [_decode_audio(p) for p in args.audio]
    pipe = load_pipeline(args)
    if args.raw:
        from .chat import raw_prompt

        prompts = [raw_prompt(args.prompt or "", len(clips))]
        print(pipe.complete(prompts, clips or None, sampling)[0], flush=True)
        return 0
    messages = ask_messages(clips, args.prompt, args.system)
    if args.stream:
        _emit(pipe.stream(messages, sampling))
    else:
        print(pipe.chat(messages, sampling), flush=True)
    return 0


def one_line(text: str) -> str:
    """A transcript on one output line: its line breaks become spaces."""
    return " ".join(text.splitlines())


def cmd_transcribe(args) -> int:
    sampling = sampling_params(args)
    clips = [_decode_audio(p) for p in args.audio]
    pipe = load_pipeline(args)
    for path, clip in zip(args.audio, clips):
        text = one_line(pipe.transcribe(clip, language=args.language, chat=args.chat, sampling=sampling))
        print(f"{path}: {text}" if len(args.audio) > 1 else text, flush=True)
    return 0


def _input_lines():
    """User lines: with a terminal, prompt with input() (line editing); otherwise read stdin as is."""
    if sys.stdin.isatty():
        while True:
            try:
                yield input(">>> ")
            except EOFError:
                print(file=sys.stderr)
                return
    else:
        for line in sys.stdin:
            yield line.rstrip("\r\n")


def cmd_chat(args) -> int:
    sampling = sampling_params(args)
    pending = [(p, _decode_audio(p)) for p in args.audio or []]
    pipe = load_pipeline(args)
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    history: list[dict] = []
    if sys.stdin.isatty():
        print("Type a message; /help lists the commands.", file=sys.stderr, flush=True)
    for line in _input_lines():
        text = line.strip()
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            rest = rest.strip()
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                history, pending = [], []
                print("(conversation cleared)", file=sys.stderr, flush=True)
            elif command == "/help":
                print(CHAT_HELP, file=sys.stderr, flush=True)
            elif command == "/audio":
                path = rest.strip("\"'")
                if not path:
                    _report("/audio needs a file path")
                    continue
                try:
                    pending.append((path, _decode_audio(path)))
                except Qwen2AudioError as e:
                    _report(_one_line(e))
                    continue
                print(f"(attached {path})", file=sys.stderr, flush=True)
            else:
                _report(f"unknown command {command}; /help lists the commands")
            continue
        if not text and not pending:
            continue
        content = _audio_parts([clip for _, clip in pending])
        if text:
            content.append({"type": "text", "text": text})
        turn = {"role": "user", "content": content}
        try:
            answer = _emit(pipe.stream(system + history + [turn], sampling))
        except Qwen2AudioError as e:  # e.g. the conversation no longer fits the model: drop this turn
            _report(_one_line(e))
            continue
        history += [turn, {"role": "assistant", "content": answer}]
        pending = []
    return 0


COMMANDS = {"ask": cmd_ask, "chat": cmd_chat, "transcribe": cmd_transcribe}


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None):
    """parse_args, but an unknown flag after a command is reported with that command's usage (argparse's own
    report shows the top-level usage, which does not list the flag the user is looking for)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        subparsers.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        try:
            sys.stdout.flush()
        except Exception:
            pass
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, without a second error at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (Qwen2AudioError, OSError) as e:
        # Qwen2AudioError: AudioError, CheckpointError, ConfigError, TokenizerError, MessageError, SamplingError,
        # PromptTooLong, DeviceError, the evaluator's errors, UserError. OSError: files, disks and sockets.
        # Anything else is a bug and keeps its traceback.
        _report(_one_line(e))
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
