"""Will it fit? Compile the real training step for a target mesh before paying for the hardware.

    python -m kinoe_jax.aot --gin_file=gin_configs/models/mistral_7b.gin \\
        --gin_file=gin_configs/mesh/fsdp.gin --num_devices=8 --seq_len=4096 --global_batch=32 \\
        --accelerator=h100

The training step of kinoe_jax.train is lowered and compiled against abstract shapes
(jax.ShapeDtypeStruct carrying the shardings the run would use): the model is never allocated,
so a 7B or 47B model is checked on a laptop with simulated CPU devices
(--num_devices sets XLA's host device count), or against a TPU slice when libtpu is installed
(--tpu_topology=v5p:4x4x4). XLA's buffer assignment gives the per-device memory: arguments
(parameters + optimizer state + batch), temporaries (activations, gradients, collectives'
buffers) and outputs. The CPU compiler's temporaries are a guide, not the GPU's exact figure
(fusion and rematerialisation differ by backend); parameters and optimizer state are exact.

FLOPs per step come from XLA's cost analysis. XLA counts a loop body once, so the count
is taken from two shallow unrolled compiles (one and two layer groups) and extrapolated to
the full depth; it is printed next to the 6N + 12·L·H·Q·T formula used for MFU (remat adds
recomputation on top of the formula). Exit status 1 means "does not fit".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

# Per chip: dense bf16 peak TFLOP/s and memory GB (decimal, as sold).
ACCELERATORS = {
    "h100": (989.0, 80.0), "h200": (989.0, 141.0), "a100": (312.0, 80.0), "a100-40gb": (312.0, 40.0),
    "v5p": (459.0, 95.0), "v5e": (197.0, 16.0), "v4": (275.0, 32.0), "v6e": (918.0, 32.0),
}
GIB = 1024 ** 3


@dataclasses.dataclass
class FitReport:
    model: dict
    mesh: dict
    num_devices: int
    platform: str
    seq_len: int
    global_batch: int
    grad_accum: int
    zero1: bool
    num_params: int
    compile_s: float
    compile_cpu_s: float  # CPU time of all compiler threads (steadier than wall time on a busy host)
    params_bytes: int  # per device, from the shardings
    opt_state_bytes: int
    other_arg_bytes: int  # batch, step, rng
    temp_bytes: int
    output_bytes: int  # outputs that do not reuse a donated argument buffer
    total_bytes: int
    min_state_bytes: float  # (params + optimizer state) / devices: the floor for this many devices
    flops_formula: float  # per step, all devices: (6N + 12·L·H·Q·T) · tokens
    flops_compiled: float | None  # per step, all devices, from XLA's cost analysis (None: skipped)
    flops_compile_s: float
    device_memory_gb: float | None = None
    peak_tflops: float | None = None
    mfu: float | None = None

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory_gb is None else self.total_bytes <= self.device_memory_gb * 1e9

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def tokens_per_sec(self) -> float | None:
        if not (self.peak_tflops and self.mfu):
            return None
        return self.mfu * self.peak_tflops * 1e12 * self.num_devices / (self.flops_formula / self.tokens_per_step)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(fits=self.fits, tokens_per_sec=self.tokens_per_sec(), tokens_per_step=self.tokens_per_step)
        return d


# ----------------------------------------------------------------------------- compiling
def _state_bytes_per_device(abstract) -> int:
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(abstract):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def _full_bytes(abstract) -> int:
    import jax
    import numpy as np

    return sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract))


def compile_train_step(model_cfg, mesh, seq_len: int, global_batch: int, grad_accum: int, zero1: bool,
                       total_steps: int = 1000):
    """(compiled executable, abstract state) of kinoe_jax.train's step on `mesh`, from shapes only."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from kinoe_jax import optim
    from kinoe_jax import train as train_lib
    from kinoe_jax.data import pipeline
    from kinoe_jax.models import Transformer
    from kinoe_jax.parallel import sharding as shd
    from kinoe_jax.parallel.rules import flax_rules

    if global_batch % grad_accum:
        raise ValueError(f"global_batch {global_batch} is not divisible by grad_accum {grad_accum}")
    model = Transformer(model_cfg)
    tx, schedule = optim.make_optimizer(total_steps)
    abstract, shardings, _ = train_lib.abstract_state(model, model_cfg, tx, mesh, seq_len, zero1, 0)
    micro_shape = (grad_accum, global_batch // grad_accum, seq_len)
    batch_sharding = jax.sharding.NamedSharding(mesh, shd.batch_spec(mesh, micro_shape))
    batch = {k: jax.ShapeDtypeStruct(micro_shape, jnp.int32, sharding=batch_sharding) for k in pipeline.FEATURES}
    # The same jit as kinoe_jax.train (shardings in and out, the state donated).
    step = jax.jit(train_lib.make_train_step(model, tx, schedule), in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, None), donate_argnums=(0,))
    with jax.set_mesh(mesh), nn.logical_axis_rules(flax_rules(mesh)):
        compiled = step.lower(abstract, batch).compile()
    return compiled, abstract


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per partition
        cost = cost[0]
    return float(cost.get("flops", 0.0)) if cost else 0.0


