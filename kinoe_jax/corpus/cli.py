"""Command line of the corpus cleaning tool (see tools/prepare_corpus.py)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from kinoe_jax.config.inputs import JSONL, InputError, text_file, text_files
from kinoe_jax.corpus.config import ConfigError, load_config
from kinoe_jax.corpus.filters import QualityFilter
from kinoe_jax.corpus.io import InputNotFoundError, OutputExistsError, is_remote, resolve_inputs
from kinoe_jax.corpus.processing import Settings
from kinoe_jax.corpus.report import format_report


def _default_workers() -> int:
    # Respects CPU affinity limits (containers, taskset), unlike cpu_count.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _input_files(patterns: list[str]) -> list[str]:
    """Each --input's files, once, in order: a local glob or directory (its JSONL files) is checked
    here, down to a file that is empty or in another encoding; a remote one is listed by Beam."""
    files: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        found = (resolve_inputs([pattern]) if is_remote(pattern)
                 else text_files("--input", pattern, JSONL, sniff=True))
        for f in found:
            if f not in seen:  # overlapping patterns must not double the data
                seen.add(f)
                files.append(f)
    return files


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prepare_corpus",
        description="Normalise, filter and deduplicate Japanese JSONL corpora into gzip shards. "
                    "With --runner=beam, unknown options are passed to Apache Beam "
                    "(e.g. --runner=beam --direct_num_workers=4, or Dataflow options).")
    p.add_argument("--input", action="append", required=True, metavar="GLOB",
                   help="JSONL or JSONL.gz files (glob, ** allowed, or a directory of them); repeat for several")
    p.add_argument("--output_dir", required=True, help="created atomically at the end")
    p.add_argument("--config", help="YAML file overriding default_config.yaml")
    p.add_argument("--text_field", default="text", help="JSON field holding the document text")
    p.add_argument("--num_workers", type=int, default=_default_workers(),
                   help="processes for normalisation, filters and signatures (default: all cores)")
    p.add_argument("--shard_size", type=int, help="documents per output shard (default from config)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    p.add_argument("--runner", choices=("local", "beam"), default="local")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.runner != "beam":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.num_workers < 1:
        parser.error("--num_workers must be at least 1")
    try:
        cfg = load_config(args.config and text_file("--config", args.config))
        if args.shard_size is not None:
            cfg = cfg.replace("output", shard_size=args.shard_size)
        # Fails now, not in every worker, if the word list is unreadable.
        QualityFilter(cfg.filters, cfg.normalize.nfkc)
        if args.runner == "local" and any(is_remote(p) for p in args.input + [args.output_dir]):
            raise ConfigError("remote paths need --runner=beam")
        files = _input_files(args.input)
        settings = Settings(cfg, args.text_field)
        if args.runner == "local":
            from kinoe_jax.corpus.local_runner import run_local

            report = run_local(files, args.output_dir, settings, args.num_workers,
                               cfg.output.shard_size, args.overwrite, progress=not args.no_progress)
        else:
            # Imported only here: Beam is slow to import and noisy.
            try:
                from kinoe_jax.corpus.beam_pipeline import run_beam
            except ModuleNotFoundError as e:
                if not (e.name or "").startswith("apache_beam"):
                    raise
                raise ConfigError("--runner=beam needs the apache-beam package") from e

            report = run_beam(files, args.output_dir, settings, cfg.output.shard_size,
                              args.overwrite, extra)
    except (InputError, ConfigError, InputNotFoundError, OutputExistsError, OSError) as e:
        print(f"prepare_corpus: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0
