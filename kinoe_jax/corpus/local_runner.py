"""Single-machine runner: every core for the per-line work, one process for
the dedup decisions.

Lines are read in the main process and sent to workers in chunks; results
come back in input order, and the exact/near dedup indexes are updated in
that order. The output is therefore byte-identical for any worker count.
Only the dedup indexes grow with the corpus; text is streamed from input to
output shard.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import time
from collections import deque
from typing import Iterator

from tqdm import tqdm

from kinoe_jax.corpus.dedup import ExactDeduplicator, NearDeduplicator
from kinoe_jax.corpus.io import LineReader, ShardWriter, StagedDirectory, make_doc_id, split_doc_id
from kinoe_jax.corpus.processing import (BAD, REMOVED, LineProcessor, Outcome, Settings, init_worker, process_chunk,
                                         removal_reasons, run_facts)
from kinoe_jax.corpus.report import PII_EXAMPLES, Tally, build_report, example

# Large enough to amortise inter-process overhead, small enough that the
# in-flight window (a few chunks per worker) stays at tens of MB.
CHUNK_LINES = 256
CHUNK_BYTES = 4 << 20
IN_FLIGHT_PER_WORKER = 4

Chunk = tuple[list[int], list[bytes]]


def _read_chunks(files: list[str], tally: Tally, bar: tqdm) -> Iterator[Chunk]:
    ids: list[int] = []
    lines: list[bytes] = []
    size = 0
    done_bytes = 0
    for index, path in enumerate(files):
        reader = LineReader(path)
        for line_no, raw in reader:
            ids.append(make_doc_id(index, line_no))
            lines.append(raw)
            size += len(raw)
            if len(lines) >= CHUNK_LINES or size >= CHUNK_BYTES:
                bar.update(done_bytes + reader.consumed - bar.n)
                yield ids, lines
                ids, lines, size = [], [], 0
        if reader.error is not None:
            line_no, detail = reader.error
            tally.count("unreadable_file", example(f"{path}:{line_no}", detail))
        done_bytes += os.path.getsize(path)
    if lines:
        yield ids, lines
    bar.update(done_bytes - bar.n)


def _process_ordered(chunks: Iterator[Chunk], settings: Settings,
                     num_workers: int) -> Iterator[tuple[list[int], list[Outcome]]]:
    if num_workers <= 1:
        processor = LineProcessor(settings)
        for ids, lines in chunks:
            yield ids, [processor.process(raw) for raw in lines]
        return
    # spawn: forking a process that may hold threads (Beam, tqdm) can deadlock.
    context = multiprocessing.get_context("spawn")
    with context.Pool(num_workers, initializer=init_worker, initargs=(settings,)) as pool:
        # Pool.imap would read the whole input ahead of slow workers; a
        # bounded window of pending chunks keeps memory flat.
        pending: deque = deque()
        for ids, lines in chunks:
            pending.append((ids, pool.apply_async(process_chunk, (lines,))))
            if len(pending) >= num_workers * IN_FLIGHT_PER_WORKER:
                ids, result = pending.popleft()
                yield ids, result.get()
        while pending:
            ids, result = pending.popleft()
            yield ids, result.get()


def run_local(files: list[str], output_dir: str, settings: Settings, num_workers: int,
              shard_size: int, overwrite: bool, progress: bool = True) -> dict:
    started = time.time()
    cfg = settings.config
    tally = Tally(cfg.report.examples_per_reason)
    totals = tally.totals
    exact = ExactDeduplicator() if cfg.dedup.exact else None
    near = NearDeduplicator(cfg.dedup) if cfg.dedup.near else None

    def source(doc_id: int) -> str:
        file_index, line_no = split_doc_id(doc_id)
        return f"{files[file_index]}:{line_no}"

    total_bytes = sum(os.path.getsize(f) for f in files)
    with StagedDirectory(output_dir, overwrite) as staged, \
            tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare_corpus",
                 disable=not progress, mininterval=1.0) as bar:
        writer = ShardWriter(staged.path, shard_size, cfg.output.compresslevel)
        chunks = _read_chunks(files, tally, bar)
        for ids, outcomes in _process_ordered(chunks, settings, num_workers):
            for doc_id, o in zip(ids, outcomes):
                totals["lines_read"] += 1
                totals["bytes_in"] += o.nbytes
                if o.kind == BAD:
                    tally.count(o.reason, example(source(doc_id), o.example))
                    continue
                totals["documents_in"] += 1
                totals["chars_in"] += o.nchars
                if o.kind == REMOVED:
                    tally.count(o.reason, example(source(doc_id), o.example))
                    continue
                dup = exact.check(o.key, doc_id) if exact else None
                if dup is not None:
                    tally.count("exact_duplicate", example(source(doc_id), o.example, source(dup)))
                    continue
                dup = near.check(o.signature, doc_id) if near else None
                if dup is not None:
                    tally.count("near_duplicate", example(source(doc_id), o.example, source(dup)))
                    continue
                writer.write(o.line)
                totals["documents_out"] += 1
                totals["chars_out"] += o.nchars
                if o.phones or o.emails:
                    totals["pii_documents_masked"] += 1
                    totals["pii_phone_numbers"] += o.phones
                    totals["pii_email_addresses"] += o.emails
                    tally.show(PII_EXAMPLES, example(source(doc_id), o.pii_example))
            bar.set_postfix(kept=totals["documents_out"], refresh=False)
        shards = writer.close()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        report = build_report(
            totals, tally.reasons, tally.examples, removal_reasons(cfg), cfg.pii.mask,
            runner="local", num_workers=num_workers, inputs=files, output_dir=output_dir,
            text_field=settings.text_field, shards=len(shards),
            elapsed_seconds=round(time.time() - started, 3),
            # The main process holds the dedup indexes, so its peak is the
            # number to watch as the corpus grows.
            peak_rss_mb=round(usage.ru_maxrss / 1024, 1),
            # Close to elapsed_seconds with many workers means the single
            # dedup/writer process is the bottleneck.
            main_cpu_seconds=round(usage.ru_utime + usage.ru_stime, 3),
            **run_facts(cfg),
        )
        with open(staged.path / "report.json", "w", encoding="utf-8") as f:
            json.dump(report, f, ensure_ascii=False, indent=2)
        staged.publish()
    return report
