"""The real-text tools' bad input: one line, exit status 2, nothing written.

The corpus tool without Debian's packages, a labels file naming a document the corpus does not
have, and a threshold outside [0, 1]."""

import json
import os
import subprocess
import sys

import pytest

from paths import REPO

BENCH = os.path.join(REPO, "tools", "bench", "bench_filters_real_text.py")
PREPARE = os.path.join(REPO, "tools", "prepare_corpus.py")


def _tree(d):
    return {os.path.relpath(os.path.join(root, n), d) for root, dirs, names in os.walk(d) for n in dirs + names}


def _run(args, cwd):
    out = subprocess.run([sys.executable, *args], cwd=cwd, env=dict(os.environ, PYTHONPATH=REPO),
                         capture_output=True, timeout=300)
    err = out.stderr.decode("utf-8", "backslashreplace").strip().splitlines()
    assert out.returncode == 2, (out.returncode, err[-20:])
    assert len(err) == 1 and out.stdout == b"", err
    return err[0]


def test_corpus_tool_without_the_packages_names_them(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import debian_docs_corpus
    finally:
        sys.path.pop(0)
    from kinoe_jax.corpus import debian_docs

    monkeypatch.setattr(debian_docs, "DPKG_INFO", str(tmp_path / "dpkg-info"))  # nothing installed
    with pytest.raises(SystemExit) as exit_:
        debian_docs_corpus.main([f"--output_dir={tmp_path / 'out'}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not installed: manpages-ja, gimp-help-ja, debian-reference-ja" in err[0]
    assert "apt-get install -y manpages-ja gimp-help-ja debian-reference-ja" in err[0]
    assert _tree(tmp_path) == set()


def test_labels_naming_a_document_the_corpus_lacks(tmp_path):
    corpus = tmp_path / "raw.jsonl"
    corpus.write_text(json.dumps({"id": "manpages-ja:/a.1.gz", "package": "manpages-ja", "text": "本文です。"},
                                 ensure_ascii=False) + "\n", encoding="utf-8")
    labels = tmp_path / "labels.tsv"
    labels.write_text("manpages-ja:/a.1.gz\tkeep\nmanpages-ja:/gone.1.gz\tdrop\ttoo_short\n", encoding="utf-8")
    before = _tree(tmp_path)
    line = _run([BENCH, f"--corpus={corpus}", f"--labels={labels}"], tmp_path)
    assert "bench_filters_real_text: error:" in line and "'manpages-ja:/gone.1.gz' is not in the corpus" in line
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("tool", ["prepare_corpus", "bench"])
def test_a_threshold_outside_zero_to_one(tmp_path, tool):
    config = tmp_path / "c.yaml"
    config.write_text("filters:\n  prose_line_min_hiragana: 1.2\n", encoding="utf-8")
    corpus = tmp_path / "raw.jsonl"
    corpus.write_text('{"id": "x", "text": "本文です。"}\n', encoding="utf-8")
    before = _tree(tmp_path)
    if tool == "prepare_corpus":
        args = [PREPARE, f"--input={corpus}", f"--output_dir={tmp_path / 'out'}", f"--config={config}"]
    else:
        args = [BENCH, f"--corpus={corpus}", f"--config={config}"]
    line = _run(args, tmp_path)
    assert "filters.prose_line_min_hiragana must be in [0, 1], got 1.2" in line
    assert _tree(tmp_path) == before
