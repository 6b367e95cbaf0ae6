"""Price a compiled step's HLO text from anywhere (another framework's program, a saved dump)
with the fit check's own estimator: `python -m kinoe_jax.aot --price_hlo=FILE`.

The program's partitions are taken as the target's devices in order, a granule (slice or host)
being each run of devices the target puts on one fast network. The model's gin gives the FLOP
formula the MFU is stated against; memory is not read (the text does not say how the runtime
lays out buffers), so the report says nothing about fitting.
"""

from __future__ import annotations

import dataclasses

from kinoe_jax.planning import hlo_stats, kernel_costs, network
from kinoe_jax.planning.fit import FitReport


def price_hlo(path: str, model_cfg, tgt, seq_len: int, tokens_per_step: int, mfu: float | None = None) -> FitReport:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    chip, n = tgt.chip, tgt.num_devices
    per_granule = n // max(tgt.granules, 1)
    granules = [i // per_granule for i in range(n)]
    peak, bandwidth = chip.peak_tflops * 1e12, chip.hbm_gbps * 1e9
    stats = hlo_stats.analyze(text, n, peak, bandwidth, granules)
    kernels = kernel_costs.price(stats.custom_calls, stats.custom_call_operands, model_cfg)
    rows = [{"name": k.name, "calls": k.calls, "flops": k.flops, "bytes": k.bytes,
             "seconds": k.seconds(peak, bandwidth)} for k in kernels]
    roofline = stats.roofline_s + sum(r["seconds"] for r in rows)
    net = network.estimate(stats, rows, chip, roofline)
    return FitReport(
        model=dataclasses.asdict(model_cfg), mesh={"devices": n}, num_devices=n, platform=tgt.platform,
        target=f"{tgt.describe()}; priced from {path}", seq_len=seq_len, global_batch=tokens_per_step // seq_len,
        grad_accum=1, zero1=False, num_params=model_cfg.num_params(), compile_s=0.0, compile_cpu_s=0.0,
        params_bytes=0, opt_state_bytes=0, other_arg_bytes=0, temp_bytes=0, output_bytes=0, total_bytes=0,
        min_state_bytes=0.0, flops_formula=model_cfg.flops_per_token(seq_len) * tokens_per_step,
        matmul_flops=stats.matmul_flops * n, kernel_flops=sum(k.flops for k in kernels) * n,
        bytes_accessed=stats.bytes_accessed + sum(k.bytes for k in kernels),
        collective_bytes=stats.collective_bytes, fsdp_ideal_bytes=None, kernels=rows,
        unpriced_kernels=kernel_costs.unpriced(stats.custom_calls), roofline_s=roofline, xla_optimal_s=None,
        peak_tflops=chip.peak_tflops, mfu=mfu, step_tokens=tokens_per_step,
        collectives_by_tier=net.collectives_by_tier, comm_s_by_tier=net.comm_s_by_tier,
        exposed_comm_s=net.exposed_comm_s, estimated_step_s=net.estimated_step_s)
