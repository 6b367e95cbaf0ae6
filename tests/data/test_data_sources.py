"""Corpus sources as seqio tasks, without network: TFDS through tfds.testing.mock_data, files on
fixtures written here. Every process reads a disjoint shard; validation never meets training."""

import gzip
import json
import os
import re

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from kinoe_jax.data.chat.template import render
from kinoe_jax.data import pipeline, sources, pretraining as tasks
from kinoe_jax.data.vocab import CHAT_SYMBOLS, get_vocabulary

SEQ_LEN = 128


def write_jsonl(path, rows):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")


def read_markers(name, split, pattern, *, shard=0, num_shards=1, packed=False):
    """Every marker matching `pattern` in one shard of a task: through the training pipeline
    (packed rows) or, faster, the task's own examples."""
    vocab = get_vocabulary()
    if packed:
        ds = pipeline.packed_dataset(name, split, SEQ_LEN, 4, shuffle=False, seed=0, num_epochs=1,
                                     shard_index=shard, num_shards=num_shards)
        rows = (row for batch in ds.as_numpy_iterator() for row in batch["decoder_target_tokens"])
    else:
        ds = seqio.get_mixture_or_task(name).get_dataset(
            {"targets": SEQ_LEN}, split, shuffle=False, num_epochs=1, use_cached=False,
            shard_info=seqio.ShardInfo(shard, num_shards))
        rows = (ex["targets"] for ex in ds.as_numpy_iterator())
    found = []
    for row in rows:
        found += re.findall(pattern, vocab.decode([int(t) for t in row if t > 3]))
    return found


# ----------------------------------------------------------------------------- JSONL
@pytest.fixture
def jsonl_corpus(tmp_path):
    """4 train shards (2 gzipped) of 10 documents each and 1 validation shard, field `body`."""
    doc = lambda i: {"id": i, "body": f"これは文書{i:04d}番の本文です。日本語の文章が続きます。"}
    for s in range(4):
        ext = ".jsonl.gz" if s % 2 else ".jsonl"
        write_jsonl(tmp_path / f"train-{s:05d}{ext}", [doc(s * 10 + i) for i in range(10)])
    write_jsonl(tmp_path / "validation-00000.jsonl", [doc(1000 + i) for i in range(6)])
    return tmp_path


@pytest.mark.parametrize("num_shards", [2, 5])  # 5 > 4 files: seqio shards by example instead
def test_jsonl_processes_read_disjoint_shards(jsonl_corpus, num_shards):
    tasks.register_jsonl_task("test_jsonl", str(jsonl_corpus / "train-*"),
                              str(jsonl_corpus / "validation-*"), text_field="body")
    pattern = r"文書(\d{4})番"
    shards = [read_markers("test_jsonl", "train", pattern, shard=i, num_shards=num_shards)
              for i in range(num_shards)]
    everything = [m for s in shards for m in s]
    assert len(everything) == len(set(everything)) == 40  # disjoint, and nothing lost
    assert all(shards), "every process gets data"
    validation = read_markers("test_jsonl", "validation", pattern)
    assert sorted(validation) == [f"{1000 + i:04d}" for i in range(6)]
    assert not set(validation) & set(everything)


def test_jsonl_text_field_and_missing_files(jsonl_corpus):
    tasks.register_jsonl_task("test_jsonl_wrong_field", str(jsonl_corpus / "train-*"), text_field="text")
    assert read_markers("test_jsonl_wrong_field", "train", r"文書(\d{4})番") == []  # no `text` field
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        tasks.register_jsonl_task("test_missing", str(jsonl_corpus / "nothing-here-*.jsonl"))


# ----------------------------------------------------------------------------- TFDS
def fake_tfds_metadata(data_dir, name, shard_lengths):
    """dataset_info.json for `name` with the given splits, written by TFDS itself (no data files)."""
    builder = tfds.builder(name, data_dir=str(data_dir))
    builder.data_path.mkdir(parents=True, exist_ok=True)
    infos = [tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=0,
                                 filename_template=tfds.core.ShardedFileTemplate(
                                     data_dir=builder.data_path, dataset_name=builder.name, split=split,
                                     filetype_suffix="tfrecord"))
             for split, lengths in shard_lengths.items()]
    builder.info.set_splits(tfds.core.SplitDict(infos))
    builder.info.write_to_directory(builder.data_path)


def serve_examples(make_example):
    """An as_dataset_fn for mock_data: example i of each TFDS file instruction of the split asked
    for, one file per input pipeline as TFDS's own reader deals them out."""

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False, **_):
        instructions = list(self.info.splits[split].file_instructions)
        ctx = read_config.input_context if read_config else None
        if ctx is not None and ctx.num_input_pipelines > 1:
            instructions = instructions[ctx.input_pipeline_id::ctx.num_input_pipelines]
        rows = []
        for fi in instructions:
            stop = fi.examples_in_shard if fi.take < 0 else fi.skip + fi.take
            rows += [make_example(os.path.basename(fi.filename), i) for i in range(fi.skip, stop)]
        return tf.data.Dataset.from_tensor_slices({k: [r[k] for r in rows] for k in rows[0]})

    return as_dataset


