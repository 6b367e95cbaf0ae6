"""Settings of the corpus cleaning tool.

Every threshold lives in ``default_config.yaml`` (with the reason for its
value); a user file overrides only the keys it names. The loaded settings are
frozen dataclasses so they can be shipped to worker processes and Beam
workers as they are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default_config.yaml")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class NormalizeConfig:
    nfkc: bool


@dataclass(frozen=True)
class FilterConfig:
    min_chars: Optional[int]
    min_japanese_fraction: Optional[float]
    min_hiragana_fraction: Optional[float]
    min_prose_chars: Optional[int]
    prose_line_min_chars: int
    prose_line_min_hiragana: float
    top_ngram_chars: int
    max_top_ngram_share: Optional[float]
    max_duplicate_line_share: Optional[float]
    min_mean_sentence_chars: Optional[float]
    max_mean_sentence_chars: Optional[float]
    word_list_path: Optional[str]
    max_word_list_hits: int
    max_ad_keywords: Optional[int]
    max_bbs_markers: Optional[int]
    max_bbs_markers_per_1000: Optional[float]
    discrimination_content: bool
    violence_content: bool
    adult_content: bool
    max_keyword_hits_per_1000: float
    katakana_keyword_boundary: bool


@dataclass(frozen=True)
class DedupConfig:
    exact: bool
    near: bool
    ngram_chars: int
    num_perm: int
    threshold: float
    candidate_recall: float
    rows_per_band: Optional[int]
    seed: int


@dataclass(frozen=True)
class PiiConfig:
    mask: bool


@dataclass(frozen=True)
class OutputConfig:
    shard_size: int
    compresslevel: int


@dataclass(frozen=True)
class ReportConfig:
    examples_per_reason: int
    example_chars: int


@dataclass(frozen=True)
class CorpusConfig:
    normalize: NormalizeConfig
    pii: PiiConfig
    filters: FilterConfig
    dedup: DedupConfig
    output: OutputConfig
    report: ReportConfig

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, section: str, **changes: Any) -> "CorpusConfig":
        updated = dataclasses.replace(getattr(self, section), **changes)
        return dataclasses.replace(self, **{section: updated})


_SECTIONS = {
    "normalize": NormalizeConfig,
    "pii": PiiConfig,
    "filters": FilterConfig,
    "dedup": DedupConfig,
    "output": OutputConfig,
    "report": ReportConfig,
}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML in config {path}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of sections")
    return data


def _merge(base: dict, override: dict, source: Path) -> dict:
    merged = {name: dict(values) for name, values in base.items()}
    for section, values in override.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{source}: unknown section {section!r}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        for key, value in values.items():
            if key not in merged[section]:
                # A typo would otherwise silently leave the default in force.
                raise ConfigError(f"{source}: unknown key {section}.{key}")
            merged[section][key] = value
        path = values.get("word_list_path") if section == "filters" else None
        if path and not Path(path).is_absolute():
            merged["filters"]["word_list_path"] = str(source.parent / path)
    return merged


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(cfg: CorpusConfig) -> None:
    f, d = cfg.filters, cfg.dedup
    for name in ("min_japanese_fraction", "min_hiragana_fraction", "prose_line_min_hiragana",
                 "max_top_ngram_share", "max_duplicate_line_share"):
        value = getattr(f, name)
        if value is not None and (not _is_number(value) or not 0.0 <= value <= 1.0):
            raise ConfigError(f"filters.{name} must be in [0, 1], got {value!r}")
    for name in ("max_bbs_markers_per_1000", "max_keyword_hits_per_1000"):
        value = getattr(f, name)
        if (value is not None or name == "max_keyword_hits_per_1000") and (not _is_number(value) or value < 0):
            raise ConfigError(f"filters.{name} must be a number >= 0, got {value!r}")
    for section, obj, name in (("filters", f, "discrimination_content"), ("filters", f, "violence_content"),
                               ("filters", f, "adult_content"), ("filters", f, "katakana_keyword_boundary"),
                               ("pii", cfg.pii, "mask"), ("dedup", d, "exact"), ("dedup", d, "near")):
        if not isinstance(getattr(obj, name), bool):
            raise ConfigError(f"{section}.{name} must be true or false, got {getattr(obj, name)!r}")
    for name in ("max_word_list_hits", "max_ad_keywords", "max_bbs_markers", "min_prose_chars", "prose_line_min_chars"):
        value = getattr(f, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ConfigError(f"filters.{name} must be a whole number >= 0 or null, got {value!r}")
    if f.top_ngram_chars < 1 or d.ngram_chars < 1:
        raise ConfigError("n-gram sizes must be at least 1")
    if not 0.0 < d.threshold <= 1.0:
        raise ConfigError(f"dedup.threshold must be in (0, 1], got {d.threshold}")
    if d.num_perm < 2:
        raise ConfigError("dedup.num_perm must be at least 2")
    if not 0.0 < d.candidate_recall < 1.0:
        raise ConfigError(f"dedup.candidate_recall must be in (0, 1), got {d.candidate_recall}")
    if d.rows_per_band is not None and not 1 <= d.rows_per_band <= d.num_perm // 2:
        # datasketch needs at least two bands.
        raise ConfigError(f"dedup.rows_per_band must be in 1..{d.num_perm // 2} (num_perm / 2) or null, "
                          f"got {d.rows_per_band}")
    if cfg.output.shard_size < 1:
        raise ConfigError("output.shard_size must be at least 1")
    if not 0 <= cfg.output.compresslevel <= 9:
        raise ConfigError("output.compresslevel must be in 0..9")


def load_config(path: Optional[str | Path] = None) -> CorpusConfig:
    """Defaults, overridden by the YAML file at ``path`` when given."""
    data = _read_yaml(DEFAULT_CONFIG_PATH)
    if path is not None:
        path = Path(path)
        data = _merge(data, _read_yaml(path), path)
    try:
        cfg = CorpusConfig(**{name: cls(**data[name]) for name, cls in _SECTIONS.items()})
    except TypeError as e:
        raise ConfigError(f"incomplete config: {e}") from e
    _check(cfg)
    return cfg
