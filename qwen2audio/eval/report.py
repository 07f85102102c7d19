"""summary.json and report.md: our numbers next to the Qwen2-Audio paper's (SPEC section 4)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .runner import write_atomic

# (label, groups of alternatives that must all occur in the source name, paper, after HF conversion).
# Alternatives are '_'-joined word sequences matched on word boundaries, so 'en_de' differs from 'de_en'.
PAPER = {
    "asr": [
        ("LibriSpeech dev-clean", [["librispeech"], ["dev_clean"]], 1.3, 1.7),
        ("LibriSpeech dev-other", [["librispeech"], ["dev_other"]], 3.4, 3.6),
        ("LibriSpeech test-clean", [["librispeech"], ["test_clean"]], 1.6, 1.7),
        ("LibriSpeech test-other", [["librispeech"], ["test_other"]], 3.6, 4.0),
        ("Common Voice 15 en", [["cv15", "cv", "common_voice", "commonvoice"], ["en"]], 8.6, 8.7),
        ("Common Voice 15 zh", [["cv15", "cv", "common_voice", "commonvoice"], ["zh"]], 6.9, 6.5),
        ("Common Voice 15 yue", [["cv15", "cv", "common_voice", "commonvoice"], ["yue"]], 5.9, 5.9),
        ("Common Voice 15 fr", [["cv15", "cv", "common_voice", "commonvoice"], ["fr"]], 9.6, 9.6),
        ("Fleurs zh", [["fleurs", "fluers"], ["zh"]], 7.5, 7.0),
        ("Aishell2 Mic", [["aishell2", "aishell"], ["mic"]], 3.0, 3.2),
        ("Aishell2 iOS", [["aishell2", "aishell"], ["ios"]], 3.0, 3.1),
        ("Aishell2 Android", [["aishell2", "aishell"], ["android"]], 2.9, 2.9),
    ],
    "s2tt": [(f"CoVoST2 {a}-{b}", [["covost2", "covost"], [f"{a}_{b}"]], p, h) for a, b, p, h in [
        ("en", "de", 29.9, 29.6), ("de", "en", 35.2, 33.6), ("en", "zh", 45.2, 45.6), ("zh", "en", 24.4, 24.0),
        ("es", "en", 40.0, 38.7), ("fr", "en", 38.5, 37.2), ("it", "en", 36.3, 35.2)]],
    "ser": [("Meld", [["meld"]], 0.553, 0.535)],
    "vsc": [("VocalSound", [["vocalsound", "vocal_sound"]], 0.9392, 0.9395)],
}
PAPER_CHAT = {"speech": (7.18, 7.24), "sound": (6.99, 6.83), "music": (6.79, 6.73), "mixed": (6.77, 6.42)}


def paper_reference(task: str, source: str) -> tuple[str, float, float] | None:
    """The paper's row for a source name such as 'librispeech_test_clean' or 'covost2_en_zh_test'."""
    norm = "_" + "_".join(w for w in re.split(r"[^a-z0-9]+", source.lower()) if w) + "_"
    for label, groups, paper, hf in PAPER.get(task, []):
        if all(any(f"_{alt}_" in norm for alt in group) for group in groups):
            return label, paper, hf
    return None