def _shard_number(filename):
    return int(re.search(r"-(\d{5})-of-", filename).group(1))


def test_ja_wikipedia_from_tfds(tmp_path):
    fake_tfds_metadata(tmp_path, "wikipedia/20230601.ja:1.0.0", {"train": [50, 50, 50, 50]})

    def article(filename, i):
        key = f"{_shard_number(filename)}{i:03d}"
        return {"title": f"項目{key}", "text": f"これは項目{key}の本文です。"}

    task = sources.register_ja_wikipedia("test_ja_wiki", data_dir=str(tmp_path), validation_percent=2)
    assert isinstance(task.source, seqio.TfdsDataSource)
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(tmp_path),
                                as_dataset_fn=serve_examples(article)):
        bodies = r"項目(\d{4})の本文"
        shards = [read_markers("test_ja_wiki", "train", bodies, shard=i, num_shards=2, packed=True)
                  for i in range(2)]
        validation = read_markers("test_ja_wiki", "validation", bodies)
        titles = read_markers("test_ja_wiki", "validation", r"項目(\d{4})\n\nこれは")
    train = shards[0] + shards[1]
    assert len(train) == len(set(train)) == 196 and all(shards)
    assert set(shards[0]).isdisjoint(shards[1])
    # The first 2% (4 articles of the first file) are validation, and only there.
    assert sorted(validation) == ["0000", "0001", "0002", "0003"]
    assert set(validation).isdisjoint(train)
    assert sorted(titles) == sorted(validation)  # "title\n\ntext"


def test_ja_mc4_from_tfds(tmp_path):
    fake_tfds_metadata(tmp_path, "c4/multilingual:3.1.0",
                       {"ja": [20, 20, 20], "ja-validation": [5], "en": [10]})

    def page(filename, i):
        split = re.search(r"c4-(.+?)\.tfrecord", filename).group(1)
        return {"text": f"{split}の頁{_shard_number(filename)}{i:02d}です。", "url": "https://example.jp",
                "content-type": "text/plain", "content-length": "10", "timestamp": "2020-01-01"}

    sources.register_ja_mc4("test_ja_mc4", data_dir=str(tmp_path))
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(tmp_path),
                                as_dataset_fn=serve_examples(page)):
        marker = r"([\w-]+)の頁(\d{3})"
        shards = [read_markers("test_ja_mc4", "train", marker, shard=i, num_shards=3) for i in range(3)]
        validation = read_markers("test_ja_mc4", "validation", marker)
    train = [m for s in shards for m in s]
    assert {split for split, _ in train} == {"ja"} and len(set(train)) == len(train) == 60
    assert all(shards) and not set(shards[0]) & set(shards[1])
    assert {split for split, _ in validation} == {"ja-validation"} and len(validation) == 5


def test_tfds_text_field_error_names_the_task(tmp_path):
    fake_tfds_metadata(tmp_path, "c4/multilingual:3.1.0", {"ja": [4], "ja-validation": [1]})
    sources.register_tfds_task("test_bad_field", "c4/multilingual:3.1.0", {"train": "ja"},
                               text_fields=("body",), data_dir=str(tmp_path))
    page = lambda f, i: {"text": "本文", "url": "", "content-type": "", "content-length": "", "timestamp": ""}
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(tmp_path),
                                as_dataset_fn=serve_examples(page)):
        with pytest.raises(sources.DataSourceError, match=r"test_bad_field.*'body'.*available"):
            read_markers("test_bad_field", "train", "x")


def test_unprepared_tfds_dataset_is_a_clear_error(tmp_path):
    fake_tfds_metadata(tmp_path, "c4/multilingual:3.1.0", {"en": [4]})  # prepared, but not Japanese
    with pytest.raises(sources.DataSourceError, match=r"no prepared split\(s\) \['ja', 'ja-validation'\] in .*3\.1\.0"):
        sources.register_ja_mc4("test_unprepared", data_dir=str(tmp_path))


