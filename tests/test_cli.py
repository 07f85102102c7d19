"""The `qwen2audio` command, run as a real subprocess (`python -m qwen2audio`) on a tiny random checkpoint.

Every subprocess imports torch (a few seconds), so all of them are started together by one fixture
(a small thread pool) and each test waits for the runs it checks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf
from tiny import sine

import qwen2audio
import qwen2audio.api  # monkeypatched below: imported here, so a test run alone finds it
from qwen2audio import cli

N = 12  # max new tokens: enough text to compare, quick on CPU
QUESTION = "What's that sound?"


@pytest.fixture(scope="module")
def files(tiny_checkpoint, tmp_path_factory):
    """Audio files (good and bad) and checkpoint directories (good and bad)."""
    root = tmp_path_factory.mktemp("cli")
    directory = tiny_checkpoint[0]
    f = {"model": directory, "root": root}
    f["a"], f["b"] = root / "a.wav", root / "b.flac"
    sf.write(f["a"], sine(1.0, 440, seed=1), 16000)
    sf.write(f["b"], sine(0.7, 880, seed=2), 16000)
    f["corrupt"] = root / "corrupt.wav"
    f["corrupt"].write_bytes(np.random.default_rng(0).bytes(4000))
    f["short"] = root / "short.wav"
    sf.write(f["short"], sine(100 / 16000), 16000)  # 100 samples
    f["missing"] = root / "missing.wav"
    f["no_model"] = root / "no_such_model"
    f["no_weights"] = root / "no_weights"
    f["no_weights"].mkdir()
    for p in directory.iterdir():  # everything but the safetensors weights
        if not p.name.endswith(".safetensors"):
            shutil.copy(p, f["no_weights"] / p.name)
    return f


def _commands(f) -> dict[str, tuple[list[str], str | None]]:
    m = ["--model", str(f["model"]), "--device", "cpu", "--max-new-tokens", str(N)]
    a, b = str(f["a"]), str(f["b"])
    chat_input = f"/audio {a}\n{QUESTION}\n/audio {f['missing']}\n/audio {b}\nAnd this one?\n/exit\nnever sent\n"
    return {
        "voice": (["ask", a, *m], None),
        "analysis": (["ask", a, b, "--prompt", QUESTION, *m], None),
        "analysis_stream": (["ask", a, b, "--prompt", QUESTION, "--stream", *m], None),
        "raw": (["ask", a, "--raw", "--prompt", "Generate the caption in English:", *m], None),
        "transcribe": (["transcribe", a, b, "--language", "en", *m], None),
        "chat": (["chat", *m], chat_input),
        "version": (["--version"], None),
        "err_missing": (["ask", str(f["missing"]), *m], None),
        "err_corrupt": (["ask", str(f["corrupt"]), "--prompt", QUESTION, *m], None),
        "err_short": (["transcribe", str(f["short"]), *m], None),
        "err_no_model": (["ask", a, "--model", str(f["no_model"])], None),
        "err_no_weights": (["transcribe", a, "--model", str(f["no_weights"])], None),
        "err_temperature": (["ask", a, *m, "--temperature", "-0.5"], None),
    }


def _run(args: list[str], stdin: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    proc = subprocess.run([sys.executable, "-m", "qwen2audio", *args], input=None if stdin is None else stdin.encode(),
                          capture_output=True, env=env, timeout=300)
    # Bytes decoded by hand: no newline translation, so stdout compares exactly with the API's text.
    proc.stdout, proc.stderr = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    return proc


@pytest.fixture(scope="module")
def runs(files):
    """name -> Future of the CompletedProcess; every command starts at once."""
    pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
    futures = {name: pool.submit(_run, args, stdin) for name, (args, stdin) in _commands(files).items()}
    yield futures
    pool.shutdown(wait=True)


def result(runs, name) -> subprocess.CompletedProcess:
    proc = runs[name].result()
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def ok(runs, name) -> str:
    proc = result(runs, name)
    assert proc.returncode == 0, proc.stderr
    assert "error" not in proc.stderr.lower(), proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def pipe(files):
    return qwen2audio.load(files["model"], device="cpu", progress=False)


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def audio(path):
    return {"type": "audio", "audio": str(path)}


def text(t):
    return {"type": "text", "text": t}


# ---- answers equal the Python API --------------------------------------------------------------
def test_ask_voice_chat_matches_api(runs, pipe, files):
    expected = pipe.chat(user(audio(files["a"])), max_new_tokens=N)
    assert expected  # the tiny model does answer something
    out = ok(runs, "voice")
    assert out == expected + "\n"
    # Voice chat and analysis are different prompts, so the answers differ.
    assert out != pipe.chat(user(audio(files["a"]), text(QUESTION)), max_new_tokens=N) + "\n"


def test_ask_analysis_matches_api(runs, pipe, files):
    expected = pipe.chat(user(audio(files["a"]), audio(files["b"]), text(QUESTION)), max_new_tokens=N)
    assert ok(runs, "analysis") == expected + "\n"


def test_ask_stream_equals_non_stream(runs):
    assert ok(runs, "analysis_stream") == ok(runs, "analysis")


def test_ask_raw_matches_complete(runs, pipe, files):
    from qwen2audio.chat import raw_prompt

    expected = pipe.complete([raw_prompt("Generate the caption in English:", 1)], [str(files["a"])], max_new_tokens=N)[0]
    assert ok(runs, "raw") == expected + "\n"


def test_ask_text_only(pipe, files, capsys):
    # In-process (the subprocess path is covered above): --prompt without audio is a text-only question.
    rc = cli.main(["ask", "--prompt", "hello world", "--model", str(files["model"]), "--device", "cpu",
                   "--max-new-tokens", str(N)])
    assert rc == 0
    assert capsys.readouterr().out == pipe.chat([{"role": "user", "content": "hello world"}], max_new_tokens=N) + "\n"


def test_transcribe_one_line_per_file(runs, pipe, files):
    lines = ok(runs, "transcribe").split("\n")
    assert lines[-1] == ""  # ends with a newline
    # One line per file: line breaks inside a transcript are printed as spaces.
    expected = [f"{files[k]}: " + " ".join(pipe.transcribe(str(files[k]), language="en", max_new_tokens=N).splitlines())
                for k in ("a", "b")]
    assert lines[:-1] == expected


def test_chat_two_turns_with_audio(runs, pipe, files):
    proc = result(runs, "chat")
    assert proc.returncode == 0, proc.stderr
    # The bad /audio line is one error line; the chat goes on.
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == [f"qwen2audio: error: {files['missing']}: file not found"]
    turn1 = user(audio(files["a"]), text(QUESTION))
    answer1 = pipe.chat(turn1, max_new_tokens=N)
    # The second turn sees the first one (history), and only the audio attached after it.
    turn2 = [*turn1, {"role": "assistant", "content": answer1}, *user(audio(files["b"]), text("And this one?"))]
    answer2 = pipe.chat(turn2, max_new_tokens=N)
    assert answer2 != pipe.chat(user(audio(files["b"]), text("And this one?")), max_new_tokens=N)  # history matters
    assert proc.stdout == f"{answer1}\n{answer2}\n"  # nothing after /exit


# ---- help and version --------------------------------------------------------------------------
def test_version(runs):
    assert ok(runs, "version").strip() == f"qwen2audio {qwen2audio.__version__}"


COMMON = ["--model", "--device", "--dtype", "--truncate", "--max-new-tokens", "--temperature", "--top-p",
          "--top-k", "--repetition-penalty", "--seed", "--stop"]


@pytest.mark.parametrize("command, specific", [
    (None, ["ask", "chat", "transcribe", "--version"]),
    ("ask", ["AUDIO", "--prompt", "--stream", "--raw", "--system"]),
    ("chat", ["--audio", "--system", "/audio", "/reset", "/exit"]),
    ("transcribe", ["AUDIO", "--language", "--chat"]),
    ("eval", [o for o in COMMON if o != "--truncate"] + ["--endpoint", "--full-audio"]),
    ("serve", ["--model", "--device", "--dtype", "--truncate", "--served-model-name", "--port"]),
])
def test_help(command, specific, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(([command] if command else []) + ["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in specific + (COMMON if command in ("ask", "chat", "transcribe") else []):
        assert option in out, option


# ---- user errors: one line, exit 2, no traceback -----------------------------------------------
@pytest.mark.parametrize("name, words", [
    ("err_missing", ["missing.wav", "not found"]),
    ("err_corrupt", ["corrupt.wav", "cannot decode"]),
    ("err_short", ["short.wav", "too short"]),
    ("err_no_model", ["no_such_model"]),
    ("err_no_weights", ["no_weights", "model.safetensors"]),
    ("err_temperature", ["--temperature", ">= 0"]),
])
def test_user_errors(runs, name, words):
    proc = result(runs, name)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("qwen2audio: error:")]
    assert len(errors) == 1, proc.stderr
    assert all(w in errors[0] for w in words), errors[0]
    assert "error" not in proc.stderr.replace(errors[0], "")  # no other error output


def test_ask_needs_audio_or_prompt(files, capsys):
    assert cli.main(["ask", "--model", str(files["model"])]) == 2
    assert capsys.readouterr().err.strip() == "qwen2audio: error: ask needs audio files, --prompt TEXT, or both"


def test_prompt_too_long(files, capsys):
    rc = cli.main(["ask", str(files["a"]), "--model", str(files["model"]), "--device", "cpu",
                   "--max-new-tokens", "100000"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "qwen2audio: error: prompt of" in err and "exceeds" in err


def _fake_default_model(home, checkpoint):
    """$QWEN2AUDIO_HOME/default-model holding the tiny checkpoint, recorded as current (nothing to assemble)."""
    import json

    from qwen2audio.bundle import assemble

    target = home / "default-model"
    shutil.copytree(checkpoint, target)
    trained = assemble.TRAINED_FILE if assemble.TRAINED_FILE.is_file() else None
    (target / assemble.RECORD).write_text(json.dumps(assemble._record(trained)))
    return target


def test_without_model_every_surface_uses_the_default_model(files, tmp_path, monkeypatch, capsys):
    from qwen2audio.bundle import assemble
    from qwen2audio.server.cli import DEFAULT_NAME, served_name

    monkeypatch.setenv("QWEN2AUDIO_HOME", str(tmp_path))
    target = _fake_default_model(tmp_path, files["model"])
    monkeypatch.setattr(assemble, "assemble", lambda *a, **k: pytest.fail("a current default model was assembled"))
    assert assemble.default_model() == target
    assert cli.main(["ask", str(files["a"]), "--device", "cpu", "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert f"Loading model from {target} ..." in captured.err and captured.out.strip()
    assert captured.out == qwen2audio.load(target, device="cpu", progress=False).chat(
        [{"role": "user", "content": [{"type": "audio", "audio": str(files["a"])}]}], max_new_tokens=4) + "\n"
    assert qwen2audio.load(device="cpu", progress=False).model.config.to_dict() == \
        qwen2audio.load(target, device="cpu", progress=False).model.config.to_dict()
    assert served_name(None, None) == DEFAULT_NAME == "qwen2audio-default"


def test_an_out_of_date_default_model_is_assembled_first(files, tmp_path, monkeypatch, capsys):
    from qwen2audio.bundle import assemble

    monkeypatch.setenv("QWEN2AUDIO_HOME", str(tmp_path))
    calls = []

    def fake_assemble(directory=None, quiet=False, **kwargs):
        calls.append(directory)
        _fake_default_model(tmp_path, files["model"])
        return directory

    monkeypatch.setattr(assemble, "assemble", fake_assemble)
    assert assemble.default_model() == tmp_path / "default-model" and calls == [tmp_path / "default-model"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "assembling the default model into" in err
    assert assemble.default_model() == tmp_path / "default-model" and len(calls) == 1  # now current


def test_a_missing_part_package_is_one_line(files, tmp_path, monkeypatch, capsys):
    from qwen2audio.bundle import assemble
    from qwen2audio.bundle.parts import MissingPartError, Part

    monkeypatch.setenv("QWEN2AUDIO_HOME", str(tmp_path))  # nothing assembled there
    gone = Part("language model (test)", (("q2a-no-such-part==1.0", "q2a_no_such_part", "data/part.bin"),), 1, "0" * 64,
                "MIT", "nowhere")
    monkeypatch.setattr(assemble, "PARTS", (gone,))
    with pytest.raises(MissingPartError, match="needs the package q2a-no-such-part==1.0"):
        qwen2audio.load(device="cpu", progress=False)
    capsys.readouterr()
    for argv in (["ask", str(files["a"])], ["eval", "--task", "vsc", "--data", str(files["a"]), "--output",
                                            str(tmp_path / "out")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "qwen2audio: error: the default model's language model (test) needs the package q2a-no-such-part" in err
        assert "Traceback" not in err and not (tmp_path / "default-model").exists()


def test_ctrl_c_exits_130_quietly(files, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(qwen2audio.api, "load", interrupted)
    assert cli.main(["ask", str(files["a"]), "--model", str(files["model"])]) == 130
    captured = capsys.readouterr()
    assert "error" not in captured.err and "Traceback" not in captured.err
    assert captured.out == ""


# ---- issue 20: errors, usage, serve's socket -----------------------------------------------------
def test_a_bug_keeps_its_traceback_and_a_user_error_does_not(files, monkeypatch, capsys):
    def bug(*args, **kwargs):
        raise ValueError("a stray ValueError deep inside")

    monkeypatch.setattr(qwen2audio.api, "load", bug)
    with pytest.raises(ValueError, match="stray"):  # not reported as the user's mistake
        cli.main(["ask", str(files["a"]), "--model", str(files["model"])])

    def user_error(*args, **kwargs):
        raise qwen2audio.errors.Qwen2AudioError("your checkpoint is odd")

    monkeypatch.setattr(qwen2audio.api, "load", user_error)
    assert cli.main(["ask", str(files["a"]), "--model", str(files["model"])]) == 2
    assert capsys.readouterr().err.endswith("qwen2audio: error: your checkpoint is odd\n")


@pytest.mark.parametrize("command", ["train", "export-checkpoint"])
def test_train_commands_report_only_their_user_errors(command, tmp_path, monkeypatch, capsys):
    """train and export-checkpoint follow every command's rule: a Qwen2AudioError is the user's, a stray
    ValueError is a bug with its traceback (they once reported any ValueError as a user's mistake)."""
    import qwen2audio.train.cli as train_cli
    import qwen2audio.train.loop as loop

    argv = ["train", "--output", str(tmp_path / "run")] if command == "train" else \
        ["export-checkpoint", str(tmp_path), "--output", str(tmp_path / "out")]

    class Config:
        def validate(self):
            return self

    monkeypatch.setattr(train_cli, "config_from_args", lambda args: Config())
    for name in ("train", "export_checkpoint"):
        monkeypatch.setattr(loop, name, lambda *a, **k: int("a stray ValueError deep inside"))
    with pytest.raises(ValueError, match="stray"):
        cli.main(argv)
    for name in ("train", "export_checkpoint"):
        monkeypatch.setattr(loop, name, lambda *a, **k: (_ for _ in ()).throw(
            qwen2audio.errors.Qwen2AudioError("your run is odd")))
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.endswith("qwen2audio: error: your run is odd\n")


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b"[1, 2]", b"{not json"])
def test_export_checkpoint_of_a_damaged_state_file_is_a_user_error(content, tmp_path, capsys):
    step = tmp_path / "step-00000001"
    step.mkdir()
    (step / "state.json").write_bytes(content)
    assert cli.main(["export-checkpoint", str(step), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "state.json: not" in err and "Traceback" not in err


def test_damaged_preprocessor_config_is_a_user_error(tiny_checkpoint, tmp_path):
    from qwen2audio.processor import Qwen2AudioProcessor

    directory = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint[0], directory)
    (directory / "preprocessor_config.json").write_text('{"feature_size": "many"}')
    with pytest.raises(qwen2audio.errors.Qwen2AudioError, match="not a valid preprocessor config"):
        Qwen2AudioProcessor.from_pretrained(directory)


def test_user_facing_errors_share_one_base():
    from qwen2audio import api, audio, chat, config, tokenizer, weights
    from qwen2audio.engine import sampling, scheduler
    from qwen2audio.eval import client, data, evaluate, metrics, runner

    base = qwen2audio.errors.Qwen2AudioError
    for error in (audio.AudioError, config.ConfigError, tokenizer.TokenizerError, weights.CheckpointError,
                  chat.MessageError, api.DeviceError, scheduler.PromptTooLong, sampling.SamplingError,
                  client.EndpointError, metrics.MetricError, runner.RunError, data.DataError, evaluate.UsageError,
                  cli.UserError):
        assert issubclass(error, base), error


@pytest.mark.parametrize("command, needed", [("serve", []), ("ask", []), ("eval", ["--task", "vsc"])])
def test_unknown_flag_shows_the_commands_usage(command, needed, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, *needed, "--no-such-flag"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: qwen2audio {command} ")
    assert f"qwen2audio {command}: error: unrecognized arguments: --no-such-flag" in err


@pytest.mark.parametrize("port", ["99999", "0", "http"])
def test_serve_port_out_of_range_is_a_usage_error(port, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--port", port])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --port" in err and "Traceback" not in err


def test_serve_reports_a_port_in_use_before_loading_the_model(files, monkeypatch, capsys):
    import socket

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(qwen2audio.api, "load", load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--model", str(files["model"]), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "another server" in err and "Loading" not in err


def test_served_model_id(tmp_path):
    from qwen2audio.server.cli import DEFAULT_NAME, served_name

    (tmp_path / "Qwen2-Audio-7B-Instruct").mkdir()
    assert served_name(None, f"{tmp_path}/Qwen2-Audio-7B-Instruct/") == "Qwen2-Audio-7B-Instruct"
    assert served_name("audio", f"{tmp_path}/Qwen2-Audio-7B-Instruct") == "audio"
    assert served_name(None, None) == DEFAULT_NAME != "default-model"


def test_eval_takes_every_sampling_flag(files, capsys):
    from qwen2audio.eval.evaluate import _extra_sampling

    parser = cli.build_parser()
    args = parser.parse_args(["eval", "--task", "vsc", "--top-k", "5", "--repetition-penalty", "1.1", "--stop", "X"])
    assert _extra_sampling(args) == {"top_k": 5, "repetition_penalty": 1.1, "stop": ["X"]}
    assert _extra_sampling(parser.parse_args(["eval", "--task", "vsc"])) == {}  # old runs' settings unchanged
    rc = cli.main(["eval", "--task", "vsc", "--data", str(files["a"]), "--output", str(files["root"] / "ev"),
                   "--model", str(files["model"]), "--repetition-penalty", "1e-300"])
    assert rc == 2 and "--repetition-penalty must be" in capsys.readouterr().err
