"""kinoe Orbax checkpoint -> Hugging Face directory, streamed tensor by tensor."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
from tqdm import tqdm

from kinoe_jax.hf import hf_config, peft_adapter, tokenizer as tok_lib
from kinoe_jax.utils.atomic import atomic_directory, check_output
from kinoe_jax.hf.mapping import ConversionError, Entry, entries, param_shapes
from kinoe_jax.hf.orbax_io import CheckpointReader
from kinoe_jax.hf.verify import verify_adapter, verify_export
from kinoe_jax.hf.safetensors_io import (NP_DTYPES, ST_DTYPES, PlannedTensor, ShardWriter, plan_shards, shard_name,
                                         write_index)
from kinoe_jax.models import lora as lora_lib
from kinoe_jax.models.config import ModelConfig

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# Stacked layer leaves bigger than this are read a few layers at a time (slower when the stored
# chunks span all layers, but memory stays bounded).
DEFAULT_READ_BUDGET_BYTES = 2 * 1024**3


@dataclasses.dataclass
class ExportResult:
    output_dir: str
    step: int
    num_tensors: int
    num_shards: int
    total_bytes: int
    seconds: float
    verification: dict | None = None


def model_config_from(fields: dict, where: str) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConversionError(f"{where}: unknown ModelConfig fields {unknown} (checkpoint from a newer kinoe_jax?)")
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        # gin appends "In call to configurable ..." lines to what a configurable raises: keep ours.
        raise ConversionError(f"{where}: {str(e).splitlines()[0]}") from e


def find_tokenizer(checkpoint_dir: str, explicit: str | None) -> str:
    """The run's tokenizer: DIR/tokenizer.model next to DIR/checkpoints (train.py copies it there)."""
    if explicit:
        if not os.path.exists(explicit):
            raise ConversionError(f"--tokenizer {explicit} does not exist")
        return explicit
    here = os.path.abspath(checkpoint_dir)
    for d in (os.path.dirname(here), here):
        path = os.path.join(d, "tokenizer.model")
        if os.path.exists(path):
            return path
    raise ConversionError(f"no tokenizer.model beside {checkpoint_dir} (a training workdir has one); "
                          "pass --tokenizer=PATH to the SentencePiece model the run used")


def _check_shapes(found: dict, expected: dict, where: str) -> None:
    problems = []
    for path, shape in expected.items():
        if path not in found:
            problems.append(f"missing {'/'.join(path)}")
        elif tuple(found[path]) != tuple(shape):
            problems.append(f"{'/'.join(path)} has shape {tuple(found[path])}, the model config implies {tuple(shape)}")
    problems += [f"unexpected {'/'.join(p)}" for p in sorted(set(found) - set(expected))]
    if problems:
        raise ConversionError(f"{where}: params do not match model_config:\n  - " + "\n  - ".join(problems[:20]))


