"""Where a profiled run's device time goes: kernels running, the device idle, and how much of the
collectives' time (NCCL's kernels) no other kernel overlaps, which is what the step waits for.

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
    for event in trace_events:
        if event.get("ph") == "X" and event.get("cat") in DEVICE_CATEGORIES:
            start = float(event["ts"])
            interval = (start, start + float(event.get("dur", 0.0)))
            kinds = by_device.setdefault(event.get("pid"), ([], []))
            kinds[0 if _is_collective(event.get("name", "")) else 1].append(interval)
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
