"""A LoRA checkpoint as a PEFT adapter directory: adapter_config.json + adapter_model.safetensors.

The adapter's tensor names come from the HF names of the kernels it adapts (`mapping.RULES`):
`model.layers.3.self_attn.q_proj.weight` is adapted by
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` ([rank, in]) and `...lora_B.weight`
([out, rank]). PEFT computes `x W^T + (lora_alpha / r) * x A^T B^T`, kinoe `x W + (alpha / rank) *
x A B`, and A [*in, rank], B [rank, *out] go to the HF layout by the same transform as their
kernel (it flattens the input and output dims and transposes), so nothing here knows a layout.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from kinoe_jax.hf.hf_config import read_hf_config
from kinoe_jax.hf.mapping import ConversionError, Entry, entries
from kinoe_jax.hf.safetensors_io import NP_DTYPES, ST_DTYPES, PlannedTensor, SafetensorsReader, ShardWriter
from kinoe_jax.models import lora as lora_lib

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LORA_MODES = ("merge", "adapter", "base")


@dataclasses.dataclass(frozen=True)
class AdapterTensor:
    peft_name: str
    leaf: tuple[str, ...]      # .../lora_a or .../lora_b
    index: tuple[int, ...]     # the stacked layer, as the kernel's entry
    to_hf: object              # the kernel's transform (see the module docstring)
    hf_shape: tuple[int, ...]


def base_config(cfg):
    return dataclasses.replace(cfg, lora=None)


def base_shapes(shapes: dict) -> dict:
    return {p: s for p, s in shapes.items() if not lora_lib.is_adapter(p)}


def kernel_entries(cfg, shapes: dict) -> list[Entry]:
    """The mapping entries of the kernels `cfg.lora` adapts, layer by layer."""
    targets = set(cfg.lora.targets)
    return [e for e in entries(base_config(cfg), base_shapes(shapes))
            if e.leaf[-1] == "kernel" and e.leaf[-2] in targets and len(e.leaf) > 2]


def module_name(e: Entry) -> str:
    """PEFT's target module name: the HF module the kernel belongs to (q_proj, down_proj, ...)."""
    return e.hf_name.rsplit(".", 2)[-2]


def adapter_tensors(cfg, shapes: dict) -> list[AdapterTensor]:
    out = []
    rank = cfg.lora.rank
    for e in kernel_entries(cfg, shapes):
        if not e.hf_name.endswith(".weight"):
            raise ConversionError(f"mapping rule for {e.leaf_name} names {e.hf_name}, not a .weight")
        module = PEFT_PREFIX + e.hf_name[: -len(".weight")]
        n_out, n_in = e.hf_shape
        for which, name, hf_shape in (("lora_a", "lora_A", (rank, n_in)), ("lora_b", "lora_B", (n_out, rank))):
            leaf = e.leaf[:-1] + (which,)
            if leaf not in shapes:
                raise ConversionError(f"{'/'.join(leaf)} missing from the checkpoint although its model_config "
                                      f"targets {e.leaf[-2]}")
            out.append(AdapterTensor(f"{module}.{name}.weight", leaf, e.index, e.transform.to_hf, hf_shape))
    return out


def peft_config(cfg, shapes: dict, base_model: str) -> dict:
    """adapter_config.json: the fields PEFT and vLLM read, with PEFT's meaning (plain alpha/r scaling)."""
    lora = cfg.lora
    modules = sorted({module_name(e) for e in kernel_entries(cfg, shapes)})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


