"""Ahead-of-time compilation of every Triton kernel of eotfast.kernels for a CUDA target, on a
machine without a GPU; the worker of tests/test_triton_compile.py.

    python tests/triton_aot.py --arch 90 --out report.json

It runs in its own process because the test session sets TRITON_INTERPRET=1, under which
``@triton.jit`` gives interpreted functions that the compiler cannot take.

What is compiled is what would run: each launcher (kernels/*.py) is called on meta tensors
with ``launch`` replaced by a recorder, and the recorded arguments are specialized by Triton's
own JIT binder (pointer dtypes, 16-divisibility of integers and pointers, constexprs), exactly
as a launch on a GPU would, then compiled by ``triton.compile`` for ``GPUTarget("cuda", arch,
32)``: TTIR -> TTGIR -> LLVM -> PTX -> cubin (ptxas ships with triton). For each
configuration the report holds registers, spills, stack and shared memory (from ``ptxas -v``
on the PTX), the number of CTA barriers in the PTX, and the store -> load hand-overs of global
buffers that no CTA barrier separates (:func:`unordered_handovers` on the TTGIR).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

# Shared memory a program may use, in bytes (CUDA C programming guide, compute capabilities).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

# (B, n, m, d): multiples of 16, none of them, odd n and m with an aligned d (image data), and
# the degenerate 1 x 1 x 1.
SHAPES = {
    "aligned": (2, 64, 128, 3072),
    "odd": (3, 33, 17, 70),
    "odd_points": (2, 33, 17, 3072),
    "ones": (1, 1, 1, 1),
}


# ----------------------------------------------------------------------------------- capture
def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def captured_launches() -> list[dict]:
    """Every configuration our launchers use, as recorded launches: name, kernel, args,
    kwargs. Each launcher calls ``launch(kernel, grid, device)(*args, **kwargs)``."""
    from eotfast.kernels import _launch, cost_matrix, draw_partners, sinkhorn

    records: list[dict] = []
    name = ""

    def recorder(kernel, grid, device):
        def record(*args, **kwargs):
            records.append(dict(name=name, kernel=kernel, args=args, kwargs=kwargs))

        return record

    modules = (_launch, cost_matrix, draw_partners, sinkhorn)
    saved = [module.launch for module in modules]
    for module in modules:
        module.launch = recorder
    try:
        for shape_name, (batch, n, m, d) in SHAPES.items():
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                name = f"cost_matrix {str(dtype).removeprefix('torch.')} {shape_name}"
                cost_matrix.launch_cost_matrix(_meta(batch, n, d, dtype=dtype),
                                               _meta(batch, m, d, dtype=dtype))  # fmt: skip
            cost, b, epsilon = _meta(batch, n, m), _meta(batch, m), _meta(batch)
            for programs in (1, 4):  # one program per problem, or grid barriers between four
                name = f"sinkhorn programs={programs} {shape_name}"
                # Four programs need four 64-wide blocks (the launcher clamps to the problem's
                # blocks): 192 more rows and columns keep each shape's alignment. A 1 x 1
                # problem stays one, to check the clamp.
                grow = 192 if programs > 1 and n > 1 else 0
                shape = (batch, n + grow, m + grow)
                sinkhorn.launch_sinkhorn(
                    _meta(*shape), _meta(*shape[:2]), _meta(batch, shape[2]), epsilon, 1000, 1e-4,
                    epsilon_start=epsilon, scaling=0.5, relaxation=1.9, programs=programs,
                )  # fmt: skip
            seed = _meta(1, dtype=torch.int64)
            for sample in (True, False):
                name = f"draw_partners {'sample' if sample else 'argmax'} {shape_name}"
                draw_partners.launch_draw_partners(cost, b, epsilon, seed, sample)
    finally:
        for module, launch in zip(modules, saved, strict=True):
            module.launch = launch
    return records


# ----------------------------------------------------------------------------------- auction
# (B, n, m, max_bids): multiples of 16 with padding rows (n < m), odd n < m, odd and square
# with an int64 bid cap, and 1 x 1 with max_bids = 1 (Triton specializes each 1 as a constant).
AUCTION_SHAPES = {
    "aligned": (2, 64, 128, 10**9),
    "odd": (3, 33, 47, 10**9),
    "odd_square": (2, 17, 17, 2**40),
    "ones": (1, 1, 1, 1),
}


def auction_launches() -> list[dict]:
    """kernels/auction.py's launches, float32 and float64, recorded as captured_launches
    records the others."""
    from eotfast.kernels import auction

    records: list[dict] = []
    saved = auction.launch
    for shape_name, (batch, n, m, max_bids) in AUCTION_SHAPES.items():
        for dtype in (torch.float32, torch.float64):
            name = f"auction {str(dtype).removeprefix('torch.')} {shape_name}"

            def recorder(kernel, grid, device, name=name):
                def record(*args, **kwargs):
                    records.append(dict(name=name, kernel=kernel, args=args, kwargs=kwargs))

                return record

            auction.launch = recorder
            try:
                auction.launch_auction(
                    _meta(batch, n, m, dtype=dtype), _meta(batch, m, dtype=dtype),
                    _meta(batch, dtype=dtype), _meta(batch, dtype=dtype), 0.25, max_bids,
                )  # fmt: skip
            finally:
                auction.launch = saved
    return records


# ----------------------------------------------------------------------------------- compile
def compile_launch(kernel, args, kwargs, arch: int):
    """The kernel as the JIT would build it for these arguments, for sm_<arch>."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def _ptxas() -> str:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return str(bundled) if bundled.exists() else "ptxas"


