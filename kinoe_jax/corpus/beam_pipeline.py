"""The cleaning pipeline on Apache Beam, for corpora beyond one machine.

Same per-line work as the local runner (``processing.LineProcessor``), then:

* exact dedup: group documents by the hash of their normalised text and
  keep the smallest id (input order) of each group;
* near dedup: emit each signature under its LSH band keys (the same bands
  as the local runner, ``dedup.lsh_bands``), group by band key, and inside each
  bucket keep documents greedily in id order, dropping a document whose
  estimated Jaccard similarity with an earlier *representative of that
  bucket* reaches the threshold.

Difference from the local runner: locally a document is only compared with
documents that are kept in the end. Here a bucket representative may itself
be dropped through another bucket, so in a chain A~B~C where A and C are not
similar, the local runner keeps A and C while Beam keeps only A. On ordinary
data (copies of one original with small edits, or unrelated documents) both
remove the same documents.

Output shards hold documents sorted by id; documents go to shards by a hash
of their id, so shard sizes are close to, not exactly, ``shard_size``. Each
shard is written from one worker's memory, which bounds ``shard_size``.
On runners other than DirectRunner the output and input must be on a
filesystem every worker sees (e.g. gs://), and workers need this package
(``--setup_file`` or ``--extra_package``).
"""

from __future__ import annotations

import json
import math
import time
import zlib
from typing import Any, Iterable, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from kinoe_jax.corpus.dedup import band_keys, estimated_jaccard, lsh_bands
from kinoe_jax.corpus.io import (LineReader, OutputExistsError, StagedDirectory, close_gzip_writer,
                                 is_remote, make_doc_id, open_gzip_writer, shard_name, split_doc_id)
from kinoe_jax.corpus.processing import BAD, DOC, LineProcessor, Settings, removal_reasons, run_facts
from kinoe_jax.corpus.report import PII_EXAMPLES, build_report, example

KEPT = "kept"
STATS_FILE = "_stats.json"


def _event(reason: str, doc_id: int, o, dup_of: Optional[int] = None) -> tuple:
    """What the report needs to know about one line."""
    return (reason, doc_id, o.example, dup_of, o.nbytes, o.nchars, o.kind != BAD,
            o.phones, o.emails, o.pii_example)


def _metrics(event: tuple) -> Iterable[tuple[str, int]]:
    reason, _, _, _, nbytes, nchars, is_document, phones, emails, _ = event
    yield "lines_read", 1
    yield "bytes_in", nbytes
    if is_document:
        yield "documents_in", 1
        yield "chars_in", nchars
    if reason == KEPT:
        yield "documents_out", 1
        yield "chars_out", nchars
        # Masks are counted in the documents written, as the local runner does.
        if phones or emails:
            yield "pii_documents_masked", 1
            yield "pii_phone_numbers", phones
            yield "pii_email_addresses", emails
    else:
        yield "reason:" + reason, 1


def _pii_example(event: tuple) -> Iterable[tuple[str, tuple]]:
    reason, doc_id, _, _, _, _, _, phones, emails, pii_example = event
    if reason == KEPT and (phones or emails):
        yield PII_EXAMPLES, (doc_id, pii_example, None)


class _ReadLines(beam.DoFn):
    def process(self, item):
        index, path = item
        reader = LineReader(path)
        for line_no, raw in reader:
            yield make_doc_id(index, line_no), raw
        if reader.error is not None:
            line_no, detail = reader.error
            yield beam.pvalue.TaggedOutput("unreadable", (make_doc_id(index, line_no), detail))


class _Process(beam.DoFn):
    def __init__(self, settings: Settings):
        self.settings = settings

    def setup(self):
        self.processor = LineProcessor(self.settings)

    def process(self, item):
        doc_id, raw = item
        o = self.processor.process(raw)
        if o.kind == DOC:
            yield doc_id, o
        else:
            yield beam.pvalue.TaggedOutput("events", _event(o.reason, doc_id, o))


def _first_of_group(item):
    """Keeps the smallest id of an exact-duplicate group.

    Two passes over the grouped values instead of a list, so that a text
    repeated millions of times need not fit in memory.
    """
    _, members = item
    first = min(doc_id for doc_id, _ in members)
    for doc_id, o in members:
        if doc_id == first:
            yield doc_id, o
        else:
            yield beam.pvalue.TaggedOutput("events", _event("exact_duplicate", doc_id, o, first))


