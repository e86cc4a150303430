"""The harness's model of every locked-attention design, computed from the real lock.

For each SPEC shape (section 8) x batch {3 with an in-batch source, 2 with a cached
source} x alpha {0, 0.5, 1} x foreground {0.1, 0.3}, with a moving-rectangle foreground
mask in the model's own token order ((t, h, w) flattened; text tokens first for
CogVideoX, last for HunyuanVideo, never locked):

- the fractions of all-0 / all-1 / constant / mixed key blocks per batch entry at the
  fused kernel's BLOCK_N (the first sm_90 config of ``attention.configs`` for the head dim
  and dtype);
- the modelled time of every path (``kvlock_kernels.attention.routing``'s cost model,
  H100 SXM, bf16): plain attention (FA3 / FA2 / SDPA), the blend pass plus each, the
  fused kernel as rebuilt (one dot per matmul, blend-on-load ALU work on constant and
  mixed blocks), the old fused design (two QK and two PV dots on every constant or mixed
  block), and ``choose_path``'s choice with its time and its ratio to the best plain;
- a whole 50-step edit per design (SPEC section 5: 30 steps at alpha 1, then 20 at a
  soft alpha), and the attention block with the blend fused into the norm/RoPE epilogue
  the stock layer already runs against the stock layer.

Nothing here runs a kernel: it is arithmetic on shapes and on the real lock's block
classes (about a second on a CPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from kvlock_kernels.attention import routing

from .common import COGVIDEOX_5B, HUNYUAN, WAN_1_3B, WAN_14B, AttnShape, moving_rect_mask, token_lock

ALPHAS = (0.0, 0.5, 1.0)
FGS = (0.1, 0.3)
BATCHES = (3, 2)
SOFT_ALPHA = 0.5
STEPS_LOCKED, STEPS_SOFT = 30, 20  # SPEC section 5: alpha_pre = 1 until the last kappa = 20 steps
BOUND = 1.03  # the bound: auto <= 1.03x the best plain attention
DTYPE = torch.bfloat16
MODEL_ARCH, MODEL_DEVICE = 90, "H100"
# cuBLAS bf16 GEMMs at these sizes reach about 70-80% of the H100 SXM peak (NVIDIA's
# published cuBLAS/H100 numbers): the projections of the attention block.
GEMM_EFF = 0.75


@dataclass(frozen=True)
class ModelSpec:
    """A SPEC model: its self-attention shape, depth, and the epilogue its stock
    processor runs on q and k (norm, then RoPE on the video tokens)."""
    shape: AttnShape
    layers: int
    norm: str
    rope: str


SPECS = (
    ModelSpec(WAN_1_3B, 30, "rms_across_heads", "interleaved"),
    ModelSpec(WAN_14B, 40, "rms_across_heads", "interleaved"),
    ModelSpec(COGVIDEOX_5B, 42, "layer_per_head", "interleaved"),
    ModelSpec(HUNYUAN, 60, "rms_per_head", "interleaved"),
)


def lock_for(shape: AttnShape, batch: int, alpha: float, fg_fraction: float) -> torch.Tensor:
    """(B, S) fp32 lock of one layer call.  batch 3: entry 0 is the in-batch source (not
    locked toward itself: weight 0, as ``lock_kv(source_index=0)`` does), entries 1, 2 the
    conditional and unconditional branches; batch 2: both branches locked toward a
    cached source."""
    w = token_lock(shape, moving_rect_mask(shape, fg_fraction), alpha)
    lock = w[None].repeat(batch, 1)
    if batch == 3:
        lock[0] = 0.0
    return lock


def block_classes(lock: torch.Tensor, block_n: int) -> list[dict]:
    """Per batch entry, the fractions of key blocks of ``block_n`` tokens that are all 0
    (read k only), all 1 (read the source only), constant 0 < w < 1 (one weight for the
    block) and mixed (w_min != w_max).  The fused kernel blends constant and mixed blocks
    on load; the old design issued two dots for both."""
    B, S = lock.shape
    nblocks = -(-S // block_n)
    pad = nblocks * block_n - S
    w = torch.nn.functional.pad(lock.float(), (0, pad), value=float("nan")).view(B, nblocks, block_n)
    valid = ~torch.isnan(w)
    w_min = torch.where(valid, w, torch.inf).amin(-1)
    w_max = torch.where(valid, w, -torch.inf).amax(-1)
    zero = w_max == 0
    one = w_min == 1
    const = (w_min == w_max) & ~zero & ~one
    mixed = ~(zero | one | const)
    out = []
    for b in range(B):
        out.append({k: float(v[b].float().mean()) for k, v in
                    (("zero", zero), ("one", one), ("const", const), ("mixed", mixed))})
    return out


def _profile():
    return routing.device_profile(name=MODEL_DEVICE, arch=MODEL_ARCH)


def layer_row(spec: ModelSpec, batch: int, alpha: float, fg: float, *,
              available: Sequence[str] = routing.PLAIN_BACKENDS) -> dict:
    """One layer call modelled from its real lock: block classes, each path's ms, the
    route and its ratio to the best plain attention (ms are per layer call)."""
    s = spec.shape
    prof = _profile()
    S, H, D = s.seqlen, s.heads, s.head_dim
    bm, bn, tile_src = routing.fused_blocks(D, DTYPE, MODEL_ARCH)
    lock = lock_for(s, batch, alpha, fg)
    classes = block_classes(lock, bn)
    blended = sum(c["const"] + c["mixed"] for c in classes) / batch  # mean over entries
    dims = (batch, S, S, H, H, D, DTYPE)
    plain = {b: routing.plain_time(b, *dims, prof) * 1e3 for b in routing.PLAIN_BACKENDS}
    blend = routing.blend_time(batch, S, H, D, DTYPE, prof, source_shared=True) * 1e3
    fused_new = routing.fused_time(*dims, prof, blended_fraction=blended, block_m=bm) * 1e3
    # The old design: the same kernel efficiency, tensor work 1 + (constant or mixed blocks).
    flops = routing.attention_flops(batch, S, S, H, D)
    eff = routing.efficiency("triton", MODEL_ARCH, DTYPE, D)
    old_bytes = routing.fused_bytes(*dims, blended_fraction=blended)
    fused_old = (max(flops / prof.tensor_flops * (1.0 + blended) / eff, old_bytes / (prof.bandwidth * routing.BW_EFF))
                 + routing.LAUNCH_S) * 1e3

    def auto_for(avail):
        route = routing.choose_path(batch, S, S, H, H, D, DTYPE, "cuda", available=avail, arch=MODEL_ARCH,
                                    device_name=MODEL_DEVICE)
        ms = fused_new if route.path == "fused" else blend + plain[route.plain_backend]
        best = min(plain[b] for b in avail)
        return route, ms, ms / best

    route, auto_ms, ratio = auto_for(tuple(available))
    scenarios = {}
    for avail in (("fa3", "fa2", "sdpa"), ("fa2", "sdpa"), ("sdpa",)):
        r, ms, rat = auto_for(avail)
        scenarios["+".join(avail)] = dict(path=r.path, plain_backend=r.plain_backend, ms=ms, ratio=rat)
    best_plain = min(plain[b] for b in available)
    locked = [c for i, c in enumerate(classes) if not (batch == 3 and i == 0)]
    return dict(
        shape=s.name, batch=batch, seqlen=S, heads=H, head_dim=D, alpha=alpha, fg=fg, layers=spec.layers,
        block_m=bm, block_n=bn, tile_source=tile_src, classes=classes, locked_classes=locked[0],
        blended_fraction=blended, tflop=flops / 1e12,
        plain_ms=plain, blend_ms=blend, blend_plain_ms={b: blend + plain[b] for b in plain},
        fused_new_ms=fused_new, fused_old_ms=fused_old,
        tensor_work={"blend_then_plain": 1.0, "fused_new": 1.0, "fused_old": 1.0 + blended},
        auto_path=route.path, auto_backend=route.plain_backend, auto_ms=auto_ms, best_plain_ms=best_plain,
        auto_ratio=ratio, scenarios=scenarios, device_model=f"{prof.name} sm_{MODEL_ARCH}",
    )


def epilogue_bytes(spec: ModelSpec, batch: int, *, cache_source: bool) -> dict:
    """HBM bytes of the memory-bound epilogue of one attention block.

    stock: the stock processor's norm on q and k and RoPE on their video tokens, counted
    as one pass per op (read + write); eager diffusers runs RoPE as several elementwise
    kernels with fp32 temporaries, so this is a lower bound on the stock layer, which only
    favours the stock side.  stock + blend pass: the same, then ``lock_kv``.  fused
    (``qkv_epilogue``): one pass reading the q, k, v projections (and, with a cached
    source, its normed and rotated K, V once) and writing q, K', V'; in branch mode the
    source is an entry of the batch, so it costs no extra read.
    """
    s = spec.shape
    e = 2
    tile = batch * s.seqlen * s.heads * s.head_dim * e
    video = s.video_tokens / s.seqlen
    rope_tables = 2 * s.video_tokens * s.head_dim * 4  # cos and sin, fp32
    stock = 2 * (2 * tile) + 2 * (2 * tile * video + rope_tables)
    blend = routing.blend_bytes(batch, s.seqlen, s.heads, s.head_dim, DTYPE, source_shared=True)
    source = 2 * s.seqlen * s.heads * s.head_dim * e if cache_source else 0
    fused = 3 * tile + 3 * tile + source + rope_tables + 4 * batch * s.seqlen
    return dict(stock=stock, stock_blend=stock + blend, fused=fused, stock_launches=4, fused_launches=1)


def epilogue_row(spec: ModelSpec, batch: int) -> dict:
    """The attention block (q/k/v/out projections + epilogue + attention) per layer call:
    stock, locked with a separate blend pass, locked with the blend fused into the epilogue
    (attention: FA3 in each)."""
    s = spec.shape
    prof = _profile()
    nb = epilogue_bytes(spec, batch, cache_source=batch == 2)
    bw = prof.bandwidth * routing.BW_EFF
    dim = s.heads * s.head_dim
    proj = 4 * 2.0 * batch * s.seqlen * dim * dim / (prof.tensor_flops * GEMM_EFF) * 1e3
    attn = routing.plain_time("fa3", batch, s.seqlen, s.seqlen, s.heads, s.heads, s.head_dim, DTYPE, prof) * 1e3
    stock_epi = (nb["stock"] / bw + nb["stock_launches"] * routing.LAUNCH_S) * 1e3
    blend_epi = (nb["stock_blend"] / bw + (nb["stock_launches"] + 1) * routing.LAUNCH_S) * 1e3
    fused_epi = (nb["fused"] / bw + nb["fused_launches"] * routing.LAUNCH_S) * 1e3
    stock_layer = proj + stock_epi + attn
    return dict(shape=s.name, batch=batch, mode="cached source" if batch == 2 else "in-batch source",
                norm=spec.norm, rope=spec.rope, proj_ms=proj, attention_ms=attn,
                stock_epilogue_ms=stock_epi, blend_epilogue_ms=blend_epi, fused_epilogue_ms=fused_epi,
                stock_gib=nb["stock"] / 2 ** 30, stock_blend_gib=nb["stock_blend"] / 2 ** 30,
                fused_gib=nb["fused"] / 2 ** 30,
                stock_layer_ms=stock_layer, blend_layer_ms=proj + blend_epi + attn,
                fused_layer_ms=proj + fused_epi + attn,
                blend_layer_ratio=(proj + blend_epi + attn) / stock_layer,
                fused_layer_ratio=(proj + fused_epi + attn) / stock_layer)


EDIT_DESIGNS = ("plain fa3 (no lock)", "blend + fa3", "blend + fa2", "blend + sdpa", "fused (new)",
                "fused (old, two dots)", "auto", "fused epilogue + fa3")


def _per_step(r: dict, design: str, stock_epi: float, fused_epi: float) -> float:
    """ms of one layer call's epilogue + blend + attention for a design."""
    p, bp = r["plain_ms"], r["blend_plain_ms"]
    return {
        "plain fa3 (no lock)": stock_epi + p["fa3"],
        "blend + fa3": stock_epi + bp["fa3"],
        "blend + fa2": stock_epi + bp["fa2"],
        "blend + sdpa": stock_epi + bp["sdpa"],
        "fused (new)": stock_epi + r["fused_new_ms"],
        "fused (old, two dots)": stock_epi + r["fused_old_ms"],
        "auto": stock_epi + r["auto_ms"],
        "fused epilogue + fa3": fused_epi + p["fa3"],
    }[design]


