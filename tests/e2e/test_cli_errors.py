"""Every command-line tool answers a bad input path with one line, exit status 2, and writes nothing.

Each tool runs as a user runs it (a subprocess, from an empty working directory). The table holds,
for every tool and every kind of bad input, the command line and what the one line must say, or
why the case does not apply to that tool. The tools name these problems before they load
TensorFlow or JAX, which is what keeps the whole table to a few seconds per tool.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from typing import NamedTuple

import pytest

from paths import REPO

TOOLS = {
    "train": ["-m", "kinoe_jax.train"],
    "dpo": ["-m", "kinoe_jax.dpo"],
    "generate": ["-m", "kinoe_jax.generate"],
    "aot": ["-m", "kinoe_jax.aot"],
    "llm_jp_eval": ["-m", "kinoe_jax.eval.llm_jp_eval"],
    "convert_to_hf": [os.path.join(REPO, "tools", "convert_to_hf.py")],
    "convert_from_hf": [os.path.join(REPO, "tools", "convert_from_hf.py")],
    "prepare_corpus": [os.path.join(REPO, "tools", "prepare_corpus.py")],
    "validate_sft": [os.path.join(REPO, "tools", "validate_sft.py")],
    "mt_bench_answers": [os.path.join(REPO, "tools", "mt_bench_answers.py")],
    "train_tokenizer": [os.path.join(REPO, "tools", "train_tokenizer.py")],
}
# "directory": a directory where a file is expected (for a flag that takes only directories, a file
# where the directory is expected; where a directory of files is natural, one holding none).
CASES = ("directory", "missing", "empty", "not_utf8", "no_match")

SJIS = "吾輩は猫である。名前はまだ無い。".encode("shift_jis")


class Bad(NamedTuple):
    args: list  # "{d}" is the case's directory; `said` is the argument as the line must name it
    said: str
    problem: str


class NotApplicable(NamedTuple):
    reason: str


def _arg(flag, path):
    return f"{flag}={path}" if flag else path


def _file(flag, suffix, out):
    """The five cases of a flag taking one text file (a path, never a glob: a pattern is a file
    that does not exist)."""
    line = 2 if suffix == ".gin" else 1  # where the Shift_JIS text starts in each kind of file
    rows = {"directory": ("{d}/dir", "is a directory, not a file"),
            "missing": (f"{{d}}/missing{suffix}", "no such file"), "empty": (f"{{d}}/empty{suffix}", "is empty"),
            "not_utf8": (f"{{d}}/sjis{suffix}", f"is not UTF-8 text (line {line}: byte 0x8c"),
            "no_match": (f"{{d}}/runs/*{suffix}", "no such file")}
    return {case: Bad([_arg(flag, path), *out], _arg(flag, path), problem) for case, (path, problem) in rows.items()}


def _files(flag, suffix, out, kinds):
    """The five cases of an argument taking a glob, a file or a directory of such files."""
    rows = {**_file(flag, suffix, out), "no_match": Bad([_arg(flag, f"{{d}}/nothing-*{suffix}"), *out],
                                                        _arg(flag, f"{{d}}/nothing-*{suffix}"), "no file matches")}
    rows["directory"] = rows["directory"]._replace(problem=f"a directory holding no {kinds} files")
    return rows


def _dirs(flag, out):
    """The cases of a flag taking a directory (a run's workdir, an HF model): for "directory", a file."""
    rows = {"directory": ("{d}/notes.txt", "is a file, not a directory"),
            "missing": ("{d}/missing", "no such directory"), "empty": ("{d}/emptydir", "the directory is empty"),
            "no_match": ("{d}/runs/*", "no such directory")}
    return {case: Bad([_arg(flag, path), *out], _arg(flag, path), problem) for case, (path, problem) in rows.items()}


JSONL = "*.jsonl or *.jsonl.gz"
WORKDIR_OUT = ("--workdir={d}/out",)
TOKENIZER_OUT = ("--output={d}/out/tok",)
MT_BENCH_OUT = ("--workdir={d}/run", "--model_id=m", "--bench_dir={d}/out")
LLM_JP_EVAL_OUT = ("--workdir={d}/run", "--output_dir={d}/out", "--run_name=r")
FROM_HF_OUT = ("--hf_dir={d}/run", "--output_dir={d}/out")
TABLE = {
    "train": _file("--gin_file", ".gin", WORKDIR_OUT),
    "dpo": _file("--gin_file", ".gin", WORKDIR_OUT),
    "aot": _file("--gin_file", ".gin", ("--num_devices=8", "--json_out={d}/out.json")),
    "generate": {**_dirs("--workdir", ["--prompt=今日は"]), "not_utf8": Bad(
        ["--workdir={d}/run", os.fsdecode(b"--prompt=" + SJIS)], "--prompt", "is not UTF-8 text (byte 0x8c")},
    "llm_jp_eval": _files("--prompts", ".eval-prompt.json", LLM_JP_EVAL_OUT, "*.eval-prompt.json"),
    "convert_to_hf": {
        **_dirs("--checkpoint_dir", ["--output_dir={d}/out"]),
        "directory": Bad(["--checkpoint_dir={d}/run", "--tokenizer={d}/dir", "--output_dir={d}/out"],
                         "--tokenizer={d}/dir", "is a directory, not a file"),
        "not_utf8": NotApplicable("no text file is named on its command line: the checkpoint is Orbax's binary "
                                  "files, the tokenizer a SentencePiece protobuf"),
    },
    "convert_from_hf": {
        **_dirs("--hf_dir", ["--output_dir={d}/out"]),
        "directory": _file("--gin_file", ".gin", FROM_HF_OUT)["directory"],
        "not_utf8": _file("--gin_file", ".gin", FROM_HF_OUT)["not_utf8"],
    },
    "prepare_corpus": _files("--input", ".jsonl", ("--output_dir={d}/out",), JSONL),
    "validate_sft": _files(None, ".jsonl", ("--json={d}/report.json",), JSONL),
    "mt_bench_answers": _file("--question_file", ".jsonl", MT_BENCH_OUT),
    "train_tokenizer": _files("--input", ".jsonl", TOKENIZER_OUT, JSONL),
}
# More inputs of the same kinds, where a tool reads several.
EXTRA = [
    # the report that started this table: the built-in data directory holds sets only in sft/
    ("validate_sft", "directory", Bad([os.path.join(REPO, "kinoe_jax", "data", "builtin")],
                                      os.path.join(REPO, "kinoe_jax", "data", "builtin"), "a directory holding no")),
    ("prepare_corpus", "directory", Bad(["--input={d}/corpus", "--config={d}/dir", "--output_dir={d}/out"],
                                        "--config={d}/dir", "is a directory, not a file")),
    ("prepare_corpus", "not_utf8", Bad(["--input={d}/corpus", "--input={d}/sjis.jsonl.gz", "--output_dir={d}/out"],
                                       "--input={d}/sjis.jsonl.gz", "is not UTF-8 text (line 1")),
    ("prepare_corpus", "empty", Bad(["--input={d}/corpus", "--input={d}/empty.jsonl.gz", "--output_dir={d}/out"],
                                    "--input={d}/empty.jsonl.gz", "holds no data")),
    ("train_tokenizer", "missing", Bad(["--input={d}/corpus", "--eval_input={d}/missing.jsonl", *TOKENIZER_OUT],
                                       "--eval_input={d}/missing.jsonl", "no such file")),
    ("train_tokenizer", "directory", Bad(["--input={d}/corpus", "--compare={d}/dir", *TOKENIZER_OUT],
                                         "--compare={d}/dir", "is a directory, not a file")),
    ("mt_bench_answers", "missing", Bad(["--workdir={d}/missing", "--model_id=m", "--bench_dir={d}/out"],
                                        "--workdir={d}/missing", "no such directory")),
    ("llm_jp_eval", "missing", Bad(["--workdir={d}/missing", "--output_dir={d}/out", "--run_name=r"],
                                   "--workdir={d}/missing", "no such directory")),
]

assert set(TABLE) == set(TOOLS) and all(set(TABLE[t]) == set(CASES) for t in TOOLS), "every tool x case, or why not"


def _params():
    """Every tool x case that applies (a case that cannot arise is stated in TABLE, not skipped)."""
    rows = [(tool, case, TABLE[tool][case]) for tool in TOOLS for case in CASES] + EXTRA
    for n, (tool, case, row) in enumerate(rows):
        if not isinstance(row, NotApplicable):
            yield pytest.param(tool, row, id=f"{tool}-{case}" + (f"-{n}" if n >= len(TOOLS) * len(CASES) else ""))


def test_every_tool_answers_every_case_or_says_why_it_cannot_arise():
    for tool in TOOLS:
        assert set(TABLE[tool]) == set(CASES), f"{tool}: cases {sorted(set(CASES) ^ set(TABLE[tool]))}"
        for case, row in TABLE[tool].items():
            assert isinstance(row, Bad) or (isinstance(row, NotApplicable) and len(row.reason) > 20), (tool, case)


def _make_inputs(d: str) -> None:
    for sub in ("dir", "emptydir", "run/checkpoints", "corpus"):
        os.makedirs(os.path.join(d, sub))
    files = {
        "dir/notes.txt": "メモ\n".encode(), "notes.txt": "メモ\n".encode(),
        "run/checkpoints/README": b"a run",
        "corpus/a.jsonl": '{"text": "吾輩は猫である。"}\n'.encode(),
        "sjis.gin": b"# settings\ntrain.total_steps = 10  # " + SJIS + b"\n",
        "sjis.jsonl": b'{"text": "' + SJIS + b'"}\n',
        "sjis.eval-prompt.json": b'{"target_dataset": "' + SJIS + b'"}\n',
        "sjis.jsonl.gz": gzip.compress(b'{"text": "' + SJIS + b'"}\n'),
        "empty.jsonl.gz": gzip.compress(b""),
    }
    for suffix in (".gin", ".jsonl", ".eval-prompt.json"):
        files["empty" + suffix] = b""
    for name, data in files.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)


def _tree(d: str) -> set[str]:
    return {os.path.relpath(os.path.join(root, n), d) for root, dirs, names in os.walk(d) for n in dirs + names}


@pytest.mark.parametrize("tool,row", _params())
def test_bad_input_is_one_line_exit_2_and_nothing_written(tool, row, tmp_path):
    d = str(tmp_path)
    _make_inputs(d)
    before = _tree(d)
    args = [a.replace("{d}", d) for a in row.args]
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, *TOOLS[tool], *args], cwd=d, env=env, capture_output=True, timeout=120)
    err = out.stderr.decode("utf-8", "backslashreplace").strip().splitlines()
    assert out.returncode == 2, (out.returncode, err[-20:])
    assert len(err) == 1 and out.stdout == b"", err
    line = err[0]
    assert ": error: " in line and row.said.replace("{d}", d) in line and row.problem in line, line
    assert _tree(d) == before, "written: " + ", ".join(sorted(_tree(d) - before))
