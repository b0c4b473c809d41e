"""Where a profiled run's device time goes: kernels running, the device idle, and how much of the
collectives' time (NCCL's kernels) no other kernel overlaps, which is what the step waits for;
the kernels themselves, each counted once, by kind and by name; and the device's idle gaps, by
length, the longest with what the host was doing meanwhile.

Read from torch.profiler's Chrome trace (`prof.export_chrome_trace`), whose device events are
{"cat": "kernel" | "gpu_memcpy" | "gpu_memset", "name", "pid" (the device), "ts", "dur"} in
microseconds. FSDP2 runs its all-gathers and reduce-scatters on streams of their own, so a
collective that overlaps compute costs nothing; the exposed part is what prefetching or a faster
link could still win.
"""

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def device_timeline(trace_events: list[dict]) -> list[dict]:
    """For each device in the trace: its window (first device event's start to the last's end),
    the time some event runs, the collectives' time, and their time with nothing else running,
    all in milliseconds. An empty list when the trace holds no device events (a CPU run)."""
    by_device: dict = {}
    for event in _device_events(trace_events):
        kinds = by_device.setdefault(event.get("pid"), ([], []))
        kinds[0 if _is_collective(event.get("name", "")) else 1].append(_span(event))
    timelines = []
    for device, (collectives, others) in sorted(by_device.items(), key=lambda item: str(item[0])):
        collective_spans, other_spans = _merged(collectives), _merged(others)
        everything = _merged(collectives + others)
        collective_time = _length(collective_spans)
        timelines.append({
            "device": device,
            "window_ms": (everything[-1][1] - everything[0][0]) / 1e3,
            "busy_ms": _length(everything) / 1e3,
            "collective_ms": collective_time / 1e3,
            "exposed_collective_ms": (collective_time - _overlap(collective_spans, other_spans)) / 1e3,
        })
    return timelines


def describe(timelines: list[dict]) -> str:
    """A line per device, for the profile's text file."""
    if not timelines:
        return "device timeline: no device events in the trace\n"
    lines = []
    for t in timelines:
        window = t["window_ms"]
        lines.append(
            f"device {t['device']} timeline: {window:.1f} ms from the first kernel to the last; busy "
            f"{t['busy_ms']:.1f} ms, idle {window - t['busy_ms']:.1f} ms; collectives (NCCL) "
            f"{t['collective_ms']:.1f} ms, of which {t['exposed_collective_ms']:.1f} ms "
            f"({100 * t['exposed_collective_ms'] / window if window else 0:.1f}% of the window) with no "
            f"other kernel running")
    return "\n".join(lines) + "\n"


# Kinds of kernel, by what their names contain (the first that matches), for the breakdown.
# cuBLAS's Hopper GEMMs are "nvjet_*" (the FP8 ones here "nvjet_*_qqtst_*_ovscale_*"), cuDNN's
# attention "cudnn_*sdpa*" with helpers "cudnn::fusion::*"; Inductor's kernels are "triton_*"
# (flex_attention's among them unless their names say flex).
KERNEL_KINDS = (
    ("collectives (NCCL)", ("nccl",)),
    ("attention", ("sdpa", "fmha", "flash", "attention", "cudnn::fusion", "flex")),
    ("matrix products (cuBLAS, CUTLASS)", ("nvjet", "gemm", "cutlass", "xmma", "cublas")),
    ("Inductor's generated kernels", ("triton_",)),
    ("PyTorch's own kernels", ("at::", "memcpy", "memset")),
)
OTHER_KIND = "named Triton kernels (ligerzoo's) and the rest"


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, parts in KERNEL_KINDS:
        if any(part in lowered for part in parts):
            return kind
    return OTHER_KIND


def kernel_breakdown(trace_events: list[dict], steps: int) -> list[tuple[str, float, float]]:
    """Each device kernel name's (name, milliseconds a step, calls a step), longest first, from the
    trace's device events: each launch once. (torch.profiler's own table also lists an Inductor-
    launched Triton kernel under its launcher's numbered name, a CPU range that reports the same
    device time.)"""
    totals: dict[str, list[float]] = {}
    for event in _device_events(trace_events):
        total = totals.setdefault(event.get("name", "?"), [0.0, 0])
        total[0] += float(event.get("dur", 0.0))
        total[1] += 1
    rows = [(name, time / 1e3 / steps, count / steps) for name, (time, count) in totals.items()]
    return sorted(rows, key=lambda row: -row[1])


def describe_kernels(rows: list[tuple[str, float, float]], top: int = 30) -> str:
    """The breakdown as text: by kind, then the `top` longest kernels."""
    if not rows:
        return "device kernels: none in the trace\n"
    kinds: dict[str, float] = {}
    for name, ms, _ in rows:
        kind = kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + ms
    lines = [f"device kernels, each launch once, ms a step ({sum(kinds.values()):.1f} in all), by kind:"]
    lines += [f"{ms:9.2f}  {kind}" for kind, ms in sorted(kinds.items(), key=lambda item: -item[1])]
    lines.append(f"the {min(top, len(rows))} longest (ms a step, calls a step):")
    lines += [f"{ms:9.2f} {calls:7.1f}  {_shortened(name)}" for name, ms, calls in rows[:top]]
    return "\n".join(lines) + "\n"


