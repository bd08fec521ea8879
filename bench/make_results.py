"""Turns pytest-benchmark JSON files into bench/RESULTS.md and bench/time_vs_n.png.

    pytest bench --benchmark-json bench/results/cpu.json
    python bench/make_results.py bench/results/cpu.json [more.json ...]

Every benchmark case carries its op, provider, sizes and quality in ``extra_info`` (see
_bench_utils.record); this script only groups and formats them. Nothing here is typed in by
hand: rerun it after every benchmark run.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
OP_ORDER = [
    "cost_matrix",
    "sinkhorn",
    "assignment",
    "assignment_after_sinkhorn",
    "pair_exact",
    "linear_sum_assignment",
    "pair",
    "torchcfm_sample_plan",
    "pair_tol",
    "train_step",
    "sinkhorn_divergence",
]
PLOTTED_OPS = ["cost_matrix", "sinkhorn", "assignment", "pair"]
QUALITY = [("n_iter", "iterations", "{:d}"), ("marginal_error", "marginal error", "{:.1e}"),
           ("gap_closed", "gap closed", "{:.1%}"), ("distinct_targets", "distinct", "{:.0%}"),
           ("compile_s", "compile s", "{:.1f}"), ("pair_share", "pair share", "{:.1%}"),
           ("steps_per_s", "steps/s", "{:.2f}"), ("gflops", "GFLOP/s", "{:.1f}"),
           ("ns_per_entry_iteration", "ns/entry/iter", "{:.3g}"),
           ("n_bids", "auction bids", "{:,}"), ("inputs", "inputs", "{}"),
           ("value_error", "value error", "{:.1e}"), ("gradient_error", "gradient error", "{:.1e}"),
           ("peak_memory_mib", "peak MiB", "{:.0f}"),
           ("cost_matrices_mib", "cost matrices MiB", "{:.0f}")]  # fmt: skip


def load(paths: list[Path]) -> tuple[list[dict], dict]:
    cases, machine = [], {}
    for path in paths:
        data = json.loads(path.read_text())
        machine = data.get("machine_info", machine)
        machine["datetime"] = data.get("datetime")
        machine["commit"] = (data.get("commit_info") or {}).get("id")
        for bench in data["benchmarks"]:
            info = bench.get("extra_info", {})
            if "op" not in info:
                continue
            stats = bench["stats"]
            cases.append({**info, "median_ms": 1e3 * stats["median"], "iqr_ms": 1e3 * stats["iqr"],
                          "min_ms": 1e3 * stats["min"], "max_ms": 1e3 * stats["max"],
                          "rounds": stats["rounds"]})  # fmt: skip
    return cases, machine


def is_ours(provider: str) -> bool:
    return provider.startswith("eotfast")


# Ops whose peers are compared with one eotfast provider (its defaults), not the fastest: the
# loss's looser-tolerance provider is recorded for its accuracy, not as the speed reference.
COUNTERPART = {"sinkhorn_divergence": "eotfast"}


def counterpart(case: dict, ours: list[dict]) -> dict | None:
    """The eotfast case a peer is compared with: COUNTERPART's for its op; the same kind of
    pairing for `pair` (exact with exact, Sinkhorn with Sinkhorn; random pairs are a baseline,
    never a counterpart); else the fastest eotfast provider on the same inputs."""
    if case["op"] in COUNTERPART:
        named = [c for c in ours if c["provider"] == COUNTERPART[case["op"]]]
        return named[0] if named else None
    candidates = [c for c in ours if "random" not in c["provider"]]
    for kind in ("exact", "sinkhorn"):
        if kind in case["provider"]:
            same_kind = [c for c in candidates if kind in c["provider"]]
            candidates = same_kind or candidates
            break
    return min(candidates, key=lambda c: c["median_ms"]) if candidates else None


def fmt_ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def machine_lines(machine: dict) -> list[str]:
    cpu = machine.get("cpu", {})
    versions = machine.get("library_versions", {})
    lines = [
        f"- CPU: {cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} logical cores "
        f"(torch threads: {machine.get('torch_threads', '?')}); GPU: "
        f"{machine.get('cuda_device') or 'none'}",
        f"- {machine.get('system', '')} {machine.get('release', '')}, Python "
        f"{machine.get('python_version', '?')}; run {machine.get('datetime', '?')}, commit "
        f"{(machine.get('commit') or '?')[:10]}",
        "- " + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
    ]
    return lines


def op_section(op: str, cases: list[dict]) -> list[str]:
    lines = [f"## {op}", ""]
    by_size = defaultdict(list)
    for case in cases:
        by_size[(case["n"], case["d"], case["batch"])].append(case)
    quality_keys = [q for q in QUALITY if any(q[0] in c for c in cases)]
    header = ["n", "d", "batch", "provider", "median ms", "IQR ms", "min-max ms", "rounds",
              "eotfast speed-up"] + [q[1] for q in quality_keys]  # fmt: skip
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for (n, d, batch), group in sorted(by_size.items()):
        ours = [c for c in group if is_ours(c["provider"])]
        for case in sorted(group, key=lambda c: c["median_ms"]):
            reference = None if is_ours(case["provider"]) else counterpart(case, ours)
            speedup = (
                ""
                if reference is None
                else (
                    f"{case['median_ms'] / reference['median_ms']:.1f}x vs {reference['provider']}"
                )
            )
            row = [str(n), str(d), str(batch), case["provider"], fmt_ms(case["median_ms"]),
                   fmt_ms(case["iqr_ms"]), f"{fmt_ms(case['min_ms'])}-{fmt_ms(case['max_ms'])}",
                   str(case["rounds"]), speedup]  # fmt: skip
            for key, _, spec in quality_keys:
                value = case.get(key)
                if isinstance(value, list):  # one per problem of the batch: their mean
                    value = round(sum(value) / len(value))
                row.append("" if value is None or value == -1 else spec.format(value))
            lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def tolerance_section(cases: list[dict]) -> list[str]:
    """pair vs tol: eotfast.pair's Sinkhorn over its stopping tolerance, one row per
    (sampling, tol), loosest tolerance first."""
    lines = ["## pair vs tol", "",
             "`eotfast.pair(x, y, \"sinkhorn\", tol=tol, sampling=...)`, everything else at its "
             "default; iterations and marginal error ||P^T 1 - b||_2: `eotfast.sinkhorn` on the "
             "same cost with the same settings.", ""]  # fmt: skip
    header = ["n", "d", "sampling", "tol", "iterations", "marginal error", "median ms",
              "IQR ms", "min-max ms", "auction bids", "gap closed", "distinct"]  # fmt: skip
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for case in sorted(cases, key=lambda c: (c["n"], c["d"], c["sampling"], -c["tol"])):
        row = [str(case["n"]), str(case["d"]), case["sampling"], f"{case['tol']:g}",
               str(case["n_iter"]), f"{case['marginal_error']:.1e}", fmt_ms(case["median_ms"]),
               fmt_ms(case["iqr_ms"]), f"{fmt_ms(case['min_ms'])}-{fmt_ms(case['max_ms'])}",
               str(case["n_bids"]) if case["n_bids"] >= 0 else "-",
               f"{case['gap_closed']:.1%}",
               f"{case['distinct_targets']:.0%}"]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def plot(cases: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in PLOTTED_OPS if any(c["op"] == op for c in cases)]
    figure, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), squeeze=False)
    for axis, op in zip(axes[0], ops, strict=True):
        series = defaultdict(list)
        for case in cases:
            if case["op"] == op and case["batch"] == 1 and case["d"] == 3072:
                series[case["provider"]].append((case["n"], case["median_ms"]))
        for provider, points in sorted(series.items()):
            points.sort()
            style = "-o" if is_ours(provider) else "--x"
            axis.plot(*zip(*points, strict=True), style, label=provider)
        axis.set(xscale="log", yscale="log", xlabel="n (= m), d = 3072, batch 1",
                 ylabel="median time (ms)", title=op)  # fmt: skip
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON files")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--plot", type=Path, default=HERE / "time_vs_n.png")
    args = parser.parse_args()
    cases, machine = load(args.json)
    if not cases:
        raise SystemExit("no eotfast benchmark cases (with extra_info 'op') in the JSON files")
    lines = ["# Benchmark results", "",
             f"Generated by `python bench/make_results.py {' '.join(str(p) for p in args.json)}`"
             " from a `pytest bench --benchmark-json` run; do not edit by hand.", "",
             "Machine:", "", *machine_lines(machine), "",
             "Times are medians over the rounds (spread: IQR and min-max). \"eotfast speed-up\" is "
             "a peer's median over the median of its eotfast counterpart on the same inputs "
             "(the fastest eotfast provider; for pair, the one of the same kind: exact vs "
             "exact, Sinkhorn vs Sinkhorn); > 1: eotfast is faster. The VM's timings move by "
             "up to ~20% between runs. Quality: marginal error ||P^T 1 - b||_2 of the provider's "
             "plan (1e-4 is the common stopping rule; POT solve_batch has its own test and "
             "GeomLoss a fixed annealing schedule: the error they reached); gap closed = share "
             "of the random-to-exact transport-cost gap closed by the "
             "pairs; distinct = share of distinct targets. Throughput: GFLOP/s = 2 batch n m d "
             "/ median (the multiply-adds of the cost matrix's GEMM form); ns/entry/iter = "
             "median / (batch n m iterations), an iteration sweeping the cost twice.", "",
             f"![time vs n]({args.plot.name})", ""]  # fmt: skip
    for op in OP_ORDER:
        op_cases = [c for c in cases if c["op"] == op]
        if op_cases:
            lines += tolerance_section(op_cases) if op == "pair_tol" else op_section(op, op_cases)
    args.out.write_text("\n".join(lines))
    plot(cases, args.plot)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