class _LeafBlocks:
    """Serves leaf[index] for entries in leaf-major order, reading each leaf once (or in layer blocks)."""

    def __init__(self, reader: CheckpointReader, budget: int):
        self.reader, self.budget = reader, budget
        self.key, self.start, self.block = None, 0, None

    def get(self, e: Entry) -> np.ndarray:
        if not e.index:
            self.key, self.block = None, None
            return self.reader.read(e.leaf)
        i = e.index[0]
        if self.key != e.leaf or not self.start <= i < self.start + len(self.block):
            self.block = None  # free the previous block before reading the next
            n = self.reader.shapes()[e.leaf][0]
            per_row = max(self.reader.nbytes(e.leaf) // n, 1)
            rows = n if self.reader.nbytes(e.leaf) <= self.budget else max(1, self.budget // per_row)
            self.start = (i // rows) * rows
            self.block = self.reader.read(e.leaf, self.start, min(self.start + rows, n))
            self.key = e.leaf
        return self.block[(i - self.start,) + e.index[1:]]


class _Merger:
    """Folds each kernel's LoRA adapter into it as the kernel streams past (W + alpha/rank * A @ B,
    in float64 so the merged weight is the nearest float32 to the exact sum)."""

    def __init__(self, reader: CheckpointReader, cfg: ModelConfig):
        self.scale = cfg.lora.scale
        self.adapters = {leaf: reader.read(leaf) for leaf in reader.leaves if lora_lib.is_adapter(leaf)}

    def __call__(self, e: Entry, kernel: np.ndarray) -> np.ndarray:
        a, b = (self.adapters.get(e.leaf[:-1] + (name,)) for name in lora_lib.ADAPTER_NAMES)
        if a is None:
            return kernel
        a, b = a[e.index].astype(np.float64), b[e.index].astype(np.float64)
        return lora_lib.merged_kernel(kernel.astype(np.float64), a, b, self.scale).astype(kernel.dtype)


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled)


def write_weights(reader: CheckpointReader, ents: list[Entry], out_dir: str, dtype: str, max_shard_bytes: int,
                  read_budget: int, progress: bool, merge: _Merger | None = None) -> tuple[int, int]:
    st_dtype = ST_DTYPES[dtype]
    target = NP_DTYPES[st_dtype]
    planned = [PlannedTensor(e.hf_name, e.hf_shape, st_dtype) for e in ents]
    shards = plan_shards(planned, max_shard_bytes)
    blocks = _LeafBlocks(reader, read_budget)
    it = iter(ents)
    total = sum(t.nbytes for t in planned)
    with _progress(total, "writing safetensors", progress) as bar:
        for s, shard in enumerate(shards):
            writer = ShardWriter(os.path.join(out_dir, shard_name(s, len(shards))), shard)
            for t in shard:
                e = next(it)
                value = blocks.get(e)
                hf = e.transform.to_hf(merge(e, value) if merge else value)
                writer.write(e.hf_name, hf.astype(target, copy=False))
                bar.update(t.nbytes)
            writer.close()
    write_index(out_dir, shards)
    return len(shards), total


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


def convert_to_hf(checkpoint_dir: str, output_dir: str, *, step: int | None = None, dtype: str = "float32",
                  overwrite: bool = False, verify: bool = False, tokenizer: str | None = None,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, read_budget: int = DEFAULT_READ_BUDGET_BYTES,
                  progress: bool = True, lora: str = "merge", base_model: str | None = None,
                  log=print) -> ExportResult:
    """A HF model directory; for a LoRA checkpoint, `lora` picks what is written: "merge" (the
    adapters folded into the weights), "base" (the frozen base alone) or "adapter" (a PEFT adapter
    directory for `base_model`)."""
    t0 = time.perf_counter()
    check_output(output_dir, overwrite)
    # Everything that can refuse does so before the output directory exists.
    if lora not in peft_adapter.LORA_MODES:
        raise ConversionError(f"--lora={lora!r}: choose one of {list(peft_adapter.LORA_MODES)}")
    if (lora == "adapter") != (base_model is not None):
        raise ConversionError("--lora=adapter needs --base_model=NAME_OR_PATH (the model the adapter is loaded onto)"
                              if lora == "adapter" else "--base_model is only read with --lora=adapter")
    reader = CheckpointReader(checkpoint_dir, step)
    where = f"{checkpoint_dir}/{reader.step}"
    cfg = model_config_from(reader.model_config, f"{where}/model_config")
    if lora == "adapter" and cfg.lora is None:
        raise ConversionError(f"--lora=adapter: {where} was not trained with LoRA (its model_config has no lora); "
                              "export it as a plain model without --lora")
    tok_path = find_tokenizer(checkpoint_dir, tokenizer)
    proto = tok_lib.load_proto(tok_path)
    tok_lib.check_supported(proto, tok_path)
    if len(proto.pieces) > cfg.vocab_size:
        raise ConversionError(f"{tok_path} has {len(proto.pieces)} pieces but the model's vocab_size is {cfg.vocab_size}")
    config_json = hf_config.to_hf_config(cfg, dtype, tok_lib.special_ids(proto))
    expected = param_shapes(cfg)
    _check_shapes(reader.shapes(), expected, f"{where}/state")
    if lora == "adapter":
        return _write_adapter(reader, cfg, where, output_dir, overwrite, base_model, dtype, tok_path, verify, log, t0)
    ents = entries(peft_adapter.base_config(cfg), peft_adapter.base_shapes(expected))
    merge = _Merger(reader, cfg) if cfg.lora is not None and lora == "merge" else None
    source_dtypes = sorted({str(np.dtype(m.dtype)) for m in reader.leaves.values()})
    if source_dtypes != [dtype]:
        log(f"casting parameters {'/'.join(source_dtypes)} -> {dtype} (--dtype)")
    if cfg.num_experts and cfg.moe_capacity_factor > 0:
        log(f"note: trained with moe_capacity_factor={cfg.moe_capacity_factor}; HF Mixtral never drops tokens "
            "(it computes what kinoe computes with moe_capacity_factor=0)")
    what = {"merge": " with its LoRA adapters merged", "base": " without its LoRA adapters"}[lora] if cfg.lora else ""
    log(f"exporting {where}{what} as {config_json['architectures'][0]} ({len(ents)} tensors, {dtype}) to {output_dir}")

    with atomic_directory(output_dir, overwrite) as tmp:
        _write_json(os.path.join(tmp, "config.json"), config_json)
        _write_json(os.path.join(tmp, "generation_config.json"),
                    hf_config.generation_config(tok_lib.special_ids(proto), tok_lib.stop_ids(proto)))
        tok_lib.export(tok_path, tmp, cfg.max_seq_len)
        n_shards, total = write_weights(reader, ents, tmp, dtype, max_shard_bytes, read_budget, progress, merge)
        report = None
        if verify:
            report = verify_export(reader, cfg, tmp, dtype, log=log, lora_mode=lora)
    return ExportResult(os.path.abspath(output_dir), reader.step, len(ents), n_shards, total,
                        time.perf_counter() - t0, report)


def _write_adapter(reader, cfg, where, output_dir, overwrite, base_model, dtype, tok_path, verify, log, t0):
    peft_adapter.check_base_model(cfg, reader.shapes(), base_model)
    peft_adapter.warn_if_other_base(reader, cfg, base_model, log)
    n = len(peft_adapter.adapter_tensors(cfg, reader.shapes()))
    log(f"exporting the LoRA adapters of {where} (rank {cfg.lora.rank}, {', '.join(cfg.lora.targets)}; {n} tensors, "
        f"{dtype}) as a PEFT adapter for {base_model} to {output_dir}")
    with atomic_directory(output_dir, overwrite) as tmp:
        total = peft_adapter.write_adapter(reader, cfg, tmp, base_model, dtype)
        tok_lib.export(tok_path, tmp, cfg.max_seq_len)
        report = None
        if verify:
            report = verify_adapter(reader, cfg, tmp, base_model, dtype, log=log)
    return ExportResult(os.path.abspath(output_dir), reader.step, n, 1, total, time.perf_counter() - t0, report)