def _near_in_bucket(item, threshold: float, seed: int):
    """(duplicate id, earlier id) pairs of one LSH bucket, greedy in id order.

    Most members of a big bucket are copies of its first document, so they
    are settled against it in one streaming pass; only the rest are sorted.
    """
    _, members = item
    anchor_id, anchor_sig = min(members, key=lambda m: m[0])
    leftovers = []
    for doc_id, sig in members:
        if doc_id == anchor_id:
            continue
        if estimated_jaccard(sig, anchor_sig, seed) >= threshold:
            yield doc_id, anchor_id
        else:
            leftovers.append((doc_id, sig))
    representatives = [(anchor_id, anchor_sig)]
    for doc_id, sig in sorted(leftovers):
        for rep_id, rep_sig in representatives:
            if estimated_jaccard(sig, rep_sig, seed) >= threshold:
                yield doc_id, rep_id
                break
        else:
            representatives.append((doc_id, sig))


def _resolve_near(item):
    doc_id, joined = item
    docs, dups = joined["doc"], joined["dup"]
    for o in docs:  # exactly one
        if dups:
            yield beam.pvalue.TaggedOutput("events", _event("near_duplicate", doc_id, o, min(dups)))
        else:
            yield doc_id, o


def _shard_of(doc_id: int, count: int) -> int:
    return zlib.crc32(doc_id.to_bytes(8, "little")) % count


def _write_shard(item, count: int, directory: str, compresslevel: int) -> str:
    index, values = item
    lines = sorted(v for v in values if v is not None)
    name = shard_name(index, count)
    stream = open_gzip_writer(f"{directory}/{name}", compresslevel)
    for _, line in lines:
        stream.write(line)
    close_gzip_writer(stream)
    return name


def _write_stats(_, stats: dict, examples: dict, shards: int, directory: str, files: list[str]):
    def source(doc_id: int) -> str:
        file_index, line_no = split_doc_id(doc_id)
        return f"{files[file_index]}:{line_no}"

    shown = {
        reason: [example(source(i), text, None if dup is None else source(dup)) for i, text, dup in entries]
        for reason, entries in examples.items()
    }
    payload = {"stats": stats, "examples": shown, "shards": shards}
    with FileSystems.create(f"{directory}/{STATS_FILE}") as f:
        f.write(json.dumps(payload, ensure_ascii=False).encode("utf-8"))


def build_pipeline(p: beam.Pipeline, files: list[str], directory: str, settings: Settings,
                   shard_size: int) -> None:
    cfg = settings.config
    read = (p
            | "Files" >> beam.Create(list(enumerate(files)))
            # Spreads files over workers; each file is read by one worker.
            | "SpreadFiles" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(_ReadLines()).with_outputs("unreadable", main="lines"))
    processed = (read.lines
                 | "SpreadLines" >> beam.Reshuffle()
                 | "Process" >> beam.ParDo(_Process(settings)).with_outputs("events", main="docs"))
    events = [processed.events]
    docs = processed.docs

    if cfg.dedup.exact:
        exact = (docs
                 | "ByText" >> beam.Map(lambda kv: (kv[1].key, kv))
                 | "GroupText" >> beam.GroupByKey()
                 | "FirstOfText" >> beam.FlatMap(_first_of_group).with_outputs("events", main="docs"))
        events.append(exact.events)
        docs = exact.docs

    if cfg.dedup.near:
        bands = lsh_bands(cfg.dedup)
        dups = (docs
                | "Bands" >> beam.FlatMap(
                    lambda kv: ((band, (kv[0], kv[1].signature)) for band in band_keys(kv[1].signature, bands)))
                | "GroupBand" >> beam.GroupByKey()
                | "NearInBucket" >> beam.FlatMap(_near_in_bucket, cfg.dedup.threshold, cfg.dedup.seed)
                | "FirstNearOf" >> beam.CombinePerKey(min))
        near = ({"doc": docs, "dup": dups}
                | "JoinNear" >> beam.CoGroupByKey()
                | "ResolveNear" >> beam.FlatMap(_resolve_near).with_outputs("events", main="docs"))
        events.append(near.events)
        docs = near.docs

    events.append(docs | "Kept" >> beam.Map(lambda kv: _event(KEPT, kv[0], kv[1])))
    all_events = events | "AllEvents" >> beam.Flatten()

    count = docs | "CountKept" >> beam.combiners.Count.Globally()
    shards = count | "ShardCount" >> beam.Map(lambda n: max(1, math.ceil(n / shard_size)))
    by_shard = docs | "ToShard" >> beam.Map(
        lambda kv, n: (_shard_of(kv[0], n), (kv[0], kv[1].line)), n=beam.pvalue.AsSingleton(shards))
    # One empty entry per shard, so that shards with no documents still exist.
    seeds = shards | "ShardSeeds" >> beam.FlatMap(lambda n: [(i, None) for i in range(n)])
    written = ((by_shard, seeds)
               | "ShardsAndSeeds" >> beam.Flatten()
               | "GroupShard" >> beam.GroupByKey()
               | "WriteShard" >> beam.Map(_write_shard, beam.pvalue.AsSingleton(shards), directory,
                                          cfg.output.compresslevel))

    unreadable = read.unreadable | "UnreadableEvents" >> beam.Map(
        lambda kv: ("unreadable_file", kv[0], kv[1], None))
    stats = ((all_events | "Metrics" >> beam.FlatMap(_metrics),
              unreadable | "UnreadableMetric" >> beam.Map(lambda _: ("reason:unreadable_file", 1)))
             | "AllMetrics" >> beam.Flatten()
             | "SumMetrics" >> beam.CombinePerKey(sum)
             | "MetricsDict" >> beam.combiners.ToDict())
    k = cfg.report.examples_per_reason
    examples = ((all_events | "Removed" >> beam.Filter(lambda e: e[0] != KEPT)
                 | "ExampleOf" >> beam.Map(lambda e: (e[0], (e[1], e[2], e[3]))),
                 all_events | "PiiExamples" >> beam.FlatMap(_pii_example),
                 unreadable | "UnreadableExample" >> beam.Map(lambda e: (e[0], (e[1], e[2], e[3]))))
                | "AllExamples" >> beam.Flatten()
                | "FirstExamples" >> beam.combiners.Top.SmallestPerKey(k)
                | "ExamplesDict" >> beam.combiners.ToDict())
    # Waiting on the written shard names orders the stats file after the shards.
    (written
     | "ShardsDone" >> beam.combiners.Count.Globally()
     | "WriteStats" >> beam.Map(_write_stats, beam.pvalue.AsSingleton(stats),
                                beam.pvalue.AsSingleton(examples), beam.pvalue.AsSingleton(shards),
                                directory, files))


