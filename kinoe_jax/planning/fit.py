"""The ahead-of-time fit check: compile the real training step for a mesh and report memory,
collectives and a roofline (`python -m kinoe_jax.aot` is its command line)."""

from __future__ import annotations

import dataclasses
import time
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kinoe_jax.models import Transformer
from kinoe_jax.models.attention import choose
from kinoe_jax.models.attention.splash import block_sizes_for
from kinoe_jax.parallel import sharding as shd
from kinoe_jax.parallel.mesh import tier_of_axes
from kinoe_jax.parallel.rules import flax_rules
from kinoe_jax.hardware import chips
from kinoe_jax.planning import hlo_stats, kernel_costs, network
from kinoe_jax.training import optim
from kinoe_jax.training.objectives import CausalLM, RunInfo
from kinoe_jax.training.state import abstract_state
from kinoe_jax.training.step import make_train_step

GIB = 1024 ** 3


@dataclasses.dataclass
class FitReport:
    model: dict
    mesh: dict
    num_devices: int
    platform: str
    target: str | None
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
    matmul_flops: float  # per step, all devices: the compiled program's matmuls (HLO)
    kernel_flops: float  # per step, all devices: inside Pallas / cuDNN kernels (priced)
    bytes_accessed: float  # per step, per device (HLO operations + kernels)
    collective_bytes: dict  # kind -> bytes per step, per device
    fsdp_ideal_bytes: float | None  # per device: gather parameters twice, reduce-scatter gradients once
    kernels: list  # [{name, calls, flops, bytes, seconds}] per device
    unpriced_kernels: list
    roofline_s: float | None  # per step (devices work in parallel)
    xla_optimal_s: float | None
    device_memory_gb: float | None = None
    peak_tflops: float | None = None
    mfu: float | None = None  # the stated MFU for the planner line
    objective: str = "causal_lm"
    step_tokens: int | None = None  # tokens the objective processes per step (DPO: both replies)
    frozen_bytes: int = 0  # per device: inputs beside the state (full DPO's reference parameters)
    # The networks (kinoe_jax.planning.network), when the chip is known: bytes per device per
    # step by tier name, what the layout needs at the least there, and the step time that adds
    # the communication compute cannot hide.
    collectives_by_tier: dict | None = None
    ideal_bytes_by_tier: dict | None = None
    comm_s_by_tier: dict | None = None
    axis_tiers: dict | None = None
    exposed_comm_s: float | None = None
    estimated_step_s: float | None = None
    # ModelConfig.matmul_dtype's products found in the program: mode -> per step and device,
    # and the peaks the roofline priced them at (the chip's, kinoe_jax.hardware.chips)
    low_precision_gemms: dict | None = None
    low_precision_flops: dict | None = None
    low_precision_peaks: dict | None = None

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory_gb is None else self.total_bytes <= self.device_memory_gb * 1e9

    @property
    def tokens_per_step(self) -> int:
        return self.step_tokens or self.global_batch * self.seq_len

    @property
    def flops_compiled(self) -> float:
        return self.matmul_flops + self.kernel_flops

    @property
    def memory_fraction(self) -> float | None:
        return None if not self.device_memory_gb else self.total_bytes / (self.device_memory_gb * 1e9)

    def estimated_mfu(self) -> float | None:
        """The formula's FLOPs over the roofline time: an upper bound on MFU."""
        if not (self.roofline_s and self.peak_tflops):
            return None
        return self.flops_formula / (self.roofline_s * self.peak_tflops * 1e12 * self.num_devices)

    def estimate_mfu(self) -> float | None:
        """The formula's FLOPs over the estimated step time (compute plus exposed communication)."""
        if not (self.estimated_step_s and self.peak_tflops):
            return None
        return self.flops_formula / (self.estimated_step_s * self.peak_tflops * 1e12 * self.num_devices)

    def tokens_per_sec(self, mfu: float | None = None) -> float | None:
        """Whole slice, at `mfu` (default: the estimate)."""
        mfu = mfu if mfu is not None else self.estimated_mfu()
        if not (mfu and self.peak_tflops):
            return None
        return mfu * self.peak_tflops * 1e12 * self.num_devices / (self.flops_formula / self.tokens_per_step)

    def train_days(self, tokens: float, mfu: float | None = None) -> float | None:
        tps = self.tokens_per_sec(mfu)
        return None if not tps else tokens / tps / 86400

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        tps = self.tokens_per_sec()
        d.update(fits=self.fits, tokens_per_step=self.tokens_per_step, flops_compiled=self.flops_compiled,
                 estimated_mfu=self.estimated_mfu(), tokens_per_sec=tps,
                 tokens_per_sec_per_device=tps / self.num_devices if tps else None,
                 memory_fraction=self.memory_fraction, estimate_mfu=self.estimate_mfu())
        est = self.tokens_per_sec(self.estimate_mfu()) if self.estimate_mfu() else None
        d.update(estimate_tokens_per_sec=est, estimate_tokens_per_sec_per_device=est / self.num_devices if est else None)
        return d