# ----------------------------------------------------------------------------- chat as text
def test_builtin_sft_text_tasks_render_the_chat_template():
    sources.register_builtin_sft_text()
    vocab = get_vocabulary()
    assistant = vocab.tokenizer.piece_to_id("<|assistant|>")
    task = seqio.get_mixture_or_task(sources.SFT_TEXT_SENRYU)
    first = next(task.get_dataset({"targets": 4096}, "train", shuffle=False, use_cached=False).as_numpy_iterator())
    path = os.path.join(sources.BUILTIN_SFT_DIR, "senryu.jsonl")
    with open(path, encoding="utf-8") as f:
        messages = json.loads(f.readline())["messages"]
    ids = first["targets"].tolist()
    assert ids[-1] == 1 and assistant in ids  # EOS-terminated, control pieces are whole tokens
    assert vocab.decode(ids[:-1]) == render(messages).replace("？", "?")  # tokenizer applies NFKC
    for name in sources.BUILTIN_SFT_TEXT:
        assert set(seqio.get_mixture_or_task(name).splits) == {"train"}


def test_gzipped_chat_files_are_read(tmp_path):
    conversation = {"messages": [{"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": "はい"}]}
    write_jsonl(tmp_path / "chat.jsonl.gz", [conversation] * 3)
    task = sources.register_chat_text_task("test_chat_gz", str(tmp_path / "chat.jsonl.gz"))
    examples = list(task.get_dataset({"targets": 64}, "train", shuffle=False, use_cached=False).as_numpy_iterator())
    assert len(examples) == 3
    assert get_vocabulary().decode(examples[0]["targets"][:-1].tolist()) == render(conversation["messages"])


def test_bad_chat_line_is_an_error_with_file_and_line(tmp_path):
    path = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": "はい"}]}
    write_jsonl(path, [good, {"msgs": []}])
    with pytest.raises(sources.DataSourceError, match=rf"{re.escape(str(path))}:2: missing key 'messages'"):
        sources.register_chat_text_task("test_chat_bad", str(path))
    write_jsonl(path, [good, {"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(sources.DataSourceError, match=r":2: cannot render .*robot"):
        sources.register_chat_text_task("test_chat_bad", str(path))


# ----------------------------------------------------------------------------- mixtures in gin
def test_mixture_rates_come_from_gin(jsonl_corpus):
    import gin

    gin.parse_config([
        f"a/register_jsonl_task.name = 'test_mix_a'",
        f"a/register_jsonl_task.train_pattern = '{jsonl_corpus}/train-*'",
        f"a/register_jsonl_task.text_field = 'body'",
        "register_data.task_fns = [@a/register_jsonl_task]",
        "register_data.builtin_sft_text = True",
        "register_data.mixtures = {'test_mix': {'test_mix_a': 3, 'kinoe_ja_builtin': 1},"
        " 'test_mix_sft': {'test_mix': 0.5, 'kinoe_ja_sft_text_senryu': 0.5}}",
    ])
    sources.register_data()
    mix = seqio.get_mixture_or_task("test_mix_sft")
    rates = {t.name: mix.get_rate(t) / mix.total_rate for t in mix.tasks}
    np.testing.assert_allclose([rates["test_mix_a"], rates["kinoe_ja_builtin"], rates["kinoe_ja_sft_text_senryu"]],
                               [0.375, 0.125, 0.5])
    gin.bind_parameter("register_data.mixtures", {"test_mix_bad": {"no_such_task": 1.0}})
    with pytest.raises(sources.DataSourceError, match="no_such_task"):
        sources.register_data()


def test_chat_symbols_are_single_tokens():
    vocab = get_vocabulary()
    for symbol in CHAT_SYMBOLS:
        assert len(vocab.encode(symbol)) == 1, symbol


def test_ja_web_config_registers_its_tasks_and_mixtures(tmp_path, jsonl_corpus):
    from kinoe_jax.training import loop  # noqa: F401  (the configurables a run config binds)
    from kinoe_jax.config.gin_io import load_gin
    from kinoe_jax.data import phases

    tfds_dir = tmp_path / "tfds"
    fake_tfds_metadata(tfds_dir, "wikipedia/20230601.ja:1.0.0", {"train": [100]})
    fake_tfds_metadata(tfds_dir, "c4/multilingual:3.1.0", {"ja": [10], "ja-validation": [2]})
    load_gin(["gin_configs/runs/tiny_ja.gin", "gin_configs/data/ja_web.gin"],
             [f"TFDS_DIR = '{tfds_dir}'", f"JSONL_TRAIN = '{jsonl_corpus}/train-*'",
              f"JSONL_VALIDATION = '{jsonl_corpus}/validation-*'"])
    sources.register_data()
    decay = seqio.get_mixture_or_task(phases.PhaseSchedule().decay_mixture)
    assert {t.name for t in decay.tasks} == {"ja_wiki", "ja_mc4", "ja_jsonl", sources.SFT_TEXT_SENRYU,
                                             sources.SFT_TEXT_LISTENING}
    assert pipeline.DataConfig().mixture == "ja_pretrain"
    assert phases.PhaseSchedule().switch_step(300) == 240  # the tiny run's WSD decays the last 20%