def count_flops(model_cfg, mesh, seq_len: int, global_batch: int, zero1: bool) -> float:
    """FLOPs of one step on all devices, from two unrolled shallow compiles extrapolated in depth.

    XLA's cost analysis counts a while-loop body once, so scanned layers (and scanned
    micro-batches) would be under-counted. Per layer group the work is identical, so
    f(groups) = a + b·groups is exact; one micro-batch of the whole global batch does the same
    matmuls as grad_accum smaller ones.
    """
    period = model_cfg.moe_layer_period if model_cfg.num_experts else 1
    groups = model_cfg.num_layers // period
    values = []
    for g in (1, 2):
        cfg = dataclasses.replace(model_cfg, num_layers=g * period, scan_layers=False)
        compiled, _ = compile_train_step(cfg, mesh, seq_len, global_batch, 1, zero1)
        values.append(_flops(compiled))
    per_group = values[1] - values[0]
    return (values[0] + per_group * (groups - 1)) * mesh.size


def fit_report(model_cfg, mesh, seq_len: int, global_batch: int, grad_accum: int = 1, zero1: bool = False,
               count: bool = True, device_memory_gb: float | None = None, peak_tflops: float | None = None,
               mfu: float | None = None) -> FitReport:
    t, cpu = time.perf_counter(), time.process_time()
    compiled, abstract = compile_train_step(model_cfg, mesh, seq_len, global_batch, grad_accum, zero1)
    compile_s, compile_cpu_s = time.perf_counter() - t, time.process_time() - cpu
    mem = compiled.memory_analysis()
    if mem is None:
        raise RuntimeError(f"the {mesh.devices.flat[0].platform} compiler gives no memory analysis")
    params_b = _state_bytes_per_device(abstract["params"])
    opt_b = _state_bytes_per_device(abstract["opt_state"])
    args_b = int(mem.argument_size_in_bytes)
    out_b = max(int(mem.output_size_in_bytes) - int(mem.alias_size_in_bytes), 0)
    temp_b = int(mem.temp_size_in_bytes)
    t = time.perf_counter()
    flops_compiled = count_flops(model_cfg, mesh, seq_len, global_batch, zero1) if count else None
    flops_s = time.perf_counter() - t if count else 0.0
    tokens = global_batch * seq_len
    return FitReport(
        model=dataclasses.asdict(model_cfg), mesh=dict(mesh.shape),
        num_devices=mesh.size, platform=mesh.devices.flat[0].platform, seq_len=seq_len, global_batch=global_batch,
        grad_accum=grad_accum, zero1=zero1, num_params=model_cfg.num_params(), compile_s=compile_s,
        compile_cpu_s=compile_cpu_s,
        params_bytes=params_b, opt_state_bytes=opt_b, other_arg_bytes=max(args_b - params_b - opt_b, 0),
        temp_bytes=temp_b, output_bytes=out_b, total_bytes=args_b + temp_b + out_b,
        min_state_bytes=(_full_bytes(abstract["params"]) + _full_bytes(abstract["opt_state"])) / mesh.size,
        flops_formula=model_cfg.flops_per_token(seq_len) * tokens, flops_compiled=flops_compiled,
        flops_compile_s=flops_s, device_memory_gb=device_memory_gb, peak_tflops=peak_tflops, mfu=mfu)


