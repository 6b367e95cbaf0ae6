"""Corpus sources as seqio Tasks, and the one gin entry point that registers a run's data.

- Japanese Wikipedia and Japanese mC4 through their TFDS builders (prepared TFRecords; a
  training job never starts a Beam build of its own).
- JSONL / JSONL.gz shards: kinoe_jax.data.pretraining.register_jsonl_task.
- Chat conversations ({"messages": [...]}) rendered with THE chat template into plain text, so
  the SFT sets can enter the pretraining decay phase with an ordinary LM loss on every token.

Every source is read by each process on a disjoint shard: seqio hands whole files (TFDS file
instructions or JSONL files) to processes when there are at least as many files as processes,
and otherwise every process keeps every n-th example. Validation splits never overlap training.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import logging
import os
import re

import gin
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from kinoe_jax.data.chat.template import render
from kinoe_jax.data import preprocessors as prep
from kinoe_jax.data import pretraining
from kinoe_jax.data.vocab import BUILTIN_DIR

log = logging.getLogger(__name__)

JA_WIKI = "ja_wiki"
JA_MC4 = "ja_mc4"

# The built-in SFT sets as plain text for the pretraining decay phase (the assistant-only-loss
# tasks of SFT proper live in kinoe_jax.sft and are separate).
BUILTIN_SFT_DIR = os.path.join(BUILTIN_DIR, "sft")
SFT_TEXT_SENRYU = "kinoe_ja_sft_text_senryu"
SFT_TEXT_LISTENING = "kinoe_ja_sft_text_listening"
BUILTIN_SFT_TEXT = {
    SFT_TEXT_SENRYU: ["senryu.jsonl"],
    SFT_TEXT_LISTENING: ["listening_a.jsonl", "listening_b.jsonl"],
}


class DataSourceError(ValueError):
    pass


# ----------------------------------------------------------------------------- TFDS
def text_from_fields(ds: tf.data.Dataset, fields: tuple[str, ...], task: str,
                     separator: str = "\n\n") -> tf.data.Dataset:
    """TFDS example -> {"targets": the fields joined}; examples whose last field is empty go."""
    missing = [f for f in fields if f not in ds.element_spec]
    if missing:  # raised when the dataset is built, not mid-run
        raise DataSourceError(f"task {task!r}: TFDS examples have no field(s) {missing}; "
                              f"available: {sorted(ds.element_spec)}")

    def join(ex):
        parts = [ex[f] for f in fields]
        text = parts[0] if len(parts) == 1 else tf.strings.join(parts, separator=separator)
        return {"targets": text, "_body": parts[-1]}

    ds = ds.map(join, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.filter(lambda ex: tf.strings.length(tf.strings.strip(ex["_body"])) > 0)
    return ds.map(lambda ex: {"targets": ex["targets"]})


def _check_prepared(task: str, tfds_name: str, data_dir: str | None, splits: dict[str, str]) -> None:
    """Fail at start-up, naming the directory, rather than deep inside seqio at the first batch."""
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    prepared = set(builder.info.splits.keys())
    wanted = {re.match(r"[\w-]+", s).group(0) for s in splits.values()}
    if not wanted <= prepared:
        raise DataSourceError(
            f"task {task!r}: TFDS {tfds_name} has no prepared split(s) {sorted(wanted - prepared)} in "
            f"{builder.data_dir} (prepared: {sorted(prepared) or 'none'}); build it first "
            f"(tfds build ... --data_dir=...) or point data_dir at a prepared copy")


@gin.configurable
def register_tfds_task(name: str, tfds_name: str, splits: dict[str, str],
                       text_fields: tuple[str, ...] = ("text",), data_dir: str | None = None,
                       vocab=None) -> seqio.Task:
    """A pretraining task over a prepared TFDS dataset.

    splits maps the names training uses ("train", "validation") to TFDS splits or slices.
    read_only: a missing dataset is an error here, never a download-and-build on every host.
    """
    if "train" not in splits:
        raise DataSourceError(f"task {name!r}: splits needs a 'train' entry, got {splits}")
    _check_prepared(name, tfds_name, data_dir, splits)
    source = seqio.TfdsDataSource(tfds_name, tfds_data_dir=data_dir, splits=dict(splits),
                                  read_only=True)
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=[
            functools.partial(text_from_fields, fields=tuple(text_fields), task=name),
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
            prep.append_eos,
            prep.split_to_length,
        ],
        output_features=pretraining.output_features(vocab),
    )


@gin.configurable
def register_ja_wikipedia(name: str = JA_WIKI, date: str = "20230601", version: str = "1.0.0",
                          validation_percent: int = 1, include_title: bool = True,
                          data_dir: str | None = None, vocab=None) -> seqio.Task:
    """Japanese Wikipedia (TFDS `wikipedia/<date>.ja`).

    The dump has only a train split: the first `validation_percent`% of it is held out as
    validation and training reads the rest, so the two never share an article.
    """
    if not 0 < validation_percent < 50:
        raise DataSourceError(f"register_ja_wikipedia: validation_percent must be in (0, 50), "
                              f"got {validation_percent}")
    splits = {"train": f"train[{validation_percent}%:]", "validation": f"train[:{validation_percent}%]"}
    fields = ("title", "text") if include_title else ("text",)
    return register_tfds_task(name, f"wikipedia/{date}.ja:{version}", splits, fields, data_dir, vocab)


@gin.configurable
def register_ja_mc4(name: str = JA_MC4, version: str = "3.1.0", data_dir: str | None = None,
                    vocab=None) -> seqio.Task:
    """Japanese mC4 (TFDS `c4/multilingual`, whose per-language splits are `ja` and `ja-validation`)."""
    splits = {"train": "ja", "validation": "ja-validation"}
    return register_tfds_task(name, f"c4/multilingual:{version}", splits, ("text",), data_dir, vocab)


# ----------------------------------------------------------------------------- chat as text
def _chat_text(line: str, messages_field: str) -> str:
    row = json.loads(line)
    if not isinstance(row, dict) or messages_field not in row:
        raise KeyError(messages_field)
    messages = row[messages_field]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{messages_field!r} must be a non-empty list of messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"every message needs a string 'content': {m!r}")
    return render(messages)


def parse_chat_jsonl(ds: tf.data.Dataset, messages_field: str = "messages") -> tf.data.Dataset:
    """JSON line -> {"targets": the conversation rendered with the chat template}.

    Lines are checked at registration; anything unreadable left here is dropped."""
    return prep.lines_to_text(ds, lambda line: _chat_text(line, messages_field))


def _maybe_gunzip(path: str, f):
    return gzip.GzipFile(fileobj=f, mode="rb") if path.endswith(".gz") else contextlib.nullcontext(f)


def check_chat_files(patterns: list[str], messages_field: str = "messages") -> int:
    """Every line must render; the first bad one is an error naming file, line and key."""
    files = sorted({f for p in patterns for f in tf.io.gfile.glob(p)})
    if not files:
        raise FileNotFoundError(f"no file matches {patterns}")
    count = 0
    for path in files:
        with tf.io.gfile.GFile(path, "rb") as raw_file, _maybe_gunzip(path, raw_file) as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    _chat_text(raw.decode("utf-8"), messages_field)
                except KeyError as e:
                    raise DataSourceError(f"{path}:{lineno}: missing key {e}") from None
                except (ValueError, TypeError, UnicodeDecodeError) as e:
                    raise DataSourceError(f"{path}:{lineno}: cannot render {messages_field!r}: {e}") from None
                count += 1
    return count


@gin.configurable
def register_chat_text_task(name: str, train_pattern, validation_pattern=None,
                            messages_field: str = "messages", vocab=None) -> seqio.Task:
    """Chat JSONL rendered as pretraining text (loss on every token), e.g. SFT data in the decay phase."""
    splits = {"train": _as_list(train_pattern)}
    if validation_pattern:
        splits["validation"] = _as_list(validation_pattern)
    for split, patterns in splits.items():
        try:
            check_chat_files(patterns, messages_field)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"task {name!r} {split}: {e}") from None
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=pretraining.JsonlDataSource(splits),
        preprocessors=[
            functools.partial(parse_chat_jsonl, messages_field=messages_field),
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
            prep.append_eos,
            prep.split_to_length,
        ],
        output_features=pretraining.output_features(vocab),
    )


def register_builtin_sft_text(vocab=None) -> None:
    for name, files in BUILTIN_SFT_TEXT.items():
        register_chat_text_task(name, [os.path.join(BUILTIN_SFT_DIR, f) for f in files], vocab=vocab)


def _as_list(pattern) -> list[str]:
    return [pattern] if isinstance(pattern, str) else list(pattern)


# ----------------------------------------------------------------------------- raw text of a task
_TOKENIZE_STEPS = (seqio.preprocessors.tokenize, seqio.preprocessors.tokenize_and_append_eos)


def _text_stage(task: seqio.Task, split: str, shuffle: bool, seed: int) -> tf.data.Dataset:
    """A task's examples just before tokenization (what a new tokenizer should learn from)."""
    steps = list(task.preprocessors)
    cut = next((i for i, p in enumerate(steps) if getattr(p, "func", p) in _TOKENIZE_STEPS), None)
    if cut is None:
        raise DataSourceError(f"task {task.name!r} has no seqio tokenize step: its raw text cannot be sampled")
    if split not in task.splits:
        raise DataSourceError(f"task {task.name!r} has no {split!r} split (it has {sorted(task.splits)})")
    ds = task.source.get_dataset(split=split, shuffle=shuffle, seed=seed)
    for step in steps[:cut]:
        step = seqio.utils.add_kwargs_to_transform(step, output_features=task.output_features,
                                                   sequence_length=None)
        ds = step(ds)
    if "targets" not in ds.element_spec:
        raise DataSourceError(f"task {task.name!r}: no 'targets' text before tokenization "
                              f"(features: {sorted(ds.element_spec)})")
    return ds.map(lambda ex: ex["targets"])


