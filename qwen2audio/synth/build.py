"""Build a corpus: check tools, plan, render in parallel (skipping finished files), write the
JSONL files, the manifest and the corpus README."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path

import numpy as np

from . import asterisk, music, plan, records, render, tts
from .errors import SynthError
from .evalsets import eval_file, write_eval_sets
from .knowledge import KNOWLEDGE_FILE, write_knowledge
from .split import SPLITS

FORMAT_VERSION = 2  # 2: template sentences in every language (a corpus dir of version 1 is refused)
SETTINGS_FILE = "build.json"


def check_sources(sources: set[str], counts: dict[str, int], soundfont: str | None) -> str | None:
    """Fail early, naming the Debian package, when a selected source's tools are missing.
    Returns the soundfont path when music is needed."""
    unknown = sources - set(plan.SOURCES)
    if unknown:
        raise SynthError(f"unknown source(s) {', '.join(sorted(unknown))}; choose from {', '.join(plan.SOURCES)}")
    tts.check_engines([e for e in plan.TTS_SOURCES if e in sources])
    if counts.get("asterisk"):
        asterisk.check_languages(sorted(asterisk.VOICES))
    needs_music = counts.get("music") or (counts.get("mixture") and "music" in sources)
    return music.check_music(soundfont) if needs_music else None


def _settings(seed, counts, sources, soundfont) -> dict:
    return {"format_version": FORMAT_VERSION, "seed": seed, "counts": counts, "sources": sorted(sources),
            "soundfont": soundfont}


def _claim_output(root: Path, settings: dict) -> None:
    """Resuming is only safe into a directory built with the same settings: the same file names
    would otherwise hold other audio."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / SETTINGS_FILE
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != settings:
            changed = ", ".join(k for k in settings if previous.get(k) != settings[k])
            raise SynthError(f"{root} holds a corpus built with other settings ({changed}); "
                             f"use a new --output directory")
    elif any(root.iterdir()):
        raise SynthError(f"{root} is not empty and holds no {SETTINGS_FILE}; use a new or empty --output directory")
    path.write_text(json.dumps(settings, indent=1) + "\n")


def _render_checked(spec, root, soundfont):
    try:
        return render.render_item(spec, root, soundfont)
    except Exception as e:  # name the item: a bare engine error says nothing about which text
        raise SynthError(f"item {spec['id']} ({spec['kind']}): {' '.join(str(e).split())}") from None


