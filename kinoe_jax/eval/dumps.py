"""llm-jp-eval v2 prompt dumps in, inference results out.

In:  `*.eval-prompt.json`: {"target_dataset", "output_length", "metrics", "config", "samples":
     [{"prompt", "system_prompt"?, "gold", ...}], ...}; the built-in set adds "choices" to its
     multiple-choice samples, which makes them scorable by log-likelihood.
Out: `<output_dir>/<run_name>/<target_dataset>.eval-generated.json` (the dump unchanged, plus
     "generated" in every sample) and `_config.json` (the run's configuration and
     `inference_result_info`), the layout llm-jp-eval's evaluator reads.

Every problem with a dump is one line naming the file and the field; all dumps are checked
before anything runs, and the run directory appears whole or not at all.
"""

from __future__ import annotations

import glob
import json
import os

from kinoe_jax.eval import metrics as metrics_lib
from kinoe_jax.utils import atomic

BUILTIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "builtin", "eval")
BUILTIN = os.path.join(BUILTIN_DIR, "*.eval-prompt.json")
GENERATED_SUFFIX = ".eval-generated.json"
REQUIRED = {"target_dataset": str, "output_length": int, "metrics": list, "config": dict, "samples": list}


class DumpError(ValueError):
    pass


def max_new_tokens(dump: dict) -> int:
    """output_length + config.output_length_delta (0 when absent), as llm-jp-eval-inference."""
    return dump["output_length"] + dump["config"].get("output_length_delta", 0)


def load_dump(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            dump = json.load(f)
    except json.JSONDecodeError as e:
        raise DumpError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    except OSError as e:
        raise DumpError(f"{path}: cannot read it: {e.strerror}") from None
    check_dump(dump, path)
    return dump


def check_dump(dump, path: str) -> None:
    def bad(field, why):
        raise DumpError(f"{path}: {field}: {why}")

    if not isinstance(dump, dict):
        bad("(top level)", f"a JSON {type(dump).__name__}, not an object")
    for field, kind in REQUIRED.items():
        if field not in dump:
            bad(field, "missing field")
        if not isinstance(dump[field], kind) or isinstance(dump[field], bool):
            bad(field, f"must be a {kind.__name__}, got {type(dump[field]).__name__}")
    if not dump["target_dataset"]:
        bad("target_dataset", "empty")
    delta = dump["config"].get("output_length_delta", 0)
    if not isinstance(delta, int) or isinstance(delta, bool):
        bad("config.output_length_delta", f"must be an int, got {delta!r}")
    if max_new_tokens(dump) < 1:
        bad("output_length", f"output_length + output_length_delta = {max_new_tokens(dump)}; it must be >= 1")
    for i, m in enumerate(dump["metrics"]):
        if m not in metrics_lib.KNOWN:
            bad(f"metrics[{i}]", f"unknown metric {m!r} (known: {', '.join(sorted(metrics_lib.KNOWN))})")
    if not dump["samples"]:
        bad("samples", "empty: nothing to evaluate")
    for i, s in enumerate(dump["samples"]):
        where = f"samples[{i}]"
        if not isinstance(s, dict):
            bad(where, f"a JSON {type(s).__name__}, not an object")
        for field in ("prompt", "gold"):
            if field not in s:
                bad(f"{where}.{field}", "missing field")
            if not isinstance(s[field], str):
                bad(f"{where}.{field}", f"must be a string, got {type(s[field]).__name__}")
        if not s["prompt"]:
            bad(f"{where}.prompt", "empty")
        if s.get("system_prompt") is not None and not isinstance(s["system_prompt"], str):
            bad(f"{where}.system_prompt", "must be a string or null")
        if "choices" in s:
            choices = s["choices"]
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
                bad(f"{where}.choices", "must be a list of at least two non-empty strings")
            if s["gold"] not in choices:
                bad(f"{where}.choices", f"gold {s['gold']!r} is not one of them")
        if "generated" in s and not isinstance(s["generated"], str):
            bad(f"{where}.generated", "must be a string")


def load_dumps(pattern: str | list[str]) -> list[tuple[str, dict]]:
    """(path, dump) for every file matching the glob(s), sorted, each dataset once."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    paths = sorted({p for pat in patterns for p in glob.glob(os.path.expanduser(pat))})
    if not paths:
        raise DumpError(f"{', '.join(patterns)}: no file matches")
    out, seen = [], {}
    for path in paths:
        dump = load_dump(path)
        name = dump["target_dataset"]
        if name in seen:
            raise DumpError(f"{path}: target_dataset: {name!r} also comes from {seen[name]}")
        seen[name] = path
        out.append((path, dump))
    return out


def builtin_names() -> list[str]:
    return [d["target_dataset"] for _, d in load_dumps(BUILTIN)]


def resolve(datasets) -> list[tuple[str, dict]]:
    """Dumps named by built-in dataset names and/or file globs."""
    datasets = [datasets] if isinstance(datasets, str) else list(datasets)
    builtin = {d["target_dataset"]: (p, d) for p, d in load_dumps(BUILTIN)}
    out = []
    for item in datasets:
        if item in builtin:
            out.append(builtin[item])
        elif any(c in item for c in "*?/") or item.endswith(".json"):
            out += load_dumps(item)
        else:
            raise DumpError(f"{item}: neither a built-in dataset ({', '.join(sorted(builtin))}) nor a file pattern")
    return out


def generated(dump: dict, texts: list[str]) -> dict:
    """The dump unchanged, with "generated" added to every sample."""
    if len(texts) != len(dump["samples"]):
        raise ValueError(f"{dump['target_dataset']}: {len(texts)} generations for {len(dump['samples'])} samples")
    return {**dump, "samples": [{**s, "generated": t} for s, t in zip(dump["samples"], texts)]}


def write_json(path: str, obj) -> None:
    atomic.write_text(path, json.dumps(obj, ensure_ascii=False, indent=1) + "\n")


def load_generated(run_dir: str) -> list[tuple[str, dict]]:
    """The inference results of a run directory, checked like dumps (plus "generated")."""
    paths = sorted(glob.glob(os.path.join(run_dir, "*" + GENERATED_SUFFIX)))
    if not paths:
        raise DumpError(f"{run_dir}: no *{GENERATED_SUFFIX} files")
    out = []
    for path in paths:
        dump = load_dump(path)
        for i, s in enumerate(dump["samples"]):
            if "generated" not in s:
                raise DumpError(f"{path}: samples[{i}].generated: missing field")
        out.append((path, dump))
    return out