def edit_rows(rows: Sequence[dict], epilogues: Sequence[dict]) -> list[dict]:
    """A 50-step edit per design: layers x (30 steps at alpha 1 + 20 at SOFT_ALPHA) of the
    attention block's lock-dependent part (epilogue, blend, attention), in seconds.  The
    projections are the same for every design and left out."""
    out = []
    keyed = {(r["shape"], r["batch"], r["alpha"], r["fg"]): r for r in rows}
    epi = {(e["shape"], e["batch"]): e for e in epilogues}
    for (shape, batch, alpha, fg), r1 in keyed.items():
        if alpha != 1.0 or (shape, batch, SOFT_ALPHA, fg) not in keyed:
            continue
        rs = keyed[(shape, batch, SOFT_ALPHA, fg)]
        e = epi[(shape, batch)]
        stock_epi, fused_epi = e["stock_epilogue_ms"], e["fused_epilogue_ms"]
        totals = {d: r1["layers"] * (STEPS_LOCKED * _per_step(r1, d, stock_epi, fused_epi)
                                     + STEPS_SOFT * _per_step(rs, d, stock_epi, fused_epi)) / 1e3
                  for d in EDIT_DESIGNS}
        base = totals["plain fa3 (no lock)"]
        out.append(dict(shape=shape, batch=batch, fg=fg, layers=r1["layers"], seconds=totals,
                        ratio={d: t / base for d, t in totals.items()}))
    return out