def _render_all(specs, root: Path, soundfont, jobs: int, progress: bool) -> dict[str, tuple[float, bool]]:
    from tqdm import tqdm

    work = partial(_render_checked, root=str(root), soundfont=soundfont)
    results = {}
    with tqdm(total=len(specs), desc="synth", unit="item", disable=not progress, dynamic_ncols=True) as bar:
        if jobs <= 1:
            iterator = map(work, specs)
            pool = None
        else:
            # fork: workers inherit the imported modules instead of re-importing torch per process
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            pool = context.Pool(jobs)
            iterator = pool.imap_unordered(work, specs, chunksize=max(1, min(16, len(specs) // (jobs * 8))))
        try:
            for item_id, duration, rendered in iterator:
                results[item_id] = (duration, rendered)
                bar.update()
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    return results


def _write_jsonl(path: Path, rows) -> int:
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def _raw_example(record: dict) -> dict:
    """The base model's raw prompt and target of a task record (what `--stage pretrain` trains on)."""
    from ..train.pretrain_tasks import example_from_record

    return example_from_record(record)


def _source_of(spec: dict) -> str:
    if "voice" in spec and spec["kind"] != "mixture":
        return tts.ENGINES[spec["voice"]["engine"]][0].replace("text2wave", "festival")
    return {"asterisk": "asterisk", "sound": "sounds", "music": "fluidsynth", "mixture": "mixture"}[spec["kind"]]


def write_outputs(root: Path, specs: list[dict], durations: dict[str, float], seed: int) -> dict:
    sft, pretrain, raw, items = defaultdict(list), defaultdict(list), defaultdict(list), []
    summary = {split: {"items": Counter(), "sources": Counter(), "languages": Counter(), "sft_records": 0,
                       "pretrain_tasks": Counter(), "seconds": defaultdict(float)} for split in SPLITS}
    for spec in specs:
        split, duration = spec["split"], durations[spec["id"]]
        s = summary[split]
        s["items"][spec["kind"]] += 1
        s["sources"][_source_of(spec)] += 1
        if spec.get("language"):
            s["languages"][spec["language"]] += 1
        s["seconds"][spec["kind"]] += duration
        sft[split] += records.sft_records(spec)
        for task, record in records.pretrain_records(spec):
            s["pretrain_tasks"][task] += 1
            pretrain[split].append(record)
            raw[split].append(_raw_example(record))
        items.append(records.item_metadata(spec, duration))
    # A seeded shuffle of the training files, so a trainer that reads in order still sees a mix;
    # the raw-prompt file keeps line i = task record i.
    order_rng = np.random.default_rng([seed, 7])
    sft_order, pretrain_order = (order_rng.permutation(len(t["train"])) for t in (sft, pretrain))
    sft["train"] = [sft["train"][i] for i in sft_order]
    pretrain["train"], raw["train"] = ([t["train"][i] for i in pretrain_order] for t in (pretrain, raw))
    files = {}
    for split in SPLITS:
        files[f"{split}.jsonl"] = _write_jsonl(root / f"{split}.jsonl", sft[split])
        files[f"pretrain_{split}.jsonl"] = _write_jsonl(root / f"pretrain_{split}.jsonl", pretrain[split])
        files[f"pretrain_raw_{split}.jsonl"] = _write_jsonl(root / f"pretrain_raw_{split}.jsonl", raw[split])
        summary[split]["sft_records"] = len(sft[split])
    files["items.jsonl"] = _write_jsonl(root / "items.jsonl", items)
    files[KNOWLEDGE_FILE] = write_knowledge(root, seed)
    files.update({eval_file(root, name).name: n for name, n in write_eval_sets(root).items()})
    for s in summary.values():
        s["total_seconds"] = round(sum(s["seconds"].values()), 1)
        s["seconds"] = {k: round(v, 1) for k, v in sorted(s["seconds"].items())}
        for key in ("items", "sources", "languages", "pretrain_tasks"):
            s[key] = dict(sorted(s[key].items()))
    return {"files": files, "splits": summary}


def build_corpus(output: str | Path, size: str = "small", seed: int = 0, jobs: int | None = None,
                 sources=None, soundfont: str | None = None, progress: bool = True) -> dict:
    """Build (or finish building) a corpus in `output`; returns the manifest."""
    start = time.perf_counter()
    if isinstance(sources, str):
        sources = [s.strip() for s in sources.split(",") if s.strip()]
    sources = set(plan.SOURCES if sources is None else sources)
    if jobs is None:
        jobs = os.cpu_count() or 1
    if jobs < 1:
        raise SynthError(f"--jobs must be >= 1, got {jobs}")
    counts = plan.parse_size(size, sources)
    soundfont = check_sources(sources, counts, soundfont)
    root = Path(output)
    settings = _settings(seed, counts, sources, soundfont)
    _claim_output(root, settings)
    for leftover in root.glob("audio/**/.*.tmp"):  # half-written files of an interrupted build
        leftover.unlink()
    specs = plan.make_plan(counts, seed, sources)
    if not specs:
        raise SynthError("nothing to build: every count is 0 for the selected --size and --sources")
    results = _render_all(specs, root, soundfont, jobs, progress)
    durations = {item_id: duration for item_id, (duration, _) in results.items()}
    manifest = {"settings": settings, **write_outputs(root, specs, durations, seed),
                "rendered_now": sum(rendered for _, rendered in results.values()),
                "reused": sum(not rendered for _, rendered in results.values()),
                "audio_bytes": sum((root / s["audio"]).stat().st_size for s in specs),
                "build_seconds": round(time.perf_counter() - start, 1)}
    languages = sorted({s["language"] for s in specs if s["kind"] == "asterisk"})
    attribution = asterisk.write_attribution(root / "ATTRIBUTION", languages) if languages else []
    # build_seconds and the reuse counts describe this run, not the corpus: kept out of the
    # manifest file so that two builds with the same settings write identical files.
    stable = {k: v for k, v in manifest.items() if k not in ("build_seconds", "rendered_now", "reused")}
    (root / "manifest.json").write_text(json.dumps(stable, indent=1, ensure_ascii=False) + "\n")
    from .readme import corpus_readme

    (root / "README.md").write_text(corpus_readme(stable, attribution))
    return manifest