# ----------------------------------------------------------------------------- report
def _gib(n: float) -> str:
    return f"{n / GIB:8.2f} GiB"


def format_report(r: FitReport, accelerator: str | None = None) -> str:
    m = r.model
    lines = [
        f"model: {r.num_params / 1e9:.2f} B parameters ({m['num_layers']} layers, hidden {m['hidden_size']}, "
        f"ffn {m['intermediate_size']}, heads {m['num_heads']}/{m['num_kv_heads']}"
        + (f", {m['num_experts']} experts top-{m['num_experts_per_tok']}" if m.get("num_experts") else "") + ")",
        f"mesh: {r.mesh} on {r.num_devices} {r.platform} devices; zero1 {'on' if r.zero1 else 'off'}",
        f"batch: {r.global_batch} x {r.seq_len} tokens per step (grad_accum {r.grad_accum})",
        f"compile: {r.compile_s:.1f} s ({r.compile_cpu_s:.1f} s CPU)"
        + (f" (+{r.flops_compile_s:.1f} s to count FLOPs)" if r.flops_compiled else ""),
        "per device:",
        f"  parameters        {_gib(r.params_bytes)}",
        f"  optimizer state   {_gib(r.opt_state_bytes)}",
        f"  batch and scalars {_gib(r.other_arg_bytes)}",
        f"  temporaries       {_gib(r.temp_bytes)}   (activations, gradients, collective buffers)",
        f"  outputs           {_gib(r.output_bytes)}   (beyond the donated state)",
        f"  total             {_gib(r.total_bytes)}",
        f"  floor: (parameters + optimizer state) / {r.num_devices} devices = {_gib(r.min_state_bytes).strip()}; "
        f"state held per device is {(r.params_bytes + r.opt_state_bytes) / max(r.min_state_bytes, 1):.2f}x the floor",
    ]
    flops = f"FLOPs per step: formula 6N+12LHQT {r.flops_formula:.3e}"
    if r.flops_compiled:
        flops += f", compiled {r.flops_compiled:.3e} (ratio {r.flops_compiled / r.flops_formula:.2f})"
        if m.get("num_experts"):
            # The dropless expert FFN loops over token blocks (or is a grouped-matmul kernel):
            # XLA's count misses most of it, so the formula is the figure to trust for MoE.
            flops += "; MoE expert matmuls run in a loop XLA counts once: use the formula"
    lines.append(flops)
    tps = r.tokens_per_sec()
    if tps:
        lines.append(f"expected at {r.mfu:.0%} MFU of {r.peak_tflops:g} TFLOP/s per device: {tps:,.0f} tokens/s "
                     f"({tps / r.num_devices:,.0f} per device), {r.tokens_per_step / tps:.2f} s per step")
    if r.fits is not None:
        what = f"{r.device_memory_gb:g} GB" + (f" ({accelerator})" if accelerator else "")
        need = r.total_bytes / 1e9
        if r.fits:
            lines.append(f"FITS: {need:.1f} GB of {what} per device ({need / r.device_memory_gb:.0%})")
        else:
            lines.append(f"DOES NOT FIT: needs {need:.1f} GB per device, the device has {what} "
                         f"(short by {need - r.device_memory_gb:.1f} GB). Try more devices, FSDP "
                         f"(gin_configs/mesh/fsdp.gin), a smaller micro-batch (grad_accum), or remat.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line
def _devices(args):
    import jax

    if args.tpu_topology:
        try:
            from jax.experimental import topologies

            bounds = tuple(int(x) for x in args.tpu_chips_per_host.split(","))
            topo = topologies.get_topology_desc(topology_name=args.tpu_topology, platform="tpu",
                                                chip_config_name=args.tpu_chip_config,
                                                chips_per_host_bounds=bounds, num_slices=1)
        except Exception as e:  # noqa: BLE001 - no libtpu, or a name libtpu does not know
            raise SystemExit(f"--tpu_topology={args.tpu_topology}: cannot describe this TPU slice "
                             f"({type(e).__name__}: {e}). It needs libtpu (pip install 'jax[tpu]') and a "
                             f"libtpu topology name such as v5p:4x4x4 or v5e:4x4.")
        return list(topo.devices)
    devices = jax.devices()
    n = args.num_devices or len(devices)
    if len(devices) < n:
        raise SystemExit(f"--num_devices={n} but only {len(devices)} devices exist: set it before JAX starts "
                         f"(run `python -m kinoe_jax.aot` as its own process)")
    return devices[:n]


def _zero1_from_gin() -> bool:
    import gin

    try:
        return bool(gin.query_parameter("train.zero1"))
    except ValueError:
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_file", action="append", default=[], help="model / mesh / run gin (repeatable)")
    parser.add_argument("--gin_bindings", action="append", default=[], help="gin binding (repeatable)")
    parser.add_argument("--num_devices", type=int, default=None,
                        help="devices of the target mesh (simulated on the CPU when no accelerator is attached)")
    parser.add_argument("--tpu_topology", default=None, help="libtpu topology name, e.g. v5p:4x4x4 (needs libtpu)")
    parser.add_argument("--tpu_chip_config", default="default", help="libtpu chip config (e.g. megacore for v4)")
    parser.add_argument("--tpu_chips_per_host", default="2,2,1", help="chips per host bounds, e.g. 2,2,1")
    parser.add_argument("--seq_len", type=int, default=None, help="default: DataConfig.seq_len from gin")
    parser.add_argument("--global_batch", type=int, default=None, help="default: DataConfig.global_batch from gin")
    parser.add_argument("--grad_accum", type=int, default=None, help="default: DataConfig.grad_accum from gin")
    parser.add_argument("--zero1", action="store_true", default=None, help="split optimizer state over data too")
    parser.add_argument("--accelerator", default="h100", choices=sorted(ACCELERATORS),
                        help="sets the peak and memory defaults below")
    parser.add_argument("--device_memory_gb", type=float, default=None, help="memory per device (GB, 1e9 bytes)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="dense bf16 peak per device")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to expect")
    parser.add_argument("--skip_flop_count", action="store_true", help="skip the two shallow FLOP-count compiles")
    parser.add_argument("--json_out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    if not args.gin_file:
        parser.error("at least one --gin_file is required (e.g. gin_configs/models/mistral_7b.gin)")

    if args.num_devices and not args.tpu_topology and "jax" not in sys.modules:
        # Simulated devices must be requested before JAX starts its CPU backend.
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.num_devices}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import kinoe_jax.data  # noqa: F401  (hides accelerators from TensorFlow)
    from kinoe_jax import train as _train  # noqa: F401  (registers train.* for run gin files)
    from kinoe_jax.config_io import load_gin
    from kinoe_jax.data.pipeline import DataConfig
    from kinoe_jax.models import ModelConfig
    from kinoe_jax.parallel.mesh import make_mesh

    load_gin(args.gin_file, args.gin_bindings)
    model_cfg = ModelConfig()
    data = DataConfig()
    mesh = make_mesh(devices=_devices(args))
    peak, memory = ACCELERATORS[args.accelerator]
    report = fit_report(
        model_cfg, mesh, seq_len=args.seq_len or data.seq_len, global_batch=args.global_batch or data.global_batch,
        grad_accum=args.grad_accum or data.grad_accum, zero1=_zero1_from_gin() if args.zero1 is None else True,
        count=not args.skip_flop_count, device_memory_gb=args.device_memory_gb or memory,
        peak_tflops=args.peak_tflops or peak, mfu=args.mfu)
    print(format_report(report, accelerator=args.accelerator), flush=True)
    if args.json_out:
        tmp = args.json_out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(report.as_dict(), f, indent=1, default=str)
        os.replace(tmp, args.json_out)
    return 0 if report.fits is not False else 1


if __name__ == "__main__":
    sys.exit(main())