# ----------------------------------------------------------------------------- the base model
def _base_hf_config(base_model: str) -> tuple[dict, str | None]:
    """(config.json, local directory or None) of --base_model, a directory or a hub name."""
    if os.path.isdir(base_model):
        return read_hf_config(base_model), base_model
    try:
        from transformers import AutoConfig  # noqa: PLC0415 (optional: the hf extra)

        return AutoConfig.from_pretrained(base_model).to_dict(), None
    except Exception as e:  # noqa: BLE001 - offline, unknown name, private repo: all the same to the user
        raise ConversionError(f"--base_model {base_model}: neither a directory nor a model transformers can "
                              f"fetch ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                              "pass the exported base model's directory") from e


def check_base_model(cfg, shapes: dict, base_model: str) -> None:
    """The adapter must fit --base_model: same layer count and projection shapes (from its
    config.json, and from its weights when it is a local directory)."""
    hf, local = _base_hf_config(base_model)
    heads = hf.get("num_attention_heads")
    try:
        theirs = dict(hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"], num_heads=heads,
                      num_kv_heads=hf.get("num_key_value_heads") or heads,
                      dim_per_head=hf.get("head_dim") or hf["hidden_size"] // heads)
        layers = hf["num_hidden_layers"]
    except (KeyError, TypeError) as e:
        raise ConversionError(f"--base_model {base_model}: config.json lacks {e} "
                              "(not a Mistral/Llama-style model)") from e
    ours_dims = lora_lib.projection_dims(cfg)
    their_dims = lora_lib.projection_dims(_Dims(**theirs))
    problems = [f"{t} is {their_dims[t][0]} -> {their_dims[t][1]} there, {ours_dims[t][0]} -> {ours_dims[t][1]} here"
                for t in cfg.lora.targets if their_dims[t] != ours_dims[t]]
    if layers != cfg.num_layers:
        problems.insert(0, f"{layers} layers there, {cfg.num_layers} here")
    if not problems and local and _has_weights(local):
        reader = SafetensorsReader(local)
        for e in kernel_entries(cfg, shapes):
            t = reader.tensors.get(e.hf_name)
            if t is None or t.shape != e.hf_shape:
                problems.append(f"{e.hf_name} is {'missing' if t is None else list(t.shape)} there, "
                                f"{list(e.hf_shape)} here")
                break
    if problems:
        raise ConversionError(f"--base_model {base_model} does not match the adapter's shapes: {'; '.join(problems)}")


@dataclasses.dataclass(frozen=True)
class _Dims:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    dim_per_head: int


def _has_weights(directory: str) -> bool:
    return any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in os.listdir(directory))


def warn_if_other_base(reader, cfg, base_model: str, log=print) -> None:
    """The adapter was trained on the checkpoint's frozen base; say so when --base_model's weights
    differ from it (shapes can match and the weights still be another model's)."""
    if not (os.path.isdir(base_model) and _has_weights(base_model)):
        return
    theirs = SafetensorsReader(base_model)
    for e in entries(base_config(cfg), base_shapes(reader.shapes())):
        if e.leaf[-1] != "scale" or e.index or e.hf_name not in theirs.tensors:
            continue  # one norm scale is enough: small, and trained like every other weight
        ours = e.transform.to_hf(reader.read(e.leaf)).astype(np.float32)
        other = theirs.read(e.hf_name).astype(np.float32)
        if ours.shape == other.shape and not np.allclose(ours, other, rtol=1e-2, atol=1e-2):
            log(f"warning: {e.hf_name} of --base_model {base_model} differs from the checkpoint's frozen base; "
                "the adapter will be applied to other weights than it was trained with")
        return


# ----------------------------------------------------------------------------- writing
def write_adapter(reader, cfg, out_dir: str, base_model: str, dtype: str) -> int:
    """Writes the adapter into `out_dir`; returns its size in bytes. Adapters are small (about
    1% of the model at rank 16), so each stacked leaf is read whole, once."""
    st_dtype = ST_DTYPES[dtype]
    shapes = reader.shapes()
    tensors = adapter_tensors(cfg, shapes)
    planned = [PlannedTensor(t.peft_name, t.hf_shape, st_dtype) for t in tensors]
    writer = ShardWriter(os.path.join(out_dir, WEIGHTS_FILE), planned)
    leaves: dict = {}
    for t in tensors:
        if t.leaf not in leaves:
            leaves[t.leaf] = reader.read(t.leaf)
        hf = t.to_hf(leaves[t.leaf][t.index])
        writer.write(t.peft_name, np.asarray(hf).astype(NP_DTYPES[st_dtype]))
    writer.close()
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(peft_config(cfg, shapes, base_model), f, indent=2)
        f.write("\n")
    return sum(p.nbytes for p in planned)
