"""Will it fit, and how fast could it go? Compile the real training step for a slice, on that
chip's own compiler, before paying for the hardware.

    python -m kinoe_jax.aot --gin_file=gin_configs/models/mistral_7b.gin \\
        --gin_file=gin_configs/mesh/fsdp.gin --target=v5p-16 --seq_len=4096 --global_batch=64 \\
        [--train_tokens=2e11]

`--target` names a slice (v5p-8, v5p-16, v5e-8, v6e-8, h100-8, h200-8, ...; kinoe_jax/hardware/chips.py):
TPU slices are compiled by libtpu, GPU nodes by the CUDA plugin's deviceless compiler, both
running on this machine without the hardware. `--num_devices=N` compiles for N simulated CPU
devices instead (the CPU compiler: parameters and optimizer state are exact, temporaries are a
guide only), and `--tpu_topology` takes a raw libtpu topology name.

The step of kinoe_jax.train is lowered against abstract shapes carrying the run's shardings, so
the model is never allocated. Reported per device:
- memory as the chip's compiler allocates it (arguments, temporaries, outputs);
- matmul FLOPs, memory traffic and the bytes of each collective kind, read from the compiled
  HLO with every loop body counted as often as it runs (kinoe_jax/planning/hlo_stats.py), plus the
  FLOPs and bytes of every Pallas / cuDNN kernel, which the HLO cannot show
  (kinoe_jax/planning/kernel_costs.py);
- a roofline time: each operation at max(FLOPs / peak, bytes / bandwidth), kernels included,
  collectives assumed hidden behind compute. It bounds the step time from below, so the MFU and
  tokens/s it implies are upper limits that rank choices, not predictions;
- XLA's own `optimal_seconds` where the compiler gives one, for reference (it counts a loop
  body once: the layer scan, and on TPU the collective matmuls FSDP becomes).
Beyond one slice or node (`--target=2xv5p-128`, `h100-64`) the collectives are split by the
network they cross, read from the compiled program's replica groups, and a step estimate adds
the communication compute cannot hide (docs/chips.md, "Step time beyond one slice").
`--train_tokens` adds the days to train that many tokens at the estimate and at `--mfu`.
Exit status 1 means "does not fit"; 2 a bad input (an unknown target, a mesh the devices cannot
take), with one line on stderr.

    python -m kinoe_jax.aot --plan --gin_file=gin_configs/models/kinoe_9b.gin --target=h100-64 \\
        --seq_len=4096 --global_batch=256 --train_tokens=1e12

compiles the candidate layouts (flat FSDP, HSDP, FSDP plus tensor inside a node) under the
model's remat and "full", and prints them ranked by the estimated step time
(kinoe_jax/planning/plan.py).

    python -m kinoe_jax.aot --price_hlo=step.hlo.txt --target=v6e-16 --tokens_per_step=524288 \\
        --gin_file=MODEL.gin --seq_len=8192

prices a compiled program's HLO text from anywhere with the same estimator (the model's gin
gives the FLOP formula) and writes the same JSON keys.
"""

from __future__ import annotations

import argparse
import os
import sys

import gin

from kinoe_jax.config import inputs as cli
from kinoe_jax.hardware import chips, runtime
from kinoe_jax.hardware.chips import CHIPS
from kinoe_jax.utils import atomic
from kinoe_jax.utils.errors import ConfigError