def run(specs: Sequence[ModelSpec] = SPECS, batches=BATCHES, alphas=ALPHAS, fgs=FGS) -> dict:
    """Every row, the epilogue rows, the 50-step edit rows and the bound check."""
    rows = [layer_row(spec, b, a, f) for spec in specs for b in batches for f in fgs for a in alphas]
    epilogues = [epilogue_row(spec, b) for spec in specs for b in batches]
    edits = edit_rows(rows, epilogues)
    worst = max(max(sc["ratio"] for sc in r["scenarios"].values()) for r in rows)
    bs = {r["block_n"] for r in rows}
    return dict(rows=rows, epilogue=epilogues, edit=edits, worst_auto_ratio=worst, bound=BOUND,
                bound_ok=worst <= BOUND, device_model=rows[0]["device_model"] if rows else "",
                tile_source=rows[0]["tile_source"] if rows else "", block_n=sorted(bs),
                constants=constants())


def constants() -> dict:
    """The cost model's constants, for the JSON report."""
    return dict(efficiency={f"{k[0]}/{k[1]}": v for k, v in routing.EFFICIENCY.items()},
                fp32_efficiency=dict(routing.FP32_EFFICIENCY), bw_eff=routing.BW_EFF, launch_s=routing.LAUNCH_S,
                blend_lane_ops=routing.BLEND_LANE_OPS, blend_overlap=routing.BLEND_OVERLAP,
                tc_flop_per_lane=routing.TC_FLOP_PER_LANE, gemm_eff=GEMM_EFF,
                sdpa_kernel=routing.sdpa_kernel_kind(DTYPE, 128))


