"""``qwen2audio eval``: the command-line face of the evaluator (parsing only; the work is in evaluate.py)."""

from __future__ import annotations

import argparse

TASK_NAMES = ("asr", "s2tt", "ser", "vsc", "audio-qa", "airbench-foundation", "airbench-chat", "mmau")

DESCRIPTION = """\
Evaluate a checkpoint (--model DIR, in this process) or any OpenAI-compatible server (--endpoint URL)
on a benchmark, with the official scoring rules of Qwen2-Audio, AIR-Bench and MMAU. Answers are
appended to OUTPUT/predictions*.jsonl as they come, so an interrupted run continues where it stopped
when started again with the same command. At the end OUTPUT holds results.jsonl (one line per item,
with the fields the official scorers read), summary.json and report.md (our numbers beside the paper's)."""

EPILOG = """\
data formats:
  asr, s2tt, ser, vsc     Qwen2-Audio eval JSONL: {"audio", "prompt", "source", "gt"} per line
  audio-qa                JSONL {"audio", "question", "source", "gt"} per line, asked in the chat
                          template; an empty question is voice chat (the instruction is in the audio)
  airbench-foundation     AIR-Bench folder with Foundation/Foundation_meta.json (or that file)
  airbench-chat           AIR-Bench folder with Chat/Chat_meta.json (or that file)
  mmau                    MMAU JSON list (mmau-test-mini.json), audio paths relative to it

sharding: under torchrun every rank answers items i % WORLD_SIZE == RANK and rank 0 scores after all
are done; --shard K/N does the same by hand (the last shard to finish scores, or use --merge)."""


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)


def register(subparsers) -> dict:
    p = subparsers.add_parser("eval", help="evaluate on ASR, S2TT, SER, VSC, audio QA, AIR-Bench or MMAU with the official metrics",
                              description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=TASK_NAMES, help="which benchmark format and metric")
    p.add_argument("--data", metavar="PATH", help="the benchmark file or folder (see 'data formats' below)")
    p.add_argument("--output", "-o", metavar="DIR", help="folder for answers, summary.json and report.md")
    p.add_argument("--merge", metavar="DIR",
                   help="do not generate: combine the part files in DIR (all shards), then score and report")
    p.add_argument("--audio-root", metavar="DIR",
                   help="folder that relative audio paths are relative to (default: next to the data file; "
                        "for AIR-Bench the Foundation/ or Chat/ folder)")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="evaluate only the first N items")

    from ..cli import add_model_options, add_sampling_options

    add_model_options(p, "answers from a model in this process (--device auto: under torchrun cuda:LOCAL_RANK)",
                      note=", run in this process")
    src = p.add_argument_group("or answers from a server (instead of --model)")
    src.add_argument("--endpoint", metavar="URL",
                     help="OpenAI-compatible server, e.g. http://localhost:8000/v1 (audio goes as input_audio parts; "
                          "base-model prompts are sent as the text after the audio, inside the chat template)")
    src.add_argument("--endpoint-model", metavar="NAME", help="model name to request (default: the first of /v1/models)")
    src.add_argument("--endpoint-api-key-env", metavar="VAR", help="environment variable holding the server's API key")

    gen = p.add_argument_group("generation")
    gen.add_argument("--batch-size", type=_positive_int, default=8, metavar="N",
                     help="items per model batch; with --endpoint, requests in flight at once (default: 8)")
    gen.add_argument("--full-audio", action="store_true",
                     help="--model only: give audio longer than 30 s to the model in 30 s windows (default: cut at "
                          "30 s, as the reference implementation and the published numbers do)")
    gen.add_argument("--timeout", type=float, default=600.0, metavar="S", help="seconds per HTTP request (default: 600)")
    gen.add_argument("--retries", type=_int_at_least(0), default=5, metavar="N",
                     help="retries of a failed HTTP request, with exponential backoff (default: 5)")

    add_sampling_options(p)

    sc = p.add_argument_group("scoring")
    sc.add_argument("--language", metavar="LANG",
                    help="asr: language of the transcripts, which picks the normaliser (en, zh, yue, fr, ...; "
                         "default: the prompt's <|lang|> tag, else the source name); s2tt: target language for the "
                         "BLEU tokenizer (default: from the source name, e.g. covost2_en_zh_test)")
    sc.add_argument("--strict", action="store_true",
                    help="airbench-foundation: count unparsable answers as wrong (the official score leaves them out)")

    run = p.add_argument_group("running")
    run.add_argument("--shard", metavar="K/N", help="answer only items i %% N == K (0 <= K < N), to split a run by hand")
    run.add_argument("--barrier-timeout", type=float, default=24.0, metavar="HOURS",
                     help="under torchrun, how long rank 0 waits for the other ranks (default: 24)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")

    judge = p.add_argument_group("AIR-Bench chat judge (any OpenAI-compatible server)")
    judge.add_argument("--judge-base-url", metavar="URL", help="e.g. https://api.openai.com/v1")
    judge.add_argument("--judge-model", metavar="NAME", help="e.g. gpt-4-0125-preview (the paper used GPT-4)")
    judge.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                       help="environment variable holding the judge's API key (default: OPENAI_API_KEY)")
    judge.add_argument("--judge-concurrency", type=_positive_int, default=8, metavar="N",
                       help="judge requests in flight at once (default: 8)")
    judge.add_argument("--judge-temperature", type=float, default=0.0, metavar="T",
                       help="default: 0, for repeatable scores (the official script used 1.0)")
    judge.add_argument("--judge-max-tokens", type=_positive_int, default=1024, metavar="N", help="default: 1024")
    return {"eval": handle}


def handle(args) -> int:
    from .evaluate import main

    return main(args)
