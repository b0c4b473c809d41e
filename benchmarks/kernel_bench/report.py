"""The markdown report: a header line, the main table (one row per kernel and direction), the
"Every peer" table, notes and errors. benchmarks/README.md describes the columns; RESULTS.md and
tests/test_benchmarks.py parse them, so their names and cell formats do not change."""

from __future__ import annotations

import math

from .case import DIRECTIONS, PEERS, Case
from .measure import Result

COPY_CEILING_GBS = 3000.0  # H100 device-to-device copy, bytes read + written (BENCHMARKS.md)
MATMUL_CEILING_TFLOPS = 742.0  # H100 bf16 matmul 8192^3 (BENCHMARKS.md)
BAD_REL_ERR = 1e-2  # bf16 results land between 1e-3 and 1e-2 of a float64 reference; above is wrong

MAIN_COLUMNS = (
    ["kernel", "shape", "direction"]
    + [f"{p} wall (eager)" for p in PEERS]
    + [f"{p} GPU (graph)" for p in PEERS]
    + [
        "ligerzoo vs liger (speedup, wall)", "ligerzoo vs liger (GPU)",
        "ligerzoo GB/s or TFLOP/s (% ceiling), wall", "ligerzoo GB/s or TFLOP/s (% ceiling), GPU",
        "peak extra MiB (eager / compile / liger / ligerzoo)", "memory basis",
        "rel err ligerzoo (worst tensor)",
    ]
)  # fmt: skip
PEER_COLUMNS = [
    "kernel", "direction", "floor", "peer", "wall (eager)", "x floor", "GB/s or TFLOP/s (% ceiling)",
    "GPU (graph)", "GPU x floor", "GPU GB/s or TFLOP/s (% ceiling)", "peak extra MiB",
    "peak extra minus grad outputs MiB", "rel err vs float64 (each output / grad)",
    "first call s",
]  # fmt: skip
GENERAL_NOTES = [
    (
        "fwd rows: inputs that do not require grad (an inference forward); fwd+bwd rows: one forward and "
        "its backward, gradients set to None before each call."
    ),
    (
        "floor: bytes (each input read once, each output written once, per pass) at "
        f"{COPY_CEILING_GBS:.0f} GB/s, or the matmul flops at {MATMUL_CEILING_TFLOPS:.0f} TFLOP/s."
    ),
    f"rel err: ||out - ref|| / ||ref|| against float64; BAD above {BAD_REL_ERR:.0e} or NaN.",
    (
        "wall (eager): median wall time of eager calls, host work included (Python, autograd, kernel "
        "launches; the backward runs on autograd's device thread); for the small kernels this is mostly "
        "host overhead. GPU (graph): median of replays of the call captured in one CUDA graph (forward "
        "and backward together for fwd+bwd): the GPU work alone. n/c: not capturable (see Errors); "
        "— in a dry run."
    ),
    (
        "ligerzoo vs liger: liger's median over ligerzoo's (above 1: ligerzoo is faster), from the wall "
        "times and from the GPU times."
    ),
]
COMPILE_NOTE = (
    "compile: torch.compile(eager function, dynamic=False), Dynamo reset before each kernel; "
    "its first call s is the compile time."
)

Results = dict  # (case name, direction, peer) -> Result


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def fmt_ms(ms):
    if ms is None:
        return "—"
    return f"{ms:.3f} ms" if ms < 10 else f"{ms:.2f} ms"


def fmt_rate(case: Case, direction: str, ms) -> str:
    """Achieved GB/s or TFLOP/s and its % of the ceiling."""
    if ms is None:
        return "—"
    amount = case.work(direction)
    if case.unit == "TFLOP/s":
        rate = amount / (ms * 1e-3) / 1e12
        return f"{rate:.0f} TFLOP/s ({100 * rate / MATMUL_CEILING_TFLOPS:.0f}%)"
    rate = amount / (ms * 1e-3) / 1e9
    return f"{rate:.0f} GB/s ({100 * rate / COPY_CEILING_GBS:.0f}%)"


def floor_ms(case: Case, direction: str) -> float:
    amount = case.work(direction)
    if case.unit == "TFLOP/s":
        return amount / (MATMUL_CEILING_TFLOPS * 1e12) * 1e3
    return amount / (COPY_CEILING_GBS * 1e9) * 1e3


def fmt_err(e):
    if e is None:
        return "—"
    if math.isnan(e):
        return "NaN BAD"
    return f"{e:.1e}" + (" BAD" if e > BAD_REL_ERR else "")


def worst_err(errs: dict):
    """(name, error) of the worst tensor, NaN worst of all; (None, None) if there are none."""
    if not errs:
        return None, None
    name = max(errs, key=lambda n: (math.isnan(errs[n]), errs[n]))
    return name, errs[name]


def short_error(msg: str, n=48) -> str:
    if "not importable" in msg:
        return "n/a: " + msg.split(" (")[0]
    msg = cell(msg)
    return "ERR: " + (msg if len(msg) <= n else msg[: n - 1] + "…")


def wall_cell(r: Result | None) -> str:
    if r is None:
        return "—"
    if r.error is not None:
        return short_error(r.error)
    return fmt_ms(r.ms)