def task_texts(name: str, split: str = "train", limit: int | None = None, seed: int = 0,
               shuffle: bool = True):
    """Yield up to `limit` raw texts of a registered task or mixture (a mixture by its rates)."""
    provider = seqio.get_mixture_or_task(name)
    if isinstance(provider, seqio.Mixture):
        members = [t for t in provider.tasks if split in t.splits]
        if not members:
            raise DataSourceError(f"mixture {name!r}: no task has a {split!r} split")
        rates = [float(provider.get_rate(t)) for t in members]
        ds = tf.data.Dataset.sample_from_datasets(
            [_text_stage(t, split, shuffle, seed) for t in members], weights=rates, seed=seed,
            stop_on_empty_dataset=False)
    else:
        ds = _text_stage(provider, split, shuffle, seed)
    if limit:
        ds = ds.take(limit)
    for text in ds.as_numpy_iterator():
        yield text.decode("utf-8")


# ----------------------------------------------------------------------------- one entry point
@gin.configurable
def register_data(task_fns=(), mixtures: dict | None = None, builtin: bool = True,
                  builtin_sft_text: bool = False) -> None:
    """Register a run's tasks, then its mixtures (gin: `train.register_tasks = @register_data`).

    task_fns: task registration functions configured in gin (e.g. `@register_ja_wikipedia`,
    `@my_corpus/register_jsonl_task`). mixtures: {name: {task or mixture: rate}}; rates are
    relative numbers of examples (chunks of at most seq_len tokens), normalised by seqio.
    """
    if builtin:
        pretraining.register_builtin()
    if builtin_sft_text:
        register_builtin_sft_text()
    for fn in task_fns:
        fn()
    for name, rates in (mixtures or {}).items():
        known = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
        unknown = sorted(set(rates) - known)
        if unknown:
            raise DataSourceError(f"mixture {name!r}: unknown task(s) {unknown}; registered: {sorted(known)}")
        bad = {k: v for k, v in rates.items() if not isinstance(v, (int, float)) or v < 0}
        if bad or not any(rates.values()):
            raise DataSourceError(f"mixture {name!r}: rates must be non-negative numbers, not all 0: {rates}")
        pretraining.register_mixture(name, {k: float(v) for k, v in rates.items()})