def _shortened(name: str, width: int = 110) -> str:
    """A long kernel name's start and end: Inductor's generated kernels differ only at the end
    (`triton_red_fused_..._mul_5`), C++ templates' at the start."""
    return name if len(name) <= width else f"{name[:width // 2]}...{name[3 - width // 2:]}"


# Gap lengths, in microseconds, that the idle time is summed by: a few microseconds between two
# kernels is launch latency a CUDA graph would remove; hundreds is the host falling behind or waiting.
GAP_BUCKETS_US = (10.0, 100.0, 1000.0)


def idle_gaps(trace_events: list[dict], steps: int, top: int = 10) -> dict:
    """The first device's idle time between its first event and its last: summed by gap length
    (`GAP_BUCKETS_US`), in ms a step; and the `top` longest gaps, each with the kernels either side,
    the host operator that launched the kernel after it (matched by the trace's correlation ids)
    and the CUDA runtime and driver calls other than launches made during it (a synchronize, a
    malloc)."""
    device_events = sorted(_device_events(trace_events), key=_span)
    if not device_events:
        return {"buckets": [], "longest": []}
    first_device = device_events[0].get("pid")
    device_events = [event for event in device_events if event.get("pid") == first_device]
    gaps, reach, previous = [], None, None
    for event in device_events:
        start, end = _span(event)
        if reach is not None and start > reach:
            gaps.append((start - reach, reach, previous, event))
        if reach is None or end >= reach:
            reach, previous = end, event
    bounds = (0.0, *GAP_BUCKETS_US, float("inf"))
    buckets = []
    for low, high in zip(bounds, bounds[1:]):
        lengths = [length for length, *_ in gaps if low <= length < high]
        buckets.append((low, high, len(lengths) / steps, sum(lengths) / 1e3 / steps))
    # Triton's launches are driver calls (cuLaunchKernel), cuBLAS's and PyTorch's runtime calls.
    runtime = _complete_events(trace_events, "cuda_runtime", "cuda_driver")
    operators = _complete_events(trace_events, "cpu_op")
    calls_by_correlation = {event.get("args", {}).get("correlation"): event for event in runtime}
    longest = []
    for length, start, before, after in sorted(gaps, key=lambda gap: -gap[0])[:top]:
        launch = calls_by_correlation.get(after.get("args", {}).get("correlation"))
        longest.append({
            "us": length, "at_ms": (start - _span(device_events[0])[0]) / 1e3,
            "before": before.get("name", "?"), "after": after.get("name", "?"),
            "launched_by": _innermost(operators, launch) if launch else None,
            "host_calls": sorted({event.get("name", "?") for event in runtime
                                  if "Launch" not in event.get("name", "")
                                  and _overlaps(event, start, start + length)}),
        })
    return {"buckets": buckets, "longest": longest}


def describe_gaps(gaps: dict) -> str:
    if not gaps["buckets"]:
        return "idle gaps: no device events in the trace\n"
    lines = ["idle gaps of the first device, by length (gaps a step, ms a step):"]
    for low, high, count, ms in gaps["buckets"]:
        span = f">= {low:.0f} us" if high == float("inf") else f"{low:.0f}-{high:.0f} us"
        lines.append(f"{ms:9.2f} {count:7.1f}  {span}")
    lines.append("the longest (us, ms into the trace, kernel before -> kernel after; the operator that "
                 "launched it; runtime calls during it):")
    for gap in gaps["longest"]:
        lines.append(f"{gap['us']:9.0f} {gap['at_ms']:9.2f}  {gap['before'][:50]} -> {gap['after'][:50]}; "
                     f"{gap['launched_by'] or '?'}; {', '.join(gap['host_calls']) or '-'}")
    return "\n".join(lines) + "\n"


def _complete_events(trace_events: list[dict], *categories: str) -> list[dict]:
    """The trace's complete events ("ph": "X", a start and a duration) of the given categories."""
    return [event for event in trace_events if event.get("ph") == "X" and event.get("cat") in categories]


def _device_events(trace_events: list[dict]) -> list[dict]:
    """The events that ran on a device (kernels, copies, fills)."""
    return _complete_events(trace_events, *DEVICE_CATEGORIES)


def _span(event: dict) -> tuple[float, float]:
    """(start, end) in microseconds."""
    start = float(event["ts"])
    return start, start + float(event.get("dur", 0.0))


def _innermost(operators: list[dict], call: dict) -> str | None:
    """The shortest host operator on the call's thread whose span holds the call."""
    at = _span(call)[0]
    holding = [event for event in operators if event.get("tid") == call.get("tid")
               and event.get("pid") == call.get("pid") and _overlaps(event, at, at)]
    return min(holding, key=lambda event: float(event.get("dur", 0.0)))["name"] if holding else None


def _overlaps(event: dict, start: float, end: float) -> bool:
    event_start, event_end = _span(event)
    return event_start <= end and event_end >= start


def _is_collective(name: str) -> bool:
    return "nccl" in name.lower()


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of intervals, as sorted disjoint intervals."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


def _length(spans: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in spans)


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """The time two unions of sorted disjoint intervals share."""
    shared, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        shared += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return shared
