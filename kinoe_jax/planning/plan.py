"""A plan, not just a check: compile the candidate layouts and remat choices of one model, batch
and slice, and rank them by the estimated step time (`python -m kinoe_jax.aot --plan`).

Candidates: flat FSDP over every device, HSDP (FSDP inside each slice or host, data across),
and FSDP with tensor parallelism inside a slice or host; each under the model's remat policy and
under "full". A candidate the compiler refuses for memory does not fit; one it refuses for any
other reason is reported with its reason, and when every candidate fails that way the plan is
an error (the shapes or the target are wrong, not the memory).
"""

from __future__ import annotations

import dataclasses

from kinoe_jax.parallel.mesh import make_mesh
from kinoe_jax.planning.fit import GIB, fit_report

LAYOUTS = {  # name: make_mesh arguments (all given, so no mesh gin binding leaks in)
    "fsdp": {"data": 1, "fsdp": -1, "tensor": 1, "expert": 1, "outer_data": None, "outer_fsdp": 1},
    "hsdp": {"data": -1, "fsdp": "inner", "tensor": 1, "expert": 1, "outer_data": None, "outer_fsdp": 1},
    "hsdp+tensor4": {"data": -1, "fsdp": "inner", "tensor": 4, "expert": 1, "outer_data": None, "outer_fsdp": 1},
}


@dataclasses.dataclass
class Candidate:
    layout: str
    remat: str
    report: object = None  # FitReport
    error: str | None = None  # the compiler's refusal (memory) or another failure
    out_of_memory: bool = False

    @property
    def fits(self) -> bool:
        return self.report is not None and self.report.fits is not False

    def row(self) -> dict:
        r = self.report
        out = {"layout": self.layout, "remat": self.remat, "fits": self.fits, "error": self.error}
        if r is not None:
            out.update(gib_per_device=r.total_bytes / GIB, mesh=r.mesh, collectives_by_tier=r.collectives_by_tier,
                       ideal_bytes_by_tier=r.ideal_bytes_by_tier, estimated_step_s=r.estimated_step_s,
                       roofline_s=r.roofline_s, estimate_mfu=r.estimate_mfu(), bound_mfu=r.estimated_mfu(),
                       tokens_per_sec=r.tokens_per_sec(r.estimate_mfu()) if r.estimate_mfu() else None)
        return out


def candidates(model_cfg, devices, layouts=None, remats=None) -> list:
    remats = remats or list(dict.fromkeys([model_cfg.remat_policy, "full"]))
    out = []
    for name in layouts or LAYOUTS:
        for remat in remats:
            out.append(Candidate(name, remat))
    return out


def run(model_cfg, devices, chip, seq_len: int, global_batch: int, grad_accum: int = 1, zero1: bool = False,
        target: str | None = None, objective=None, devices_per_granule=None, layouts=None, remats=None,
        device_memory_gb: float | None = None, log=print) -> list:
    """Every candidate compiled, best first: fitting ones by estimated step time, then the rest."""
    found, seen = [], set()
    for c in candidates(model_cfg, devices, layouts, remats):
        try:
            mesh = make_mesh(devices=devices, devices_per_granule=devices_per_granule, **LAYOUTS[c.layout])
        except ValueError as e:
            c.error = str(e).splitlines()[0]
            found.append(c)
            continue
        same = (tuple(mesh.shape.items()), tuple(d.id for d in mesh.devices.flat), c.remat)
        if same in seen:  # one slice or host: HSDP is FSDP
            continue
        seen.add(same)
        cfg = dataclasses.replace(model_cfg, remat_policy=c.remat)
        try:
            c.report = fit_report(cfg, mesh, seq_len=seq_len, global_batch=global_batch, grad_accum=grad_accum,
                                  zero1=zero1, device_memory_gb=device_memory_gb or chip.memory_gb, peak_tflops=chip.peak_tflops,
                                  hbm_gbps=chip.hbm_gbps, target=target, objective=objective, chip=chip,
                                  devices_per_granule=devices_per_granule)
        except Exception as e:  # noqa: BLE001 - the compiler's refusal is a row of the table
            text = str(e)
            c.out_of_memory = "RESOURCE_EXHAUSTED" in text
            c.error = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)[:300]
        log(f"  compiled {c.layout} / remat {c.remat}: " + (
            f"{c.report.total_bytes / GIB:.1f} GiB per device" if c.report else f"failed ({c.error[:120]})"))
        found.append(c)

    def key(c):
        if c.fits:
            return (0, c.report.estimated_step_s or c.report.roofline_s or 0.0)
        if c.report is not None:
            return (1, c.report.total_bytes)
        return (2, 0.0)

    return sorted(found, key=key)


def format_table(ranked: list, train_tokens: float | None = None) -> str:
    names = []
    for c in ranked:
        for name in (c.report.collectives_by_tier or {}) if c.report else ():
            if name not in names:
                names.append(name)
    head = (f"{'rank':>4}  {'layout':<13} {'remat':<14} {'fits':<5} {'GiB/dev':>8} "
            + "".join(f"{n + ' GiB':>15}" for n in names)
            + f" {'step s':>9} {'tok/s/dev':>10} {'MFU est':>8} {'MFU bound':>9}"
            + (f" {'days':>8}" if train_tokens else ""))
    lines = [head]
    for i, c in enumerate(ranked, 1):
        r = c.report
        if r is None:
            why = "does not fit (compiler)" if c.out_of_memory else "failed"
            lines.append(f"{i:>4}  {c.layout:<13} {c.remat:<14} {why}: {c.error}")
            continue
        tiers = r.collectives_by_tier or {}
        mfu = r.estimate_mfu()
        tps = r.tokens_per_sec(mfu) if mfu else None
        days = r.train_days(train_tokens, mfu) if (train_tokens and mfu) else None
        lines.append(
            f"{i:>4}  {c.layout:<13} {c.remat:<14} {'yes' if c.fits else 'NO':<5} {r.total_bytes / GIB:>8.1f} "
            + "".join(f"{tiers.get(n, 0.0) / GIB:>15.2f}" for n in names)
            + f" {r.estimated_step_s or float('nan'):>9.4g} {(tps or 0) / r.num_devices:>10,.0f}"
            + f" {mfu or 0:>8.1%} {r.estimated_mfu() or 0:>9.1%}"
            + (f" {days:>8.3g}" if train_tokens and days else ("" if not train_tokens else f" {'-':>8}")))
    return "\n".join(lines)


def verdict(ranked: list) -> tuple[int, str]:
    """(exit status, line): 0 and the best, 1 and the closest when nothing fits, 2 when every
    candidate failed for a reason other than memory."""
    if not ranked:
        return 2, "no candidate layouts for this target"
    if all(c.report is None and not c.out_of_memory for c in ranked):
        return 2, f"every candidate failed to compile: {ranked[0].layout} / {ranked[0].remat}: {ranked[0].error}"
    best = ranked[0]
    if best.fits:
        return 0, (f"best: {best.layout} with remat {best.remat}: {best.report.estimated_step_s:.4g} s per step "
                   f"(estimate), {best.report.total_bytes / GIB:.1f} GiB per device")
    closest = next((c for c in ranked if c.report is not None), None)
    if closest is None:
        return 1, f"NOTHING FITS: the compiler refused every candidate for memory ({ranked[0].error})"
    r = closest.report
    return 1, (f"NOTHING FITS: the closest is {closest.layout} with remat {closest.remat} at "
               f"{r.total_bytes / 1e9:.1f} GB per device of {r.device_memory_gb:g} GB")