# Everything that loads JAX is imported inside the functions below, after runtime.setup(): the
# command line is checked, and simulated devices requested, before JAX starts.


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_file", action="append", default=[], help="model / mesh / run gin (repeatable)")
    parser.add_argument("--gin_bindings", action="append", default=[], help="gin binding (repeatable)")
    parser.add_argument("--target", default=None, help="slice to compile for: v5p-16, v5e-8, v6e-8, h100-8, ...")
    parser.add_argument("--num_devices", type=int, default=None,
                        help="compile for N simulated CPU devices instead (the CPU compiler)")
    parser.add_argument("--tpu_topology", default=None, help="raw libtpu topology name, e.g. v5p:4x4x4")
    parser.add_argument("--tpu_chip_config", default="megacore", help="libtpu chip config for --tpu_topology")
    parser.add_argument("--tpu_chips_per_host", default="2,2,1", help="chips per host bounds for --tpu_topology")
    parser.add_argument("--seq_len", type=int, default=None, help="default: DataConfig.seq_len from gin")
    parser.add_argument("--global_batch", type=int, default=None, help="default: DataConfig.global_batch from gin")
    parser.add_argument("--grad_accum", type=int, default=None, help="default: DataConfig.grad_accum from gin")
    parser.add_argument("--zero1", action="store_true", default=None, help="split optimizer state over data too")
    parser.add_argument("--accelerator", default=None, choices=sorted(CHIPS),
                        help="the chip whose peak and memory apply (default: the target's; h100 with --num_devices)")
    parser.add_argument("--device_memory_gb", type=float, default=None, help="memory per device (GB, 1e9 bytes)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="dense bf16 peak per device")
    parser.add_argument("--mfu", type=float, default=0.4, help="the MFU to state next to the estimate")
    parser.add_argument("--train_tokens", type=float, default=None, help="plan: days to train this many tokens")
    parser.add_argument("--objective", default="causal_lm", choices=("causal_lm", "dpo"),
                        help="the training objective whose step is compiled (dpo: global_batch counts pairs)")
    parser.add_argument("--json_out", default=None, help="also write the figures as JSON here")
    parser.add_argument("--plan", action="store_true", help="compile the candidate layouts x remat and rank them")
    parser.add_argument("--plan_layouts", default=None, help="--plan: these layouts only (comma-separated; "
                        "fsdp, hsdp, hsdp+tensor4)")
    parser.add_argument("--plan_remats", default=None, help="--plan: these remat policies (default: the model's, full)")
    parser.add_argument("--price_hlo", default=None, help="price this compiled HLO text instead of compiling")
    parser.add_argument("--tokens_per_step", type=int, default=None, help="with --price_hlo: tokens of the step")
    args = parser.parse_args(argv)
    if not args.gin_file:
        parser.error("at least one --gin_file is required (e.g. gin_configs/models/mistral_7b.gin)")
    if sum(x is not None for x in (args.target, args.num_devices, args.tpu_topology)) > 1:
        parser.error("give one of --target, --num_devices, --tpu_topology")
    cli.check_args(parser, args, {"--gin_file": cli.gin_file})

    tgt = None
    if args.target:
        try:  # an unknown name is named before anything starts
            tgt = chips.target(args.target)
        except chips.TargetError as e:
            cli.fail(parser, str(e))
    if args.price_hlo:
        if not tgt or not args.tokens_per_step:
            cli.fail(parser, "--price_hlo needs --target and --tokens_per_step")
        cli.check_args(parser, args, {"--price_hlo": cli.text_file})
    if args.num_devices and "jax" not in sys.modules:
        # Simulated devices must be requested before JAX starts its CPU backend.
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.num_devices}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    runtime.setup()
    from kinoe_jax.config.gin_io import load_gin  # noqa: PLC0415
    from kinoe_jax.data.pipeline import DataConfig  # noqa: PLC0415
    from kinoe_jax.models import ModelConfig  # noqa: PLC0415
    from kinoe_jax.parallel.mesh import make_mesh  # noqa: PLC0415
    from kinoe_jax.planning.fit import check_shapes, fit_report, format_report  # noqa: PLC0415
    from kinoe_jax.training import loop  # noqa: F401, PLC0415 (registers train.* for run gin files)

    with cli.reported(parser, ConfigError):
        load_gin(args.gin_file, args.gin_bindings)
    model_cfg = ModelConfig()
    data = DataConfig()
    seq_len = args.seq_len or data.seq_len
    try:
        if args.tpu_topology:
            family = args.tpu_topology.split(":")[0]
            if family not in chips.CHIPS:
                raise chips.TargetError(f"--tpu_topology={args.tpu_topology}: unknown chip {family!r}")
            bounds = tuple(int(x) for x in args.tpu_chips_per_host.split(","))
            tgt = chips.Target(args.tpu_topology, chips.CHIPS[family], "tpu", -1, args.tpu_topology,
                               args.tpu_chip_config, bounds)
        if tgt is not None:
            check_shapes(model_cfg, seq_len, tgt.platform)
            devices = tgt.devices()
        else:
            devices = _cpu_devices(args.num_devices)
    except (chips.TargetError, ValueError) as e:
        cli.fail(parser, str(e).splitlines()[0])
    chip = CHIPS[args.accelerator] if args.accelerator else (tgt.chip if tgt else CHIPS["h100"])
    global_batch = args.global_batch or data.global_batch
    per_granule = _gin_value("make_mesh.devices_per_granule", None)
    if args.price_hlo:
        from kinoe_jax.planning.price import price_hlo  # noqa: PLC0415

        report = price_hlo(args.price_hlo, model_cfg, tgt, seq_len, args.tokens_per_step, mfu=args.mfu)
        print(format_report(report, accelerator=chip.name, train_tokens=args.train_tokens), flush=True)
        _write_json(args.json_out, report.as_dict())
        return 0
    if args.plan:
        return _plan(parser, args, model_cfg, devices, chip, tgt, seq_len, global_batch, data, per_granule)
    try:
        mesh = make_mesh(devices=devices)
    except ValueError as e:  # sizes that do not match the devices or their slices / hosts
        cli.fail(parser, str(e).splitlines()[0])
    try:
        report = fit_report(
            model_cfg, mesh, seq_len=seq_len, global_batch=global_batch,
            grad_accum=args.grad_accum or data.grad_accum, zero1=_zero1_from_gin() if args.zero1 is None else True,
            device_memory_gb=args.device_memory_gb or chip.memory_gb,
            peak_tflops=args.peak_tflops or chip.peak_tflops, hbm_gbps=chip.hbm_gbps, mfu=args.mfu,
            target=tgt.describe() if tgt else None, objective=_objective(args.objective), chip=chip,
            devices_per_granule=per_granule)
    except Exception as e:  # noqa: BLE001 - the TPU compiler refuses a program that cannot fit
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        message = next((line for line in str(e).splitlines() if "RESOURCE_EXHAUSTED" in line), str(e))
        print(f"DOES NOT FIT: the {mesh.devices.flat[0].platform} compiler refused the step: {message.strip()}")
        _write_json(args.json_out, dict(fits=False, compiler_error=message.strip(), num_devices=mesh.size,
                                        target=tgt.describe() if tgt else None, seq_len=seq_len,
                                        global_batch=global_batch, mesh=dict(mesh.shape)))
        return 1
    print(format_report(report, accelerator=chip.name, train_tokens=args.train_tokens), flush=True)
    _write_json(args.json_out, report.as_dict())
    return 0 if report.fits is not False else 1