def _fmt(x, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _rows(task: str, metrics: dict, strict: bool) -> list[list[str]]:
    rows = []
    if task in ("asr", "s2tt", "ser", "vsc", "audio-qa"):
        for source, m in metrics["sources"].items():
            ref = paper_reference(task, source)
            name = f"{source} ({ref[0]})" if ref else source
            if task == "asr":
                unit, ours, digits = f"{m['unit']} %", None if m["wer"] is None else 100 * m["wer"], 2
            elif task == "s2tt":
                unit, ours, digits = f"BLEU ({m['tokenize']})", m["bleu"], 2
            else:
                unit, ours, digits = "accuracy", m["accuracy"], 4
            rows.append([name, str(m["n"]), unit, _fmt(ours, digits),
                         _fmt(ref[1], digits) if ref else "—", _fmt(ref[2], digits) if ref else "—"])
    elif task == "airbench-foundation":
        key = "strict_accuracy" if strict else "accuracy"
        for name, t in metrics["tasks"].items():
            rows.append([name, str(t["parsed"] + t["unparsable"]), key, _fmt(t[key], 4), "—", "—"])
        rows.append(["average over tasks", str(metrics["parsed"] + metrics["unparsable"]), key,
                     _fmt(metrics["strict_task_average" if strict else "task_average"], 4), "—", "—"])
    elif task == "airbench-chat":
        for bucket in ("speech", "sound", "music", "mixed"):
            b = metrics.get("buckets", {}).get(bucket)
            paper, hf = PAPER_CHAT[bucket]
            rows.append([bucket, str(b["n"]) if b else "0", "judge score (reference's)",
                         f"{_fmt(b and b['model'])} ({_fmt(b and b['reference'])})", _fmt(paper), _fmt(hf)])
    elif task == "mmau":
        for field in ("task", "difficulty"):
            for name, t in metrics[field].items():
                rows.append([f"{field}: {name}", str(t["total"]), "accuracy", _fmt(t["accuracy"], 4), "—", "—"])
        rows.append(["total", str(metrics["total"]), "accuracy", _fmt(metrics["accuracy"], 4), "—", "—"])
    return rows


def render_markdown(summary: dict) -> str:
    task, metrics = summary["task"], summary.get("metrics") or {}
    lines = [f"# qwen2audio eval: {task}", "",
             f"- data: `{summary['data']}`",
             f"- answers from: {json.dumps(summary['backend'])}",
             f"- items: {summary['items']}, answered {summary['answered']}, unusable audio "
             f"{summary['audio_errors']}, failed in the model {summary['model_errors']}, "
             f"not yet answered {summary['unanswered']}", ""]
    if summary.get("note"):
        lines += [summary["note"], ""]
    if metrics:
        lines += ["| set | n | metric | ours | paper | after HF conversion |", "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in _rows(task, metrics, summary.get("strict", False))]
        lines.append("")
    if task == "airbench-foundation" and metrics:
        lines += [f"Unparsable answers: {metrics['unparsable']} "
                  f"({'counted as wrong' if summary.get('strict') else 'left out of the accuracy, as the official scorer does'}).", ""]
    if task == "airbench-chat" and metrics:
        lines += [f"Judged items: {metrics['judged']}; judge replies without two scores: {metrics['parse_failures']}; "
                  f"not judged: {metrics['unjudged']}. Each item is judged in both answer orders and the two scores "
                  "are averaged; mixed is the mean of speech_and_sound and speech_and_music.", ""]
    if task in ("ser", "vsc") and metrics:
        for source, m in metrics["sources"].items():
            predicted = sorted({p for row in m["confusion"].values() for p in row})
            lines += [f"Confusion for {source} (rows: reference, columns: answer):", "",
                      "| reference | " + " | ".join(predicted) + " |", "|---" * (len(predicted) + 1) + "|"]
            lines += [f"| {ref} | " + " | ".join(str(row.get(p, 0)) for p in predicted) + " |"
                      for ref, row in m["confusion"].items()]
            lines.append("")
    errors = summary["error_list"]
    if errors:
        lines += ["Items that could not be evaluated (rerun to retry them):", ""]
        lines += [f"- `{e['audio']}` ({e.get('stage', 'audio')}): {e['reason']}" for e in errors[:50]]
        if len(errors) > 50:
            lines.append(f"- ... and {len(errors) - 50} more (summary.json lists all)")
        lines.append("")
    return "\n".join(lines)


def write_reports(out_dir: Path, summary: dict) -> None:
    out_dir = Path(out_dir)
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    write_atomic(out_dir / "report.md", render_markdown(summary))