def _prepare_remote(target: str, overwrite: bool) -> None:
    existing = [m.path for r in FileSystems.match([target.rstrip("/") + "/*"]) for m in r.metadata_list]
    if existing and not overwrite:
        raise OutputExistsError(f"output directory {target} is not empty; pass --overwrite to replace it")
    if existing:
        FileSystems.delete(existing)


def _finish(directory: str, settings: Settings, files: list[str], target: str,
            started: float, pipeline_args: list[str]) -> dict[str, Any]:
    stats_path = f"{directory}/{STATS_FILE}"
    with FileSystems.open(stats_path) as f:
        payload = json.loads(f.read().decode("utf-8"))
    FileSystems.delete([stats_path])
    stats = payload["stats"]
    totals = {k: v for k, v in stats.items() if not k.startswith("reason:")}
    reasons = {k[len("reason:"):]: v for k, v in stats.items() if k.startswith("reason:")}
    cfg = settings.config
    report = build_report(
        totals, reasons, payload["examples"], removal_reasons(cfg), cfg.pii.mask,
        runner="beam", num_workers=None, inputs=files, output_dir=target,
        text_field=settings.text_field, shards=payload["shards"],
        elapsed_seconds=round(time.time() - started, 3), pipeline_args=pipeline_args,
        **run_facts(cfg),
    )
    # Written last: on filesystems without directory renames its presence
    # marks a complete output.
    with FileSystems.create(f"{directory}/report.json") as f:
        f.write(json.dumps(report, ensure_ascii=False, indent=2).encode("utf-8"))
    return report


def run_beam(files: list[str], output_dir: str, settings: Settings, shard_size: int,
             overwrite: bool, pipeline_args: list[str]) -> dict[str, Any]:
    started = time.time()
    options = PipelineOptions(pipeline_args)

    def run(directory: str) -> dict[str, Any]:
        with beam.Pipeline(options=options) as p:
            build_pipeline(p, files, directory, settings, shard_size)
        return _finish(directory, settings, files, output_dir, started, pipeline_args)

    if is_remote(output_dir):
        # Object stores cannot rename a directory atomically: shards are
        # written in place and report.json, written last, marks completion.
        _prepare_remote(output_dir, overwrite)
        return run(output_dir.rstrip("/"))
    with StagedDirectory(output_dir, overwrite) as staged:
        report = run(str(staged.path))
        staged.publish()
    return report
