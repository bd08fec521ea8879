"""The CUDA kernels (csrc/cuda) compile for A100 and H100 without spills or excess shared memory.

The CI machines have no GPU, so nothing there runs the kernels; ptxas's report (-Xptxas -v) is
the only way to see register spills and shared memory there. The module compiles every kernel
source of csrc/cuda with the flags CMakeLists.txt gives the _cuda target, for sm_80 and sm_90,
parses the report per kernel and architecture and prints it as a table (pytest -s).
Skipped without nvcc.
"""

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (
    ROOT / "csrc" / "cuda" / "cost_matrix_cuda.cu",
    ROOT / "csrc" / "cuda" / "sinkhorn_cuda.cu",
)
ARCHS = ("sm_80", "sm_90")
# The options CMakeLists.txt gives the _cuda target (C++17, -O3 --use_fast_math), plus ptxas's
# report.
FLAGS = ("-std=c++17", "-O3", "--use_fast_math", "-Xptxas", "-v")
# Every kernel of the source, which must appear for every architecture: demangled name (what
# the table shows) -> a piece of its mangled name (what it shows where c++filt is missing).
KERNELS = {
    "cost_matrix_kernel<float>": "cost_matrix_kernelIfE",
    "cost_matrix_kernel<__half>": "cost_matrix_kernelI6__halfE",
    "cost_matrix_kernel<__nv_bfloat16>": "cost_matrix_kernelI13__nv_bfloat16E",
    "sinkhorn_kernel": "sinkhorn_kernelE",
}
# Static __shared__ arrays are limited to 48 KiB per block on every architecture; more needs
# dynamic shared memory and cudaFuncSetAttribute, which the launchers do not do.
STATIC_SHARED_LIMIT = 48 * 1024


def _find_nvcc() -> str | None:
    cudacxx = os.environ.get("CUDACXX")
    for candidate in (shutil.which("nvcc"), cudacxx, "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


NVCC = _find_nvcc()
if NVCC is None:
    pytest.skip(
        "nvcc not found (PATH, $CUDACXX, /usr/local/cuda/bin): cannot compile csrc/cuda",
        allow_module_level=True,
    )


@dataclass
class KernelReport:
    name: str
    arch: str
    # None: ptxas printed no such line for the kernel (a format the parser does not know).
    registers: int | None = None
    stack: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int = 0  # ptxas leaves out "bytes smem" for a kernel without shared memory


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")
_SHARED = re.compile(r"(\d+) bytes smem")


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return {name: name for name in names}
    result = subprocess.run(
        [cxxfilt], input="\n".join(names), capture_output=True, text=True, check=False
    )
    demangled = result.stdout.splitlines()
    if result.returncode != 0 or len(demangled) != len(names):
        return {name: name for name in names}
    return dict(zip(names, demangled, strict=True))


def _short_name(demangled: str) -> str:
    """void eotfast::cuda::(anonymous namespace)::cost_matrix_kernel<float>(float const*, ...)
    -> cost_matrix_kernel<float>; a name that is still mangled stays as it is."""
    qualified = demangled.replace("(anonymous namespace)::", "").split("(", 1)[0]
    return qualified.split()[-1].split("::")[-1] if qualified else demangled


def parse_ptxas_report(text: str) -> list[KernelReport]:
    """One record per 'Compiling entry function' of ptxas -v; the lines after it (up to the
    next entry) hold its stack frame, spills, registers and shared memory."""
    reports: list[KernelReport] = []
    for line in text.splitlines():
        if entry := _ENTRY.search(line):
            reports.append(KernelReport(name=entry[1], arch=entry[2]))
        elif reports:
            report = reports[-1]
            if frame := _FRAME.search(line):
                report.stack, report.spill_stores, report.spill_loads = map(int, frame.groups())
            if registers := _REGISTERS.search(line):
                report.registers = int(registers[1])
            if shared := _SHARED.search(line):
                report.shared = int(shared[1])
    names = _demangle([report.name for report in reports])
    for report in reports:
        report.name = _short_name(names[report.name])
    return reports


def format_table(reports: list[KernelReport]) -> str:
    header = ("kernel", "arch", "registers", "spill st/ld", "smem", "stack")
    rows = [
        (
            r.name,
            r.arch,
            str(r.registers),
            f"{r.spill_stores}/{r.spill_loads}",
            str(r.shared),
            str(r.stack),
        )
        for r in reports
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[KernelReport]:
    out_dir = tmp_path_factory.mktemp("cuda_compile")
    reports: list[KernelReport] = []
    for source in SOURCES:
        for arch in ARCHS:
            output = out_dir / f"{source.stem}_{arch}.o"
            command = [NVCC, "-c", str(source), "-o", str(output), f"-arch={arch}", *FLAGS]
            command += ["-I", str(ROOT / "csrc")]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            assert result.returncode == 0, (
                f"nvcc failed for {arch} (exit {result.returncode}):\n{' '.join(command)}\n"
                f"{result.stdout}{result.stderr}"
            )
            # ptxas writes its report to stderr (stdout on some versions): read both.
            reports += parse_ptxas_report(result.stdout + result.stderr)
    print(f"\nptxas report for csrc/cuda ({NVCC}):\n{format_table(reports)}")
    return reports


def test_parser_reads_a_ptxas_report():
    text = """\
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'
ptxas info    : Function properties for _Z6kernelPf
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 2176 bytes smem, 400 bytes cmem[0]
"""
    (report,) = parse_ptxas_report(text)
    assert (report.arch, report.registers, report.shared) == ("sm_90", 40, 2176)
    assert (report.stack, report.spill_stores, report.spill_loads) == (8, 4, 12)
    assert report.name in ("kernel", "_Z6kernelPf")  # demangled when c++filt exists


def test_every_kernel_is_compiled_for_every_arch(reports):
    table = format_table(reports)
    for arch in ARCHS:
        names = [r.name for r in reports if r.arch == arch]
        missing = [
            kernel
            for kernel, mangled in KERNELS.items()
            if not any(name == kernel or mangled in name for name in names)
        ]
        assert not missing, f"ptxas compiled no {missing} for {arch}:\n{table}"


def test_every_report_is_complete(reports):
    # A ptxas whose wording the parser does not know must fail here, not read as "no spills".
    incomplete = [r for r in reports if r.registers is None or r.spill_stores is None]
    assert not incomplete, (
        f"no register or spill line for {[(r.name, r.arch) for r in incomplete]}:\n"
        f"{format_table(reports)}"
    )


def test_no_register_spills(reports):
    spilling = [r for r in reports if r.spill_stores or r.spill_loads]
    assert not spilling, (
        f"register spills in {[(r.name, r.arch) for r in spilling]}:\n{format_table(reports)}"
    )


def test_shared_memory_fits_the_static_limit(reports):
    too_large = [r for r in reports if r.shared > STATIC_SHARED_LIMIT]
    assert not too_large, (
        f"static shared memory over {STATIC_SHARED_LIMIT} bytes in "
        f"{[(r.name, r.arch) for r in too_large]}:\n{format_table(reports)}"
    )