def _pct(x):
    return f"{100 * x:.0f}"


def format_markdown(result: dict, *, title_level: str = "##") -> str:
    """The model as markdown tables (the harness prints this; docs/performance.md pastes it)."""
    lines = []
    rows = result["rows"]
    lines.append(f"{title_level} model: locked attention per layer call, computed from the real lock "
                 f"({result['device_model']}, bf16, modelled)\n")
    lines.append(f"Key blocks at the fused kernel's BLOCK_N ({', '.join(map(str, result['block_n']))}; from "
                 f"{result['tile_source']}), fractions of the locked entries in %: 0 = all-0 (read k), 1 = all-1 "
                 "(read the source), c = constant soft weight, m = mixed.  Batch 3: entry 0 is the in-batch "
                 "source (weight 0: all its blocks are all-0).  ms per layer call.  auto = `choose_path` "
                 "(FA3, FA2, SDPA available); ratio = auto / best plain; the last column is the ratio when only "
                 "FA2+SDPA / only SDPA are installed.\n")
    lines.append("| shape | B | alpha | fg | BN | 0/1/c/m % | FA3 | FA2 | SDPA | blend | blend+FA3 | fused new | "
                 "fused old (dots) | auto | auto ms | ratio | ratio FA2 / SDPA only |")
    lines.append("|" + "---|" * 17)
    for r in rows:
        c = r["locked_classes"]
        sc = r["scenarios"]
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['alpha']:g} | {r['fg']:g} | {r['block_n']} | "
            f"{_pct(c['zero'])}/{_pct(c['one'])}/{_pct(c['const'])}/{_pct(c['mixed'])} | "
            f"{r['plain_ms']['fa3']:.2f} | {r['plain_ms']['fa2']:.2f} | {r['plain_ms']['sdpa']:.2f} | "
            f"{r['blend_ms']:.3f} | {r['blend_plain_ms']['fa3']:.2f} | {r['fused_new_ms']:.2f} | "
            f"{r['fused_old_ms']:.2f} ({r['tensor_work']['fused_old']:.2f}x) | "
            f"{'fused' if r['auto_path'] == 'fused' else 'blend+' + r['auto_backend']} | {r['auto_ms']:.2f} | "
            f"{r['auto_ratio']:.3f} | {sc['fa2+sdpa']['ratio']:.3f} / {sc['sdpa']['ratio']:.3f} |")
    verdict = "holds" if result["bound_ok"] else "FAILS"
    lines.append(f"\nauto <= {result['bound']:g}x the best plain attention at every shape, batch, alpha, fg and "
                 f"backend set: {verdict} (worst {result['worst_auto_ratio']:.3f}x).  Tensor-core work: 1.00x plain "
                 "for the blend path and the new fused kernel (one dot per matmul); the old design's factor is in "
                 "brackets.\n")
    lines.append(f"{title_level}# the attention block with the blend fused into the epilogue (per layer call, ms)\n")
    lines.append("stock = projections + the stock norm/RoPE passes + FA3; +blend pass = the same then `lock_kv`; "
                 "fused epilogue = `qkv_epilogue` (norm, RoPE and blend in one pass) + FA3.\n")
    lines.append("| shape | B | source | norm | epilogue GiB stock / +blend / fused | epilogue ms stock / +blend / "
                 "fused | block ms stock | +blend pass | fused epilogue |")
    lines.append("|" + "---|" * 9)
    for e in result["epilogue"]:
        lines.append(
            f"| {e['shape']} | {e['batch']} | {e['mode']} | {e['norm']} | {e['stock_gib']:.2f} / "
            f"{e['stock_blend_gib']:.2f} / {e['fused_gib']:.2f} | {e['stock_epilogue_ms']:.3f} / "
            f"{e['blend_epilogue_ms']:.3f} / {e['fused_epilogue_ms']:.3f} | {e['stock_layer_ms']:.2f} | "
            f"{e['blend_layer_ms']:.2f} ({e['blend_layer_ratio']:.3f}x) | {e['fused_layer_ms']:.2f} "
            f"({e['fused_layer_ratio']:.3f}x) |")
    lines.append(f"\n{title_level}# a 50-step edit ({STEPS_LOCKED} steps at alpha 1, {STEPS_SOFT} at alpha "
                 f"{SOFT_ALPHA:g}; all layers), seconds of epilogue + blend + attention, ratio to plain FA3\n")
    lines.append("| shape | B | fg | layers | " + " | ".join(EDIT_DESIGNS) + " |")
    lines.append("|" + "---|" * (4 + len(EDIT_DESIGNS)))
    for e in result["edit"]:
        cells = " | ".join(f"{e['seconds'][d]:.1f} ({e['ratio'][d]:.3f}x)" for d in EDIT_DESIGNS)
        lines.append(f"| {e['shape']} | {e['batch']} | {e['fg']:g} | {e['layers']} | {cells} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:  # pragma: no cover - `python -m benchmarks.model`
    result = run()
    print(format_markdown(result))
    return 0 if result["bound_ok"] else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