def _plan(parser, args, model_cfg, devices, chip, tgt, seq_len, global_batch, data, per_granule) -> int:
    from kinoe_jax.planning import plan  # noqa: PLC0415

    where = tgt.describe() if tgt else f"{len(devices)} devices"
    print(f"plan: {where}; {global_batch} x {seq_len} tokens per step", flush=True)
    ranked = plan.run(model_cfg, devices, chip, seq_len, global_batch, grad_accum=args.grad_accum or data.grad_accum,
                      zero1=bool(args.zero1), target=tgt.describe() if tgt else None,
                      objective=_objective(args.objective), devices_per_granule=per_granule,
                      device_memory_gb=args.device_memory_gb, layouts=_names(parser, args.plan_layouts, plan.LAYOUTS),
                      remats=_names(parser, args.plan_remats, None))
    status, line = plan.verdict(ranked)
    if status == 2:
        cli.fail(parser, line)
    print(plan.format_table(ranked, args.train_tokens), flush=True)
    print(line, flush=True)
    _write_json(args.json_out, {"target": where, "seq_len": seq_len, "global_batch": global_batch,
                                "candidates": [c.row() for c in ranked]})
    return status


def _names(parser, text, known):
    if not text:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if known is not None and n not in known]
    if bad:
        cli.fail(parser, f"unknown plan layout(s) {bad}; known: {', '.join(known)}")
    return names


def _write_json(path, figures: dict) -> None:
    if path:
        atomic.write_json(path, figures, indent=1, default=str)


def _objective(name: str):
    from kinoe_jax.training.objectives import DPO, CausalLM  # noqa: PLC0415

    return {"causal_lm": CausalLM, "dpo": DPO}[name]()


def _cpu_devices(num_devices):
    import jax  # noqa: PLC0415

    devices = jax.devices()
    n = num_devices or len(devices)
    if len(devices) < n:
        raise SystemExit(f"--num_devices={n} but only {len(devices)} devices exist: set it before JAX starts "
                         f"(run `python -m kinoe_jax.aot` as its own process)")
    return devices[:n]


def _zero1_from_gin() -> bool:
    return bool(_gin_value("train.zero1", False))


def _gin_value(name: str, default):
    try:
        return gin.query_parameter(name)
    except ValueError:
        return default


if __name__ == "__main__":
    sys.exit(main())
