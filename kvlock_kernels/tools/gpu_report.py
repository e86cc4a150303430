"""Ahead-of-time GPU readiness report, no GPU needed.

Compiles kernel configurations for sm_80 (A100) and sm_90 (H100) with Triton's own
compiler, then reads the cubins with the ``cuobjdump`` / ``nvdisasm`` that ship in the
Triton wheel.  Per compiled kernel:

- registers per thread, stack/local bytes and spill instructions (LDL/STL), shared memory
  per program;
- the tensor-core instruction family (HGMMA = Hopper warpgroup MMA, HMMA = mma.sync) and
  the asynchronous global->shared copies (LDGSTS = cp.async, UTMALDG = TMA) in the kernel;
- the main loop: the backward branch whose body holds the most tensor-core instructions
  (else the longest one), and in its body, i.e. per loop iteration: SASS instructions,
  tensor-core instructions (for the attention kernel: per KV block) and their FLOPs
  (against the block's useful FLOPs when the builder gives them: duplicated work is a
  problem), async copies, synchronous global loads (LDG), wgmma waits
  (WARPGROUP.DEPBAR, with their depths) and cp.async waits (DEPBAR).

    python -m kvlock_kernels.tools.gpu_report                 # default configs
    python -m kvlock_kernels.tools.gpu_report --all           # fp16, bf16, fp32, every head dim and config
    python -m kvlock_kernels.tools.gpu_report --kernels kv_lock_attention --arch 90

Exits 1 when any config spills, needs more shared memory than the device has, or fails
to build.

Job protocol: a kernel module may define ``gpu_report_jobs(arch, all_configs)`` returning
picklable ``(kernel_name, module_name, builder_name, arch, dtype_name, head_dim, config)``
tuples; each worker imports ``module_name`` and calls
``getattr(module, builder_name)(arch, dtype_name, head_dim, config)``, which returns a dict
with ``fn`` (the @triton.jit function), ``const`` (constexprs), ``types`` (signature types
of the non-i32 arguments), ``warps``, ``stages``, ``pointers`` (16-byte aligned pointer
arguments), ``unit_strides`` (arguments specialised to 1) and ``config`` (a label); optional:
``variant`` (e.g. "plain" / "locked") and ``classes`` (which block classes that variant
serves), ``divisible`` (the integer arguments that are multiples of 16; default: every
``stride_*`` argument), ``block_flops`` (the useful tensor-core FLOPs of one main-loop
iteration: more in the SASS means work duplicated across warps, reported as a problem).
A module may also define ``GPU_REPORT_NOTES`` (strings printed under the table, e.g. why
a dtype has no configs).  ``KERNEL_MODULES`` lists the modules asked; modules that do
not exist (yet) or do not define ``gpu_report_jobs`` are skipped.
"""
from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import traceback
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

# Max dynamic shared memory per block (opt-in), bytes.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
ALL_HEAD_DIMS = (64, 72, 80, 96, 128, 256)

# The kernel modules asked for jobs, in report order.
KERNEL_MODULES = (
    "kvlock_kernels.attention.kv_lock_attention",
    "kvlock_kernels.attention.merge_attention_states",
    "kvlock_kernels.attention.lock_kv",
    "kvlock_kernels.attention.epilogue",
    "kvlock_kernels.control.branch_variance",
    "kvlock_kernels.control.cfg_zero_star_scale",
    "kvlock_kernels.control.kvlock_guidance",
)


@dataclass
class Report:
    kernel: str
    arch: int
    dtype: str
    head_dim: int
    config: str
    variant: str = ""
    classes: str = ""
    registers: int = 0
    stack_bytes: int = 0
    spill_instructions: int = 0
    shared_bytes: int = 0
    mma: str = "none"
    mma_total: int = 0
    async_copies: int = 0
    loop_found: bool = False
    loop_instructions: int = 0
    loop_mma: int = 0
    loop_mma_flops: int = 0
    block_flops: int = 0
    loop_async_copies: int = 0
    loop_sync_loads: int = 0
    loop_mma_waits: int = 0
    loop_mma_wait_depths: list = field(default_factory=list)
    loop_copy_waits: int = 0
    ok: bool = False
    problem: str = ""


