"""Hugging Face directory -> kinoe Orbax checkpoint (+ the gin model config it implies), streamed."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time

import gin
import jax
import numpy as np
from tqdm import tqdm

from kinoe_jax.config.gin_io import load_gin
from kinoe_jax.hf import hf_config
from kinoe_jax.hf.tokenizer import KINOE_IDS, load_proto, special_ids
from kinoe_jax.training import optim
from kinoe_jax.utils.atomic import atomic_directory, check_output
from kinoe_jax.hf.mapping import IGNORED_HF_TENSORS, ConversionError, Entry, entries, param_shapes
from kinoe_jax.hf.orbax_io import LazyArray, write_checkpoint
from kinoe_jax.hf.safetensors_io import SafetensorsReader

GIN_FILE = "model_config.gin"
# Lossless into kinoe's float32 parameters; anything else would be a cast we refuse to do silently.
IMPORT_DTYPES = ("F32", "BF16", "F16")


@dataclasses.dataclass
class ImportResult:
    output_dir: str
    checkpoint_dir: str
    gin_file: str
    model_config: object
    num_tensors: int
    seconds: float


def _check_tensors(reader: SafetensorsReader, ents: list[Entry], cfg, hf_dir: str) -> None:
    expected = {e.hf_name: e for e in ents}
    problems = []
    for name, e in expected.items():
        t = reader.tensors.get(name)
        if t is None:
            problems.append(f"missing {name}")
        elif t.shape != e.hf_shape:
            problems.append(f"{name} has shape {t.shape}, config.json implies {e.hf_shape}")
        elif t.dtype not in IMPORT_DTYPES:
            problems.append(f"{name} is {t.dtype}; only {IMPORT_DTYPES} convert losslessly to float32")
    extra = sorted(n for n in reader.tensors if n not in expected and not IGNORED_HF_TENSORS.fullmatch(n))
    if cfg.tie_embeddings and "lm_head.weight" in extra:
        # Some tied checkpoints store the head anyway; it must then be the embedding itself.
        extra.remove("lm_head.weight")
        embed = "model.embed_tokens.weight"
        if embed in reader.tensors and not np.array_equal(reader.read("lm_head.weight"), reader.read(embed)):
            problems.append("tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight")
    problems += [f"unexpected {n} (not part of a {cfg.num_experts and 'Mixtral' or 'Mistral/Llama'} model)"
                 for n in extra]
    if problems:
        more = [f"... and {len(problems) - 20} more"] if len(problems) > 20 else []
        raise ConversionError(f"{hf_dir}: weights do not match config.json:\n  - " + "\n  - ".join(problems[:20] + more))


def lazy_params(reader: SafetensorsReader, ents: list[Entry], shapes: dict, on_piece=None) -> dict:
    """The params tree as LazyArrays: each stacked leaf is built one HF tensor at a time."""
    by_leaf: dict[tuple, list[Entry]] = {}
    for e in ents:
        by_leaf.setdefault(e.leaf, []).append(e)

    def loader(e: Entry):
        def load():
            w = reader.read(e.hf_name).astype(np.float32)  # exact from bf16/fp16
            out = e.transform.from_hf(w, e.kinoe_shape)
            if on_piece:
                on_piece(reader.tensors[e.hf_name].nbytes)
            return out
        return load

    tree: dict = {}
    for leaf, es in by_leaf.items():
        lazy = LazyArray(shapes[leaf], np.dtype(np.float32), len(es[0].index),
                         lambda es=es: [(e.index, loader(e)) for e in es])
        node = tree
        for key in leaf[:-1]:
            node = node.setdefault(key, {})
        node[leaf[-1]] = lazy
    return tree


def lazy_train_state(params: dict, gin_files=(), gin_bindings=()) -> dict:
    """params + zero optimizer state with the structure train.py restores (its make_optimizer)."""
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params,
                            is_leaf=lambda x: isinstance(x, LazyArray))
    depth = {tuple(str(getattr(k, "key", k)) for k in p): a.depth
             for p, a in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, LazyArray))[0]}
    if gin_files or gin_bindings:
        # Registers every configurable a run config may name; it loads seqio and TensorFlow, which
        # a conversion without a run config does not need.
        import kinoe_jax.training.loop  # noqa: F401, PLC0415

        load_gin(list(gin_files), list(gin_bindings))
    try:
        tx, _ = optim.make_optimizer(total_steps=1)
        opt_abstract = jax.eval_shape(tx.init, abstract)
    finally:
        if gin_files or gin_bindings:
            gin.clear_config()

    def zeros(path, s):
        keys = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        # Adam's moments mirror the params tree: split them along the same layer axis.
        d = next((depth[keys[i:]] for i in range(len(keys)) if keys[i:] in depth), 0)
        return LazyArray.zeros(s.shape, s.dtype, d)

    opt_state = jax.tree_util.tree_map_with_path(zeros, opt_abstract)
    rng = np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.PRNGKey(0), 1)))
    return {"params": params, "opt_state": opt_state, "step": LazyArray.constant(np.int32(0)),
            "rng": LazyArray.constant(rng)}


def _tokenizer_lines(hf_dir: str, out_dir: str, log) -> list[str]:
    """Copy a SentencePiece tokenizer.model and bind it, if its ids are the ones kinoe assumes."""
    src = os.path.join(hf_dir, "tokenizer.model")
    final = os.path.join(os.path.abspath(out_dir), "tokenizer.model")
    if not os.path.exists(src):
        log(f"note: {hf_dir} has no SentencePiece tokenizer.model; set tokenizer_path.path yourself")
        return ["# No SentencePiece tokenizer.model in the HF directory: bind tokenizer_path.path yourself."]
    ids = special_ids(load_proto(src))
    want = KINOE_IDS
    line = f"tokenizer_path.path = {hf_config._gin_value(final)}"
    if ids != want:
        log(f"warning: the HF tokenizer's special ids {ids} differ from kinoe's {want}; "
            "its binding is left commented out in the gin file")
        return [f"# The HF tokenizer's special ids {ids} differ from the ids kinoe's data pipeline assumes",
                f"# {want}; train with it only after checking every place those ids are used.", "# " + line]
    return ["# The HF model's SentencePiece tokenizer (its special ids match kinoe's).", line]


def convert_from_hf(hf_dir: str, output_dir: str, *, overwrite: bool = False, params_only: bool = False,
                    gin_files=(), gin_bindings=(), progress: bool = True, log=print) -> ImportResult:
    t0 = time.perf_counter()
    check_output(output_dir, overwrite)
    raw = hf_config.read_hf_config(hf_dir)
    cfg = hf_config.from_hf_config(raw, os.path.join(hf_dir, "config.json"))
    reader = SafetensorsReader(hf_dir)
    shapes = param_shapes(cfg)
    ents = entries(cfg, shapes)
    _check_tensors(reader, ents, cfg, hf_dir)
    log(f"importing {raw.get('architectures', [raw['model_type']])[0]} from {hf_dir} "
        f"({cfg.num_params() / 1e6:.1f}M parameters, {len(ents)} tensors) to {output_dir}")

    total = sum(reader.tensors[e.hf_name].nbytes for e in ents)
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading safetensors", disable=not progress) as bar:
        params = lazy_params(reader, ents, shapes, on_piece=bar.update)
        state = {"params": params} if params_only else lazy_train_state(params, gin_files, gin_bindings)
        with atomic_directory(output_dir, overwrite) as tmp:
            tok_lines = _tokenizer_lines(hf_dir, output_dir, log)
            if os.path.exists(os.path.join(hf_dir, "tokenizer.model")):
                shutil.copyfile(os.path.join(hf_dir, "tokenizer.model"), os.path.join(tmp, "tokenizer.model"))
            write_checkpoint(os.path.join(tmp, "checkpoints"), 0, state, dataclasses.asdict(cfg))
            gin = hf_config.gin_text(cfg, os.path.abspath(hf_dir)) + "\n" + "\n".join(tok_lines) + "\n"
            with open(os.path.join(tmp, GIN_FILE), "w", encoding="utf-8") as f:
                f.write(gin)
    out = os.path.abspath(output_dir)
    return ImportResult(out, os.path.join(out, "checkpoints"), os.path.join(out, GIN_FILE), cfg, len(ents),
                        time.perf_counter() - t0)
