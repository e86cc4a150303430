"""The static GPU-readiness report: the attention kernel's default configs compile for
sm_80 and sm_90 without spills and within shared memory; the locked kernel issues the
tensor-core instructions of the plain one per KV block; every tile load of the main loop
is an asynchronous copy; the SASS parsing and the job protocol work on known inputs."""
import sys
import types

import pytest

from kvlock_kernels.attention import configs as attention_configs
from kvlock_kernels.tools import gpu_report

ATTENTION = "kvlock_kernels.attention.kv_lock_attention"

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/              @!P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0020*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT, gsb0 ;
        /*0040*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0050*/                   LDG.E R6, desc[UR4][R8.64] ;
        /*0060*/                   HGMMA.64x128x16.F32.BF16 R24, R28, gdesc[UR12].tnspB, R24, gsb0 ;
        /*0070*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0080*/                   DEPBAR.LE SB0, 0x2 ;
        /*0090*/              @!P1 BRA `(.L_x_1) ;
.L_x_0:
        /*00a0*/                   STL [R1], R2 ;
        /*00b0*/                   EXIT ;
.L_x_2:
        /*00c0*/                   BRA `(.L_x_2);
"""


def test_sass_main_loop_analysis():
    stats = gpu_report.analyse_sass(SASS)
    assert stats["mma"] == "HGMMA" and stats["mma_total"] == 2 and stats["spill_instructions"] == 1
    assert stats["loop_found"] and stats["loop_instructions"] == 8
    assert (stats["loop_mma"], stats["loop_async_copies"], stats["loop_sync_loads"]) == (2, 1, 1)
    assert stats["loop_mma_wait_depths"] == [0, 1] and stats["loop_copy_waits"] == 1
    assert not gpu_report.analyse_sass(SASS.replace("@!P1 BRA `(.L_x_1)", "NOP"))["loop_found"]


def test_job_protocol(monkeypatch):
    """Modules define gpu_report_jobs; missing modules and modules without it are skipped."""
    fake = types.ModuleType("fake_kernels_for_report")
    fake.gpu_report_jobs = lambda arch, all_configs: [("fake", fake.__name__, "build", arch, "bf16", 0, (1, 2))]
    without = types.ModuleType("fake_kernels_without_jobs")
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setitem(sys.modules, without.__name__, without)
    monkeypatch.setattr(gpu_report, "KERNEL_MODULES",
                        (fake.__name__, "kvlock_kernels.attention.not_written_yet", without.__name__, ATTENTION))
    jobs = gpu_report.default_jobs(False, archs=(80, 90))
    assert jobs[:2] == [("fake", fake.__name__, "build", 80, "bf16", 0, (1, 2)),
                        ("fake", fake.__name__, "build", 90, "bf16", 0, (1, 2))]
    assert {j[0] for j in jobs} == {"fake", "kv_lock_attention"} and all(len(j) == 7 for j in jobs)
    assert gpu_report.default_jobs(False, archs=(90,), kernels={"fake"}) == [jobs[1]]


def test_fp32_note():
    notes = gpu_report.report_notes({"kv_lock_attention"})
    assert any("fp32" in n and "lock_kv" in n and "SDPA" in n for n in notes)


def test_all_covers_every_dtype_head_dim_and_config():
    jobs = [j for j in gpu_report.default_jobs(True, archs=(80, 90), kernels={"kv_lock_attention"})]
    for arch in (80, 90):
        for dt in ("bf16", "fp16", "fp32"):
            for d in gpu_report.ALL_HEAD_DIMS:
                cfgs = attention_configs.configs_for(d, dt, arch, aligned=d % 16 == 0)
                for builder in ("_gpu_report_plain", "_gpu_report_locked"):
                    got = [j[6] for j in jobs if j[2] == builder and j[3:6] == (arch, dt, d)]
                    assert sorted(got) == sorted(cfgs), (arch, dt, d, builder)


@pytest.fixture(scope="module")
def default_attention_reports():
    jobs = gpu_report.default_jobs(False, archs=(80, 90), kernels={"kv_lock_attention"})
    assert len(jobs) == 8  # 2 archs x head dims 64, 128 x plain, locked
    return gpu_report.run(jobs, workers=2)


def test_default_attention_configs_clean(default_attention_reports):
    for r in default_attention_reports:
        assert r.ok, (r.arch, r.head_dim, r.config, r.variant, r.problem)
        assert r.loop_found and r.loop_instructions > 0
        assert r.mma == ("HGMMA" if r.arch == 90 else "HMMA")
        # Every K/V (and lock) tile load of the KV loop is an asynchronous copy.
        assert r.loop_async_copies > 0 and r.loop_sync_loads == 0


def test_locked_issues_the_plain_tensor_core_work(default_attention_reports):
    by_key = {}
    for r in default_attention_reports:
        by_key.setdefault((r.arch, r.head_dim, r.config), {})[r.variant] = r
    assert len(by_key) == 4
    for key, pair in by_key.items():
        assert pair["locked"].loop_mma == pair["plain"].loop_mma > 0, key
        if key[0] == 90:  # the plain loop waits for its QK wgmma only; PV stays in flight
            assert pair["plain"].loop_mma_wait_depths == [0], key
    table = gpu_report.format_block_classes(default_attention_reports)
    assert "### kv_lock_attention" in table and "locked: MMA/block" in table and "one code path" in table


def test_fp32_epilogue_branch_variants_clean_at_unaligned_head_dim():
    """fp32 qkv_epilogue at head dim 72 (BLOCK_D 128) on sm_90: the tile where CogVideoX's
    branch variant spilled 8 bytes with 4 warps (the harness's --all report caught it)."""
    jobs = [j for j in gpu_report.default_jobs(True, archs=(90,), kernels={"qkv_epilogue"})
            if j[3:6] == (90, "fp32", 72)]
    assert len(jobs) >= 4
    for r in gpu_report.run(jobs, workers=2):
        assert r.ok, (r.variant, r.config, r.problem)


def test_report_flags_spills():
    """A deliberately oversized tile must be reported as spilling (the check can fail)."""
    (report,) = gpu_report.run([("kv_lock_attention", ATTENTION, "_gpu_report_locked", 90, "bf16", 256,
                                 (128, 64, 4, 2))], workers=1)
    assert not report.ok and "spills" in report.problem


def test_report_flags_build_failures():
    (report,) = gpu_report.run([("kv_lock_attention", ATTENTION, "_no_such_builder", 90, "bf16", 64,
                                 (64, 64, 4, 2))], workers=1)
    assert not report.ok and "build failed" in report.problem


def test_cli_exit_status(capsys):
    # Same kernels as the fixture: Triton's compile cache makes this cheap.
    assert gpu_report.main(["--kernels", "kv_lock_attention", "--arch", "90", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "| kv_lock_attention | locked | sm_90 | bf16 | 128 |" in out and "per block class" in out
    assert "4/4 configs ok" in out