def _bin(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


# --------------------------------------------------------------------------------------
# SASS analysis
# --------------------------------------------------------------------------------------
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b[^`]*`\(?(\.L_x_\d+)\)?")
_MMA = re.compile(r"\b(HGMMA|HMMA)\b")
_ASYNC = re.compile(r"\b(?:LDGSTS|UTMALDG)\b")


def parse_sass(sass: str):
    """-> (instructions [(addr, text)], labels {name: addr of the next instruction})."""
    instrs, labels, pending = [], {}, []
    for line in sass.splitlines():
        lab = _LABEL.match(line)
        if lab:
            pending.append(lab.group(1))
            continue
        ins = _INSTR.search(line)
        if ins:
            addr = int(ins.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            instrs.append((addr, ins.group(2)))
    return instrs, labels


def main_loop(instrs, labels):
    """The body [first, last] of the main loop: among backward branches, the one whose
    body holds the most tensor-core instructions, then the longest.  None if no loop."""
    best = None
    for i, (addr, text) in enumerate(instrs):
        br = _BRANCH.search(text)
        if not br or br.group(1) not in labels or labels[br.group(1)] > addr:
            continue
        start = labels[br.group(1)]
        body = [t for a, t in instrs[:i + 1] if a >= start]
        if len(body) < 2:  # `.L: BRA .L`, the trap after EXIT
            continue
        key = (sum(bool(_MMA.search(t)) for t in body), len(body))
        if best is None or key > best[0]:
            best = (key, body)
    return None if best is None else best[1]


def mma_flops(text: str, warps: int) -> int:
    """FLOPs of one tensor-core instruction line for the whole CTA: HGMMA.MxNxK is issued
    per warpgroup, HMMA.MNK (e.g. 16816 = m16 n8 k16) per warp."""
    m = re.search(r"\bHGMMA\.(\d+)x(\d+)x(\d+)", text)
    if m:
        return 2 * int(m.group(1)) * int(m.group(2)) * int(m.group(3)) * max(1, warps // 4)
    m = re.search(r"\bHMMA\.(16)(8)(\d+)", text)
    if m:
        return 2 * 16 * 8 * int(m.group(3)) * warps
    return 0


def analyse_sass(sass: str, warps: int = 4) -> dict:
    instrs, labels = parse_sass(sass)
    texts = [t for _, t in instrs]
    ops = Counter(m.group(1) for t in texts for m in [_MMA.search(t)] if m)
    out = dict(mma="+".join(sorted(ops)) or "none", mma_total=sum(ops.values()),
               async_copies=sum(bool(_ASYNC.search(t)) for t in texts),
               spill_instructions=sum(bool(re.search(r"\b(?:LDL|STL)\b", t)) for t in texts), loop_found=False)
    body = main_loop(instrs, labels)
    if body is not None:
        waits = (re.search(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*(0x[0-9a-f]+)", t) for t in body)
        depths = [int(m.group(1), 16) for m in waits if m]
        out.update(loop_found=True, loop_instructions=len(body),
                   loop_mma=sum(bool(_MMA.search(t)) for t in body),
                   loop_mma_flops=sum(mma_flops(t, warps) for t in body),
                   loop_async_copies=sum(bool(_ASYNC.search(t)) for t in body),
                   loop_sync_loads=sum(bool(re.search(r"\bLDG\.", t)) for t in body),
                   loop_mma_waits=len(depths), loop_mma_wait_depths=depths,
                   loop_copy_waits=sum(bool(re.search(r"(?<!WARPGROUP\.)\bDEPBAR\.LE\s+SB", t)) for t in body))
    return out


# --------------------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------------------
def build_spec(job) -> dict:
    _, module_name, builder_name, arch, dtype_name, head_dim, config = job
    module = importlib.import_module(module_name)
    return getattr(module, builder_name)(arch, dtype_name, head_dim, config)


def compile_spec(spec: dict, arch: int):
    """-> (compiled kernel, cuobjdump resource usage text, nvdisasm SASS text)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec["fn"]
    unit = tuple(spec.get("unit_strides", ()))
    const = dict(spec["const"], **{n: 1 for n in unit})
    signature = {n: ("constexpr" if n in const else spec["types"].get(n, "i32")) for n in fn.arg_names}
    # Specialise as the JIT does for tensors from torch allocations: 16-byte aligned
    # pointers, integer arguments that are multiples of 16 marked divisible (strides by
    # default), unit strides as constants.  Without these hints loads are not vectorised,
    # hence not asynchronous copies.
    divisible = spec.get("divisible")
    if divisible is None:
        divisible = [n for n in fn.arg_names if n.startswith("stride_") and n not in unit]
    divisible = [n for n in (*spec["pointers"], *divisible) if n not in const]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    compiled = triton.compile(ASTSource(fn, signature, const, attrs), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=spec["warps"], num_stages=spec["stages"],
                                           enable_fp_fusion=True))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_bin("nvdisasm"), f.name], capture_output=True, text=True, check=True).stdout
    return compiled, usage, sass


def compile_and_read(job) -> Report:
    kernel, _, _, arch, dtype_name, head_dim, config = job
    try:
        spec = build_spec(job)
        compiled, usage, sass = compile_spec(spec, arch)
    except Exception as exc:  # a kernel that does not build is a finding, not a crash
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return Report(kernel, arch, dtype_name, head_dim, str(config), ok=False, problem=f"build failed: {last[:300]}")
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    static_shared = int(re.search(r"SHARED:(\d+)", usage).group(1))
    shared = compiled.metadata.shared + static_shared
    stats = analyse_sass(sass, spec["warps"])
    block_flops = int(spec.get("block_flops", 0))
    problems = []
    if stack or local or stats["spill_instructions"]:
        problems.append(f"spills ({stack + local} B stack/local, {stats['spill_instructions']} LDL/STL)")
    if block_flops and stats.get("loop_mma_flops", 0) > block_flops:
        problems.append(f"tensor-core work duplicated across warps ({stats['loop_mma_flops'] / block_flops:.2f}x "
                        "the block's FLOPs per loop iteration)")
    if shared > SHARED_LIMIT[arch]:
        problems.append(f"shared {shared} B > {SHARED_LIMIT[arch]} B")
    return Report(kernel, arch, dtype_name, head_dim, spec["config"], variant=spec.get("variant", ""),
                  classes=spec.get("classes", ""), registers=regs, stack_bytes=stack + local, shared_bytes=shared,
                  block_flops=block_flops,
                  ok=not problems, problem="; ".join(problems), **stats)


def _import_kernel_module(name):
    """The module, or None when it does not exist (yet)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None
        raise


def default_jobs(all_configs: bool = False, archs=(80, 90), kernels=None):
    """Job specs from every module of KERNEL_MODULES that defines ``gpu_report_jobs`` (see
    the module docstring).  kernels: only these kernel names (None: all)."""
    jobs = []
    for name in KERNEL_MODULES:
        module = _import_kernel_module(name)
        if module is None or not hasattr(module, "gpu_report_jobs"):
            continue
        for arch in archs:
            jobs += [tuple(j) for j in module.gpu_report_jobs(arch, all_configs)]
    if kernels is not None:
        jobs = [j for j in jobs if j[0] in kernels]
    return jobs


def report_notes(kernels=None) -> list:
    """GPU_REPORT_NOTES of the kernel modules (those starting with a kernel name in
    ``kernels`` when given)."""
    notes = []
    for name in KERNEL_MODULES:
        module = _import_kernel_module(name)
        for note in getattr(module, "GPU_REPORT_NOTES", ()) if module is not None else ():
            if kernels is None or any(note.startswith(k) for k in kernels):
                notes.append(note)
    return notes


def run(jobs, workers: int | None = None):
    """Compile jobs in fresh worker processes.  Workers never run under the Triton
    interpreter (its kernels cannot be compiled), whatever this process uses."""
    if not jobs:
        return []
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(compile_and_read, jobs))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------
def _waits(r: Report) -> str:
    if not r.loop_found:
        return "-"
    if r.mma != "HGMMA":
        return str(r.loop_copy_waits)
    depths = ",".join(str(d) for d in r.loop_mma_wait_depths)
    return f"{r.loop_mma_waits} (depth {depths})" if depths else "0"


def format_table(reports) -> str:
    head = ("| kernel | variant | arch | dtype | D | config | regs | spill B | LDL/STL | shared B | MMA | "
            "async copies | loop: SASS | loop: MMA | loop: async | loop: LDG | loop: waits | ok |")
    lines = [head, "|" + "---|" * 18]
    for r in reports:
        loop = ((r.loop_instructions, r.loop_mma, r.loop_async_copies, r.loop_sync_loads) if r.loop_found
                else ("-",) * 4)
        lines.append(f"| {r.kernel} | {r.variant or '-'} | sm_{r.arch} | {r.dtype} | {r.head_dim} | {r.config} | "
                     f"{r.registers} | {r.stack_bytes} | {r.spill_instructions} | {r.shared_bytes} | {r.mma} | "
                     f"{r.async_copies} | {' | '.join(str(x) for x in loop)} | {_waits(r)} | "
                     f"{'yes' if r.ok else 'NO: ' + r.problem} |")
    lines.append("\nloop: the main loop body (one KV block for the attention kernel); waits: wgmma waits "
                 "(WARPGROUP.DEPBAR) on sm_90, cp.async waits (DEPBAR) on sm_80.")
    return "\n".join(lines)


def format_block_classes(reports) -> str:
    """Per-block-class summary, one table per kernel reported in two or more variants (the
    attention kernel: plain = no lock; locked = every locked block class, one code path)."""
    tables = []
    for kernel in dict.fromkeys(r.kernel for r in reports):
        mine = [r for r in reports if r.kernel == kernel and r.variant]
        variants = list(dict.fromkeys(r.variant for r in mine))
        if len(variants) < 2:
            continue
        groups = {}
        for r in mine:
            groups.setdefault((r.arch, r.dtype, r.head_dim, r.config), {})[r.variant] = r
        lines = [f"### {kernel}\n", "| arch | dtype | D | config | " + " | ".join(
            f"{v}: MMA/block | {v}: MMA work | {v}: SASS/block | {v}: waits" for v in variants) + " |",
            "|" + "---|" * (4 + 4 * len(variants))]
        for (arch, dtype, d, config), g in groups.items():
            cells = []
            for v in variants:
                r = g.get(v)
                ok = r is not None and r.loop_found
                work = f"{r.loop_mma_flops / r.block_flops:.2f}x" if ok and r.block_flops else "-"
                cells += [str(r.loop_mma) if ok else "-", work, str(r.loop_instructions) if ok else "-",
                          _waits(r) if r is not None else "-"]
            lines.append(f"| sm_{arch} | {dtype} | {d} | {config} | " + " | ".join(cells) + " |")
        classes = {r.variant: r.classes for r in mine if r.classes}
        lines.append("\n" + "; ".join(f"{v}: {c}" for v, c in classes.items())
                     + ".  MMA work: tensor-core FLOPs of one loop iteration / the block's useful FLOPs "
                     "(1.00x: no work duplicated across warps).")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvlock_kernels.tools.gpu_report", description=__doc__.split("\n")[0])
    ap.add_argument("--all", action="store_true", help="fp16, bf16 and fp32, every head dim and every config")
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT))
    ap.add_argument("--kernels", nargs="+", default=None, help="only these kernels (e.g. kv_lock_attention)")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args(argv)
    reports = run(default_jobs(args.all, tuple(args.arch), args.kernels), args.workers)
    print(format_table(reports))
    classes = format_block_classes(reports)
    if classes:
        print("\n## per block class\n\n" + classes)
    for note in report_notes(args.kernels):
        print(f"\nnote: {note}")
    bad = [r for r in reports if not r.ok]
    print(f"\n{len(reports) - len(bad)}/{len(reports)} configs ok" + (f"; {len(bad)} failing" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