# ----------------------------------------------------------------------------- compiling
def _state_bytes_per_device(abstract) -> int:

    total = 0
    for leaf in jax.tree.leaves(abstract):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def _full_bytes(abstract) -> int:

    return sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract))


def compile_train_step(model_cfg, mesh, seq_len: int, global_batch: int, grad_accum: int, zero1: bool,
                       total_steps: int = 1000, objective=None):
    """(compiled executable, abstract state) of kinoe_jax.train's step on `mesh`, from shapes only.

    The one compile path: the fit check, the FLOP and collective counts and the sweeps all use it.
    `objective` (default: the causal LM) is the training loop's; DPO also gets its frozen
    reference (a second parameter tree in full fine-tuning, nothing with LoRA)."""

    if global_batch % grad_accum:
        raise ValueError(f"global_batch {global_batch} is not divisible by grad_accum {grad_accum}")
    objective = objective or CausalLM()
    model = Transformer(model_cfg)
    tx, schedule = optim.make_optimizer(total_steps)
    abstract, shardings, _ = abstract_state(model, model_cfg, tx, mesh, seq_len, zero1, 0)
    micro_shape = (grad_accum, global_batch // grad_accum, seq_len)
    batch_sharding = jax.sharding.NamedSharding(mesh, shd.batch_spec(mesh, micro_shape))
    batch = {k: jax.ShapeDtypeStruct(micro_shape, jnp.int32, sharding=batch_sharding) for k in objective.batch_keys}
    extra, extra_shardings = objective.frozen_inputs(_run_info(model_cfg, mesh, seq_len, global_batch), abstract["params"],
                                                     shardings["params"], lambda directory, step: abstract["params"])
    # The same jit as kinoe_jax.train (shardings in and out, the state donated).
    step = jax.jit(make_train_step(model, tx, schedule, objective),
                   in_shardings=(shardings, batch_sharding, None, extra_shardings),
                   out_shardings=(shardings, None), donate_argnums=(0,))
    with jax.set_mesh(mesh), nn.logical_axis_rules(flax_rules(mesh)):
        compiled = step.lower(abstract, batch, jax.ShapeDtypeStruct((), jnp.float32), extra).compile()
    return compiled, abstract


def _run_info(model_cfg, mesh, seq_len: int, global_batch: int):
    """What an objective knows of a run, for a compile that has no data or checkpoint."""

    data = SimpleNamespace(seq_len=seq_len, global_batch=global_batch, grad_accum=1)
    return RunInfo(workdir="", model_config=model_cfg, data=data, total_steps=1, eval_every=0, seed=0, mesh=mesh,
                   vocab=None)


def check_shapes(model_cfg, seq_len: int, platform: str) -> None:
    """Shape errors a kernel would raise mid-trace, named in one line before any compile."""

    if choose(model_cfg.attention_impl, platform, seq_len, model_cfg.compute_dtype) == "splash":
        block_sizes_for(seq_len, model_cfg.attention_block_q, model_cfg.attention_block_kv)
    if seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds ModelConfig.max_seq_len {model_cfg.max_seq_len}")


def _xla_optimal_seconds(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per partition
        cost = cost[0] if cost else None
    value = cost.get("optimal_seconds") if cost else None
    return float(value) if value and value > 0 else None


def fsdp_ideal_bytes(model_cfg, mesh) -> float | None:
    """Per device and step: all-gather the parameters for the forward and again for the
    backward, reduce-scatter the gradients, in the compute dtype, over the fsdp axis (ring:
    (n - 1)/n of the full size each)."""

    n = mesh.shape.get("fsdp", 1)
    if n <= 1:
        return None
    item = np.dtype(model_cfg.compute_dtype).itemsize
    return 3.0 * model_cfg.num_params() * item * (n - 1) / n


def fit_report(model_cfg, mesh, seq_len: int, global_batch: int, grad_accum: int = 1, zero1: bool = False,
               device_memory_gb: float | None = None, peak_tflops: float | None = None,
               hbm_gbps: float | None = None, mfu: float | None = None, target: str | None = None,
               objective=None, chip=None, devices_per_granule: int | None = None) -> FitReport:
    """`chip` (kinoe_jax.hardware.chips.Chip) adds the networks: bytes per tier and a step estimate."""

    platform = mesh.devices.flat[0].platform
    check_shapes(model_cfg, seq_len, platform)
    t, cpu = time.perf_counter(), time.process_time()
    compiled, abstract = compile_train_step(model_cfg, mesh, seq_len, global_batch, grad_accum, zero1,
                                            objective=objective)
    compile_s, compile_cpu_s = time.perf_counter() - t, time.process_time() - cpu
    mem = compiled.memory_analysis()
    if mem is None:
        raise RuntimeError(f"the {platform} compiler gives no memory analysis")
    params_b = _state_bytes_per_device(abstract["params"])
    opt_b = _state_bytes_per_device(abstract["opt_state"])
    frozen_b = 0
    if objective is not None:
        extra, _ = objective.frozen_inputs(_run_info(model_cfg, mesh, seq_len, global_batch), abstract["params"],
                                           None, lambda directory, step: abstract["params"])
        frozen_b = _state_bytes_per_device(extra) if extra is not None else 0
    args_b = int(mem.argument_size_in_bytes)
    out_b = max(int(mem.output_size_in_bytes) - int(mem.alias_size_in_bytes), 0)
    temp_b = int(mem.temp_size_in_bytes)
    peak = peak_tflops * 1e12 if peak_tflops else None
    bandwidth = hbm_gbps * 1e9 if hbm_gbps else None
    granules = network.granule_of(mesh, devices_per_granule)
    low_peaks = ({m: chips.low_precision_peak(chip, m) for m in chips.low_precision_modes(chip)}
                 if chip is not None else None)
    stats = hlo_stats.analyze(compiled.as_text(), mesh.size, peak, bandwidth, granules, low_peaks)
    kernels = kernel_costs.price(stats.custom_calls, stats.custom_call_operands, model_cfg)
    kernel_rows = [dict(name=k.name, calls=k.calls, flops=k.flops, bytes=k.bytes,
                        seconds=k.seconds(peak, bandwidth) if peak and bandwidth else None) for k in kernels]
    roofline = None
    if peak and bandwidth:
        roofline = stats.roofline_s + sum(r["seconds"] for r in kernel_rows)
    net, ideal, axis_tiers = None, None, None
    if chip is not None:
        axis_tiers = tier_of_axes(mesh, devices_per_granule)
        ideal = network.ideal_bytes_by_tier(model_cfg, mesh, axis_tiers, chip, params_b)
        if roofline is not None:
            net = network.estimate(stats, kernel_rows, chip, roofline)
    return FitReport(
        model=dataclasses.asdict(model_cfg), mesh=dict(mesh.shape), num_devices=mesh.size, platform=platform,
        target=target, seq_len=seq_len, global_batch=global_batch, grad_accum=grad_accum, zero1=zero1,
        num_params=model_cfg.num_params(), compile_s=compile_s, compile_cpu_s=compile_cpu_s,
        params_bytes=params_b, opt_state_bytes=opt_b, other_arg_bytes=max(args_b - params_b - opt_b - frozen_b, 0),
        frozen_bytes=frozen_b,
        temp_bytes=temp_b, output_bytes=out_b, total_bytes=args_b + temp_b + out_b,
        min_state_bytes=(_full_bytes(abstract["params"]) + _full_bytes(abstract["opt_state"])) / mesh.size,
        flops_formula=_formula_flops(model_cfg, mesh, seq_len, global_batch, objective),
        objective=getattr(objective, "name", "causal_lm"), step_tokens=_tokens(
            model_cfg, mesh, seq_len, global_batch, objective),
        matmul_flops=stats.matmul_flops * mesh.size, kernel_flops=sum(k.flops for k in kernels) * mesh.size,
        bytes_accessed=stats.bytes_accessed + sum(k.bytes for k in kernels),
        collective_bytes=stats.collective_bytes, fsdp_ideal_bytes=fsdp_ideal_bytes(model_cfg, mesh),
        kernels=kernel_rows, unpriced_kernels=kernel_costs.unpriced(stats.custom_calls), roofline_s=roofline,
        xla_optimal_s=_xla_optimal_seconds(compiled), device_memory_gb=device_memory_gb,
        peak_tflops=peak_tflops, mfu=mfu, axis_tiers=axis_tiers, ideal_bytes_by_tier=ideal,
        collectives_by_tier=net.collectives_by_tier if net else (
            {network.tier_names(chip)[t]: b for t, b in stats.tier_bytes.items()} if chip else None),
        comm_s_by_tier=net.comm_s_by_tier if net else None,
        exposed_comm_s=net.exposed_comm_s if net else None, estimated_step_s=net.estimated_step_s if net else None,
        low_precision_gemms=stats.low_precision_gemms, low_precision_flops=stats.low_precision_flops,
        low_precision_peaks=low_peaks)


def _formula_flops(model_cfg, mesh, seq_len, global_batch, objective) -> float:
    if objective is None:
        return model_cfg.flops_per_token(seq_len) * global_batch * seq_len
    return objective.flops_per_step(_run_info(model_cfg, mesh, seq_len, global_batch))


def _tokens(model_cfg, mesh, seq_len, global_batch, objective) -> int | None:
    return None if objective is None else objective.tokens_per_step(_run_info(model_cfg, mesh, seq_len, global_batch))


# ----------------------------------------------------------------------------- report
def _gib(n: float) -> str:
    return f"{n / GIB:8.2f} GiB"


def _network_lines(r: FitReport) -> list:
    if r.collectives_by_tier is None:
        return []
    ideal = r.ideal_bytes_by_tier or {}
    parts = []
    for name, b in r.collectives_by_tier.items():
        part = f"{name} {b / GIB:.2f} GiB"
        if ideal.get(name):
            part += f" (ideal {ideal[name] / GIB:.2f}, {b / ideal[name]:.2f}x)"
        if r.comm_s_by_tier and name in r.comm_s_by_tier:
            part += f" = {r.comm_s_by_tier[name] * 1e3:.4g} ms"
        parts.append(part)
    axes = ", ".join(f"{a} {t}" for a, t in (r.axis_tiers or {}).items() if r.mesh.get(a, 1) > 1)
    lines = [f"networks per step and device: {'; '.join(parts) or 'no collectives'}"
             + (f" (mesh axes: {axes})" if axes else "")]
    if r.estimated_step_s and r.estimate_mfu():
        tps = r.tokens_per_sec(r.estimate_mfu())
        lines.append(f"estimated step time {r.estimated_step_s:.4g} s = compute {r.roofline_s:.4g} s + exposed "
                     f"communication {r.exposed_comm_s:.4g} s ({r.exposed_comm_s / r.estimated_step_s:.0%} of the "
                     f"step) -> {r.estimate_mfu():.1%} MFU, {tps / r.num_devices:,.0f} tokens/s per device "
                     f"({tps:,.0f} for the slice)")
    return lines


def format_report(r: FitReport, accelerator: str | None = None, train_tokens: float | None = None) -> str:
    m = r.model
    where = r.target or f"{r.num_devices} {r.platform} devices"
    lines = [
        f"model: {r.num_params / 1e9:.2f} B parameters ({m['num_layers']} layers, hidden {m['hidden_size']}, "
        f"ffn {m['intermediate_size']}, heads {m['num_heads']}/{m['num_kv_heads']}"
        + (f", {m['num_experts']} experts top-{m['num_experts_per_tok']}" if m.get("num_experts") else "")
        + f"; remat {m['remat_policy']}, attention {m['attention_impl']})"
        + (f"; LoRA rank {m['lora']['rank']} on {', '.join(m['lora']['targets'])}" if m.get("lora") else "")
        + (f"; objective {r.objective}" if r.objective != "causal_lm" else ""),
        f"target: {where}; mesh {r.mesh}; zero1 {'on' if r.zero1 else 'off'}",
        f"batch: {r.global_batch} x {r.seq_len} tokens per step (grad_accum {r.grad_accum})",
        f"compile: {r.compile_s:.1f} s ({r.compile_cpu_s:.1f} s CPU) on the {r.platform} compiler",
        "per device:",
        f"  parameters        {_gib(r.params_bytes)}",
        f"  optimizer state   {_gib(r.opt_state_bytes)}",
        *([f"  frozen reference  {_gib(r.frozen_bytes)}   (full DPO's second parameter tree)"] if r.frozen_bytes else []),
        f"  batch and scalars {_gib(r.other_arg_bytes)}",
        f"  temporaries       {_gib(r.temp_bytes)}   (activations, gradients, collective buffers)",
        f"  outputs           {_gib(r.output_bytes)}   (beyond the donated state)",
        f"  total             {_gib(r.total_bytes)}",
        f"  floor: (parameters + optimizer state) / {r.num_devices} devices = {_gib(r.min_state_bytes).strip()}; "
        f"state held per device is {(r.params_bytes + r.opt_state_bytes) / max(r.min_state_bytes, 1):.2f}x the floor",
        f"FLOPs per step: formula 6N+12LHQT {r.flops_formula:.3e}, compiled {r.flops_compiled:.3e} "
        f"(matmuls {r.matmul_flops:.3e} + kernels {r.kernel_flops:.3e}; ratio {r.flops_compiled / r.flops_formula:.2f})",
    ]
    if r.collective_bytes:
        kinds = ", ".join(f"{k} {v / GIB:.2f}" for k, v in sorted(r.collective_bytes.items()))
        total = sum(r.collective_bytes.values())
        ideal = (f"; FSDP ideal {r.fsdp_ideal_bytes / GIB:.2f} GiB ({total / r.fsdp_ideal_bytes:.2f}x)"
                 if r.fsdp_ideal_bytes else "")
        lines.append(f"collectives per step and device (GiB): {kinds}; total {total / GIB:.2f}{ideal}")
    for k in r.kernels:
        lines.append(f"kernel {k['name']}: {k['calls']:.0f} calls, {k['flops']:.3e} FLOPs, {k['bytes'] / GIB:.2f} GiB"
                     + (f", {k['seconds'] * 1e3:.3g} ms at the roofline" if k["seconds"] is not None else "")
                     + " per device (priced from its operands: the compiler cannot see inside)")
    if r.unpriced_kernels:
        lines.append(f"not priced (custom calls): {', '.join(r.unpriced_kernels)}")
    for mode, count in sorted((r.low_precision_gemms or {}).items()):
        peak = (r.low_precision_peaks or {}).get(mode)
        lines.append(f"{mode} matmuls: {count:,.0f} per step and device, {r.low_precision_flops[mode]:.3e} FLOPs"
                     + (f", priced at {peak / 1e12:g} TFLOP/s" if peak else ", priced at the bf16 peak (chip unknown)"))
    if r.roofline_s:
        est = r.estimated_mfu()
        tps = r.tokens_per_sec()
        lines.append(f"roofline step time {r.roofline_s:.4g} s -> at most {est:.1%} MFU, {tps / r.num_devices:,.0f} "
                     f"tokens/s per device ({tps:,.0f} for the slice); an upper bound that ranks choices"
                     + (f"; XLA's optimal_seconds {r.xla_optimal_s:.4g} s (loop bodies once)" if r.xla_optimal_s else ""))
    lines += _network_lines(r)
    if r.mfu and r.peak_tflops:
        tps = r.tokens_per_sec(r.mfu)
        lines.append(f"at {r.mfu:.0%} MFU of {r.peak_tflops:g} TFLOP/s per device: {tps:,.0f} tokens/s "
                     f"({tps / r.num_devices:,.0f} per device), {r.tokens_per_step / tps:.4g} s per step")
    if train_tokens:
        est_days = r.train_days(train_tokens)
        stated = r.train_days(train_tokens, r.mfu) if r.mfu else None
        parts = []
        if r.estimate_mfu():
            parts.append(f"{r.train_days(train_tokens, r.estimate_mfu()):,.3g} days at the estimate's "
                         f"{r.estimate_mfu():.1%} MFU")
        if est_days:
            parts.append(f"{est_days:,.3g} days at the bound's {r.estimated_mfu():.1%} MFU")
        if stated:
            parts.append(f"{stated:,.3g} days at {r.mfu:.0%} MFU")
        lines.append(f"plan: {train_tokens:.3g} tokens on {where}: " + " / ".join(parts))
    if r.fits is not None:
        what = f"{r.device_memory_gb:g} GB" + (f" ({accelerator})" if accelerator else "")
        need = r.total_bytes / 1e9
        if r.fits:
            lines.append(f"FITS: {need:.1f} GB of {what} per device ({need / r.device_memory_gb:.0%})")
        else:
            lines.append(f"DOES NOT FIT: needs {need:.1f} GB per device, the device has {what} "
                         f"(short by {need - r.device_memory_gb:.1f} GB). {fit_hint(r)}")
    return "\n".join(lines)


def fit_hint(r: FitReport) -> str:
    """The documented switch most likely to make a step fit, from where its memory goes."""
    state = r.params_bytes + r.opt_state_bytes
    floor_ratio = state / max(r.min_state_bytes, 1)
    if floor_ratio > 1.5 and r.mesh.get("fsdp", 1) < r.num_devices:
        return (f"The state is held {floor_ratio:.1f}x the floor: split it over more devices with FSDP "
                "(gin_configs/mesh/fsdp.gin or hsdp.gin).")
    if r.min_state_bytes > 0.7 * r.device_memory_gb * 1e9:
        return "The state alone nearly fills a device: use a larger slice or more slices (--target)."
    if r.model.get("remat_policy") != "full":
        return ("Activations dominate: remat 'full' (--gin_bindings=ModelConfig.remat_policy='full') "
                f"or more accumulation (--grad_accum={2 * r.grad_accum}).")
    return f"Activations dominate under full remat: more accumulation (--grad_accum={2 * r.grad_accum}) or a larger slice."
