"""Ahead-of-time GPU readiness report, no GPU needed.

Compiles every kernel configuration for sm_80 (A100) and sm_90 (H100) with Triton's
own compiler, then reads the cubins with the ``cuobjdump`` / ``nvdisasm`` that ship in
the Triton wheel:

    registers per thread, stack/local bytes and spill instructions (LDL/STL),
    shared memory per program, and the tensor-core instruction family in the SASS
    (HGMMA = Hopper warpgroup MMA; HMMA = Ampere-style mma.sync), and the number of
    asynchronous global->shared copies (LDGSTS / UTMALDG: the loads are pipelined).

    python -m kvlock_kernels.tools.gpu_report                 # default configs
    python -m kvlock_kernels.tools.gpu_report --all           # every dtype, head dim and config

Exits 1 when any config spills or needs more shared memory than the device has.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

# Max dynamic shared memory per block (opt-in), bytes.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_HEAD_DIMS = (64, 128)
ALL_HEAD_DIMS = (64, 72, 80, 96, 128, 256)


@dataclass
class Report:
    kernel: str
    arch: int
    dtype: str
    head_dim: int
    config: str
    registers: int
    stack_bytes: int
    spill_instructions: int
    shared_bytes: int
    mma: str
    async_copies: int
    ok: bool
    problem: str = ""


def _bin(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _attention_job(arch, dtype_name, head_dim, config, has_lock=True, store_lse=True):
    from ..attention.kv_lock_attention import _kv_lock_attn_fwd, kernel_constexprs
    bm, bn, warps, stages = config
    const = kernel_constexprs(DTYPE_NAMES[dtype_name], head_dim, has_lock=has_lock, store_lse=store_lse)
    const.update(BLOCK_M=bm, BLOCK_N=bn)
    ptr = "*" + dtype_name
    types = {n: ptr for n in ("Q", "K", "V", "KS", "VS", "OUT")}
    types.update(LOCK="*fp32", LSE="*fp32", qk_scale_log2="fp32")
    return dict(fn=_kv_lock_attn_fwd, const=const, types=types, warps=warps, stages=stages,
                pointers=("Q", "K", "V", "KS", "VS", "LOCK", "OUT", "LSE"), unit_strides=("stride_locks",),
                config=f"M{bm}/N{bn}/w{warps}/s{stages}")


def _merge_job(arch, dtype_name, head_dim, config):
    import triton

    from ..attention.merge_attention_states import _merge_states_kernel
    block_s, warps = config
    const = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                 BLOCK_S=block_s, INTERPRET=False)
    ptr = "*" + dtype_name
    types = dict(OA=ptr, OB=ptr, OUT=ptr, LA="*fp32", LB="*fp32", LOUT="*fp32")
    return dict(fn=_merge_states_kernel, const=const, types=types, warps=warps, stages=1,
                pointers=tuple(types), config=f"S{block_s}/w{warps}")


def _branch_variance_job(arch, dtype_name, head_dim, config):
    from ..control.branch_variance import _branch_variance_kernel
    block, warps = config
    types = dict(X="*" + dtype_name, MASK="*u8", VAR="*fp32", PART_SUM="*fp32", PART_CNT="*fp32",
                 inv_preds="fp32", inv_dof="fp32", inv_channels="fp32")
    return dict(fn=_branch_variance_kernel, const=dict(HAS_MASK=True, BLOCK=block), types=types, warps=warps,
                stages=1, pointers=("X", "MASK", "VAR", "PART_SUM", "PART_CNT"), config=f"B{block}/w{warps}")


def _cfg_zero_star_job(arch, dtype_name, head_dim, config):
    from ..control.cfg_zero_star_scale import _dot_and_norm_kernel
    block, warps = config
    types = dict(VC="*" + dtype_name, VU="*" + dtype_name, PART_DOT="*fp32", PART_NORM="*fp32")
    return dict(fn=_dot_and_norm_kernel, const=dict(BLOCK=block), types=types, warps=warps, stages=1,
                pointers=tuple(types), config=f"B{block}/w{warps}")


def _guidance_job(arch, dtype_name, head_dim, config):
    from ..control.kvlock_guidance import _guidance_kernel
    block, warps = config
    ptr = "*" + dtype_name
    types = dict(VC=ptr, VU=ptr, LAT=ptr, GUIDED=ptr, X0=ptr, OMEGA_PTR="*fp32", S_PTR="*fp32",
                 SIGMA_PTR="*fp32", omega_value="fp32", sigma_value="fp32")
    const = dict(OMEGA_IS_TENSOR=True, HAS_S=True, SIGMA_IS_TENSOR=True, WITH_X0=True, BLOCK=block,
                 INTERPRET=False)
    return dict(fn=_guidance_kernel, const=const, types=types, warps=warps, stages=1,
                pointers=("VC", "VU", "LAT", "GUIDED", "X0", "OMEGA_PTR", "S_PTR", "SIGMA_PTR"),
                config=f"B{block}/w{warps}")


JOB_BUILDERS = {
    "kv_lock_attention": _attention_job,
    "merge_attention_states": _merge_job,
    "branch_variance": _branch_variance_job,
    "cfg_zero_star_scale": _cfg_zero_star_job,
    "kvlock_guidance": _guidance_job,
}


def compile_and_read(kernel, arch, dtype_name, head_dim, config) -> Report:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    job = JOB_BUILDERS[kernel](arch, dtype_name, head_dim, config)
    fn = job["fn"]
    const = dict(job["const"], **{n: 1 for n in job.get("unit_strides", ())})
    signature = {n: ("constexpr" if n in const else job["types"].get(n, "i32")) for n in fn.arg_names}
    # Specialise as the JIT does for a contiguous (B, S, H, D) launch: tensors from torch
    # allocations are 16-byte aligned, batch and sequence strides are multiples of 16
    # (even head counts), head strides when D is, and unit strides become constants.
    # Without the stride hints loads cannot be vectorised, so no cp.async pipelining.
    divisible = list(job["pointers"]) + [
        n for n in fn.arg_names if n.startswith("stride_") and n not in job.get("unit_strides", ())
        and (not n.endswith("h") or head_dim % 16 == 0)]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    compiled = triton.compile(ASTSource(fn, signature, const, attrs), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=job["warps"], num_stages=job["stages"],
                                           enable_fp_fusion=True))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_bin("nvdisasm"), f.name], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    spills = len(re.findall(r"\b(?:LDL|STL)\b", sass))
    static_shared = int(re.search(r"SHARED:(\d+)", usage).group(1))
    shared = compiled.metadata.shared + static_shared
    ops = Counter(re.findall(r"\b(HGMMA|HMMA)\b", sass))
    async_copies = len(re.findall(r"\b(?:LDGSTS|UTMALDG)\b", sass))
    mma = "+".join(sorted(ops)) or "none"
    problems = []
    if stack or local or spills:
        problems.append(f"spills ({stack + local} B stack/local, {spills} LDL/STL)")
    if shared > SHARED_LIMIT[arch]:
        problems.append(f"shared {shared} B > {SHARED_LIMIT[arch]} B")
    return Report(kernel, arch, dtype_name, head_dim, job["config"], regs, stack + local, spills,
                  shared, mma, async_copies, not problems, "; ".join(problems))


def default_jobs(all_configs: bool = False, archs=(80, 90)):
    import sys

    from ..attention.kv_lock_attention import configs_for_head_dim
    # Modules, not the op functions of the same names that the packages export.
    merge_attention_states, branch_variance, cfg_zero_star_scale, kvlock_guidance = (
        sys.modules[f"kvlock_kernels.{m}"] for m in ("attention.merge_attention_states", "control.branch_variance",
                                                      "control.cfg_zero_star_scale", "control.kvlock_guidance"))
    dtypes = ("bf16", "fp16") if all_configs else ("bf16",)
    head_dims = ALL_HEAD_DIMS if all_configs else DEFAULT_HEAD_DIMS
    jobs = []
    for arch in archs:
        for dt in dtypes:
            for d in head_dims:
                for cfg in configs_for_head_dim(d, arch, aligned=d % 16 == 0):
                    jobs.append(("kv_lock_attention", arch, dt, d, cfg))
            jobs.append(("merge_attention_states", arch, dt, 128, merge_attention_states.LAUNCH_CONFIG))
            # Elementwise / reduction kernels: no head dim (reported as 0).
            jobs.append(("branch_variance", arch, dt, 0, branch_variance.LAUNCH_CONFIG))
            jobs.append(("cfg_zero_star_scale", arch, dt, 0, cfg_zero_star_scale.LAUNCH_CONFIG))
            jobs.append(("kvlock_guidance", arch, dt, 0, kvlock_guidance.LAUNCH_CONFIG))
    return jobs


def _run(job):
    return compile_and_read(*job)


def format_table(reports) -> str:
    head = "| kernel | arch | dtype | D | config | regs | spill B | LDL/STL | shared B | MMA | cp.async/TMA | ok |"
    lines = [head, "|" + "---|" * 12]
    for r in reports:
        lines.append(f"| {r.kernel} | sm_{r.arch} | {r.dtype} | {r.head_dim} | {r.config} | {r.registers} | "
                     f"{r.stack_bytes} | {r.spill_instructions} | {r.shared_bytes} | {r.mma} | {r.async_copies} | "
                     f"{'yes' if r.ok else 'NO: ' + r.problem} |")
    return "\n".join(lines)


def run(jobs, workers: int | None = None):
    """Compile jobs in fresh worker processes.  Workers never run under the Triton
    interpreter (its kernels cannot be compiled), whatever this process uses."""
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(_run, jobs))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvlock_kernels.tools.gpu_report", description=__doc__.split("\n")[0])
    ap.add_argument("--all", action="store_true", help="every dtype, head dim and autotune config")
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT))
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args(argv)
    reports = run(default_jobs(args.all, tuple(args.arch)), args.workers)
    print(format_table(reports))
    bad = [r for r in reports if not r.ok]
    print(f"\n{len(reports) - len(bad)}/{len(reports)} configs ok" + (f"; {len(bad)} failing" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