def graph_cell(r: Result | None) -> str:
    if r is None or r.error is not None:
        return "—"
    if r.graph_error is not None:
        return "n/c" if r.graph_error.startswith("n/c") else "ERR"
    return fmt_ms(r.graph_ms)


def memory_cell(case: Case, direction: str, r: Result | None) -> str:
    if r is None or r.error is not None or r.peak_mib is None:
        return "—"
    v = r.peak_excl_grads_mib if (case.excl_grads_in_table and direction != "fwd") else r.peak_mib
    return f"{v:.0f}"


def memory_basis(case: Case, direction: str) -> str:
    if direction == "fwd":
        return "incl. outputs"
    if case.excl_grads_in_table:
        return "excl. grad outputs (" + "+".join("d" + k for k in case.grad_inputs) + ")"
    return "incl. grads"


def table_lines(columns) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def main_row(case: Case, direction: str, rs: dict) -> list[str]:
    """One kernel and direction: every peer's times and memory, ligerzoo's speedup, rate and error."""
    zoo, lig = rs["ligerzoo"], rs["liger"]
    timed = lambda r: r is not None and r.error is None and r.ms
    graphed = lambda r: r is not None and r.error is None and r.graph_ms
    speed = f"{lig.ms / zoo.ms:.2f}x" if timed(zoo) and timed(lig) else "—"
    gspeed = f"{lig.graph_ms / zoo.graph_ms:.2f}x" if graphed(zoo) and graphed(lig) else "—"
    rate = fmt_rate(case, direction, zoo.ms) if timed(zoo) else "—"
    grate = fmt_rate(case, direction, zoo.graph_ms) if graphed(zoo) else "—"
    mem = " / ".join(memory_cell(case, direction, rs[p]) for p in PEERS)
    err = "—"
    if timed(zoo) or (zoo is not None and zoo.rel_errs):
        n, e = worst_err(zoo.rel_errs)
        err = f"{fmt_err(e)} ({n})" if n else "—"
    row = [cell(case.label), cell(case.shape), cell(direction)] + [wall_cell(rs[p]) for p in PEERS]
    row += [graph_cell(rs[p]) for p in PEERS]
    return row + [speed, gspeed, rate, grate, mem, memory_basis(case, direction), err]


def peer_row(case: Case, direction: str, peer: str, r: Result) -> list[str]:
    """One kernel, direction and peer: times against the floor, rates, memory, each tensor's error."""
    fl = floor_ms(case, direction)
    ms = r.ms if r.error is None else None
    gms = r.graph_ms if r.error is None else None
    pk = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "—"
    pkx = "—"
    if r.peak_excl_grads_mib is not None and direction != "fwd":
        pkx = f"{r.peak_excl_grads_mib:.0f}"
    errs = ", ".join(f"{n} {fmt_err(e)}" for n, e in r.rel_errs.items()) or "—"
    if r.error is not None:
        errs = errs if r.rel_errs else short_error(r.error)
    first = f"{r.first_call_s:.2f}" if r.first_call_s is not None else "—"
    row = [case.label, direction, fmt_ms(fl), peer, fmt_ms(ms), f"{ms / fl:.2f}" if ms else "—"]
    row += [fmt_rate(case, direction, ms), graph_cell(r), f"{gms / fl:.2f}" if gms else "—"]
    row += [fmt_rate(case, direction, gms), pk, pkx, errs, first]
    return [cell(x) for x in row]


def main_rows(cases: list[Case], results: Results) -> list[str]:
    out = []
    for case in cases:
        for d in DIRECTIONS:
            rs = {p: results.get((case.name, d, p)) for p in PEERS}
            if any(r is not None for r in rs.values()):
                out.append("| " + " | ".join(main_row(case, d, rs)) + " |")
    return out


def build_report(cases: list[Case], results: Results, header: str, peers) -> str:
    out = [header, "", *table_lines(MAIN_COLUMNS), *main_rows([c for c in cases if c.table is None], results)]
    # Cases of another kind (their peers defined otherwise) in a table of their own, the same columns.
    for title in dict.fromkeys(c.table for c in cases if c.table is not None):
        titled = [c for c in cases if c.table == title]
        out += ["", f"## {title}", "", *table_lines(MAIN_COLUMNS), *main_rows(titled, results)]

    out += ["", "## Every peer", "", *table_lines(PEER_COLUMNS)]
    errors = {}  # message -> the rows it hit
    for case in cases:
        for d in DIRECTIONS:
            for p in PEERS:
                r = results.get((case.name, d, p))
                if r is None:
                    continue
                if r.error is not None:
                    errors.setdefault(r.error, []).append(f"{case.label} {d} {p}")
                elif r.graph_error is not None:
                    errors.setdefault(r.graph_error, []).append(f"{case.label} {d} {p} (GPU time)")
                out.append("| " + " | ".join(peer_row(case, d, p, r)) + " |")

    case_notes = []
    for case in cases:
        case_notes += [n for n in case.notes if n not in case_notes]
    notes = GENERAL_NOTES + case_notes + ([COMPILE_NOTE] if "compile" in peers else [])
    out += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    if errors:
        out += ["", "## Errors", ""]
        out += [f"- {cell(msg)}: {', '.join(where)}" for msg, where in errors.items()]
    return "\n".join(out) + "\n"