def ptxas_resources(ptx: str, arch: int) -> dict:
    """Registers, spills, stack and shared memory of the PTX's kernel from ``ptxas -v``."""
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)  # sm_90a for Hopper
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.ptx"
        path.write_text(ptx)
        completed = subprocess.run(
            [_ptxas(), f"-arch={target}", "-v", str(path), "-o", str(path.with_suffix(".cubin"))],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    report = completed.stderr + completed.stdout
    number = lambda pattern: int(re.search(pattern, report).group(1))  # noqa: E731
    return dict(
        registers=number(r"Used (\d+) registers"),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
        stack=number(r"(\d+) bytes stack frame"),
    )


# ---------------------------------------------------------------------------- barrier check
_BARRIER = re.compile(r"\b(ttg|gpu)\.barrier\b")
_POINTER_OPS = ("tt.addptr", "tt.splat", "tt.broadcast", "ttg.convert_layout", "tt.expand_dims",
                "tt.reshape", "tt.trans", "arith.select")  # fmt: skip


def _parse_regions(lines: list[str]) -> list:
    """TTGIR lines -> a tree: ("op", line), ("for", body), ("while", before, after),
    ("if", then, otherwise), ("other", regions) for ops with regions of their own (the
    combiners of reductions)."""

    def block(index):
        items = []
        while index < len(lines):
            line = lines[index].strip()
            if line.startswith("}"):
                return items, index
            if line.endswith("{"):
                kind = next((k for k in ("scf.for", "scf.while", "scf.if") if k in line), "other")
                regions = []
                body, index = block(index + 1)
                regions.append(body)
                while lines[index].strip().rstrip(")").endswith("{"):  # "} do {", "} else {"
                    body, index = block(index + 1)
                    regions.append(body)
                items.append((kind, line, regions))
            else:
                items.append(("op", line, []))
            index += 1
        return items, index

    return block(0)[0]


def unordered_handovers(ttgir: str) -> list[str]:
    """Pairs of accesses to one global buffer, a store and a later load (read-back) or a load
    and a later store (overwrite), that may follow each other on some path through the
    program with no CTA barrier in between: ``"store `...` -> load `...`"`` and
    ``"load `...` -> store `...`"``. Another warp may run either access first.

    A may-analysis over the structured control flow of the TTGIR (loops run zero or more
    times, back edges included; both arms of an ``if``). Each pointer is traced to the kernel
    argument it derives from (addptr, splat, broadcast, layout changes, selects, loop-carried
    values); a pointer it cannot trace conflicts with every argument. Atomics are the
    synchronization itself and are not counted. It cannot tell disjoint parts of one argument
    apart, nor see that both accesses come from the same thread, so it errs toward reporting.
    """
    lines = ttgir.splitlines()
    roots: dict[str, frozenset] = {}
    header = next(line for line in lines if "tt.func" in line)
    for argument in re.findall(r"(%[\w.]+): !tt\.ptr", header):
        roots[argument] = frozenset([argument])
    for line in lines:  # loop-carried values alias their initial values
        for carried, initial in re.findall(r"(%[\w.]+) = (%[\w.#]+)", line.split("->")[0]):
            if ("iter_args" in line or "scf.while" in line) and initial in roots:
                roots[carried] = roots[initial]
        match = re.match(r"\s*(%[\w.]+)(?::\d+)? = (\S+) (.*)", line)
        if match and match.group(2) in _POINTER_OPS:
            operands = re.findall(r"%[\w.#]+", match.group(3))
            sources = operands[1:3] if match.group(2) == "arith.select" else operands[:1]
            traced = [roots.get(source) for source in sources]
            if all(trace is not None for trace in traced):
                roots[match.group(1)] = frozenset().union(*traced)
    unknown = "?"

    def buffers(line):
        pointer = re.search(r"tt\.(?:load|store) (%[\w.#]+)", line).group(1)
        return roots.get(pointer, frozenset([unknown]))

    found: set[str] = set()

    def conflicts(access_buffers, pending: dict) -> list[str]:
        hits = []
        for buffer in access_buffers:
            if buffer == unknown:
                hits.extend(pending.values())
            else:
                hits.extend(line for key, line in pending.items() if key in (buffer, unknown))
        return hits

    # state: (buffers stored since the last barrier, buffers loaded since the last barrier),
    # each a dict buffer -> the first such access's line.
    def run(items, state):
        stored, loaded = dict(state[0]), dict(state[1])
        for kind, line, regions in items:
            if kind == "op":
                if _BARRIER.search(line):
                    stored, loaded = {}, {}
                elif re.search(r"\btt\.store\b", line):
                    for earlier in conflicts(buffers(line), loaded):
                        found.add(f"load `{earlier}` -> store `{line}`")
                    for buffer in buffers(line):
                        stored.setdefault(buffer, line)
                elif re.search(r"\btt\.load\b", line):
                    for earlier in conflicts(buffers(line), stored):
                        found.add(f"store `{earlier}` -> load `{line}`")
                    for buffer in buffers(line):
                        loaded.setdefault(buffer, line)
            elif kind == "scf.for":
                current = (stored, loaded)
                while True:
                    body = run(regions[0], current)
                    merged = (_union(stored, body[0]), _union(loaded, body[1]))
                    if _same(merged, current):
                        break
                    current = merged
                stored, loaded = current
            elif kind == "scf.while":
                current = (stored, loaded)
                while True:
                    after = run(regions[1], run(regions[0], current))
                    merged = (_union(stored, after[0]), _union(loaded, after[1]))
                    if _same(merged, current):
                        break
                    current = merged
                stored, loaded = run(regions[0], current)
            elif kind == "scf.if":
                arms = [run(region, (stored, loaded)) for region in regions]
                for arm in arms:
                    stored, loaded = _union(stored, arm[0]), _union(loaded, arm[1])
            # other ops with regions (reduction combiners) touch no global memory
        return stored, loaded

    run(_parse_regions(lines[lines.index(header) + 1 :]), ({}, {}))
    return sorted(found)


def _union(first: dict, second: dict) -> dict:
    return {**second, **first}


def _same(one, other) -> bool:
    return all(a.keys() == b.keys() for a, b in zip(one, other, strict=True))


# ----------------------------------------------------------------- a kernel the check must flag
@triton.jit
def handover_probe_kernel(buffer_ptr, iterations, BARRIER: tl.constexpr, BLOCK: tl.constexpr):
    """Each round reads, through another layout (a shifted index), what the previous round
    stored, then overwrites it: with BARRIER both hand-overs (store -> load across the back
    edge, load -> store within a round) are ordered; without, both are races."""
    offsets = tl.arange(0, BLOCK)
    for _ in range(iterations):
        values = tl.load(buffer_ptr + (offsets + 1) % BLOCK)
        if BARRIER:
            tl.debug_barrier()
        tl.store(buffer_ptr + offsets, values + 1.0)
        if BARRIER:
            tl.debug_barrier()


def probe_launches() -> list[dict]:
    buffer = _meta(128)
    return [
        dict(name=f"handover_probe barrier={barrier}", kernel=handover_probe_kernel,
             args=(buffer, 10), kwargs=dict(BARRIER=barrier, BLOCK=128))
        for barrier in (True, False)
    ]  # fmt: skip


# ----------------------------------------------------------------------------------- report
def report(arch: int) -> list[dict]:
    rows = []
    for launch in captured_launches() + auction_launches() + probe_launches():
        row = dict(name=launch["name"], kernel=launch["kernel"].fn.__name__, arch=arch)
        try:
            compiled = compile_launch(launch["kernel"], launch["args"], launch["kwargs"], arch)
        except Exception as error:  # reported, and failed by the test
            row["error"] = f"{type(error).__name__}: {error}"
            rows.append(row)
            continue
        ptx = compiled.asm["ptx"]
        row.update(ptxas_resources(ptx, arch))
        row["shared"] = compiled.metadata.shared
        row["shared_limit"] = SHARED_MEMORY_LIMIT[arch]
        row["num_warps"] = compiled.metadata.num_warps
        row["ptx_barriers"] = len(re.findall(r"\b(?:bar|barrier)\.sync\b", ptx))
        row["unordered_handovers"] = unordered_handovers(compiled.asm["ttgir"])
        # The grid barrier's arrivals: each must be one thread's (a predicated instruction),
        # or a program would add its thread count to the counter and pass the barrier early.
        row["release_atomics"] = re.findall(r"^\s*(\S.*atom\.global\S*release\S*.*)$", ptx, re.M)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, required=True, choices=sorted(SHARED_MEMORY_LIMIT))
    parser.add_argument("--out", type=Path, required=True)
    arguments = parser.parse_args()
    arguments.out.write_text(json.dumps(report(arguments.arch), indent=1))


if __name__ == "__main__":
    main()
