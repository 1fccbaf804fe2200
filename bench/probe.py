"""How long `agent-machine probe --format json` takes, as a whole process, and where the time goes.

    python bench/probe.py [--runs 15] [--json]

Measured side by side in one run, alternating so that load changes hit every
variant alike:

* ``probe``: the console script ``agent-machine probe --format json`` (the
  target: median <= 0.3 s);
* ``version``: ``agent-machine version`` — the same interpreter, CLI and
  package imports without the probe (what the probe itself adds is the
  difference);
* ``python -c pass``: interpreter start-up alone.

Then, in child processes, the import cost of what the probe loads (pydantic
and the MachineProfile models, the sub-probe modules), and in this process the
median time of each sub-probe (warm: imports done, `probe(timings=...)`), and
of each external command the probe runs; last, our CPU sub-probe beside
py-cpuinfo's ``get_cpu_info()`` (REFERENCE.md section 3: it forks and takes
about a second). The load average is printed before
and after: the machine is shared, and figures taken under load say so.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_S = 0.3


def console_script() -> list[str]:
    """The installed entry point next to this interpreter (not a pyenv shim), else PATH's."""
    here = Path(sys.executable).parent / "agent-machine"
    if here.exists():
        return [str(here)]
    found = shutil.which("agent-machine")
    if found:
        return [found]
    return [sys.executable, "-m", "nodeagent.cli"]


def timed(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.decode()[-400:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


CPU_SIDE_BY_SIDE = """
import time
t0 = time.perf_counter()
import cpuinfo
t1 = time.perf_counter()
cpuinfo.get_cpu_info()
t2 = time.perf_counter()
from nodeagent.probe import cpu, System
t3 = time.perf_counter()
cpu.probe_cpu(System())
t4 = time.perf_counter()
print(t1 - t0, t2 - t1, t4 - t3)
"""

IMPORT_PROBE = """
import time
t0 = time.perf_counter()
import nodeagent.cli
t1 = time.perf_counter()
import pydantic, nodeagent.contracts.base
t2 = time.perf_counter()
import nodeagent.contracts.machine
t3 = time.perf_counter()
from nodeagent.probe import amd, asahi, cpu, host, memory, nvidia, recommend, runtime, storage, vulkan
t4 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2, t4 - t3)
"""


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15, help="whole-process runs per variant (>= 10)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    runs = max(10, args.runs)
    script = console_script()
    load_before = os.getloadavg()

    variants = {
        "probe": script + ["probe", "--format", "json"],
        "version": script + ["version"],
        "python -c pass": [sys.executable, "-c", "pass"],
    }
    for argv in variants.values():  # warm the page cache and bytecode
        timed(argv)
    walls: dict[str, list[float]] = {k: [] for k in variants}
    cpus: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(runs):
        for name, argv in variants.items():
            wall, cpu = timed(argv)
            walls[name].append(wall)
            cpus[name].append(cpu)

    imports: list[list[float]] = []
    for _ in range(max(5, runs // 2)):
        out = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, check=True)
        imports.append([float(x) for x in out.stdout.split()])
    import_names = ["nodeagent + CLI", "pydantic + contracts.base", "MachineProfile models", "sub-probe modules"]

    from nodeagent.probe import commands, probe
    from nodeagent.probe.system import run_command

    sections: dict[str, list[float]] = {}
    in_process: list[float] = []
    probe()  # warm
    for _ in range(runs):
        timings: dict[str, float] = {}
        start = time.perf_counter()
        probe(timings=timings)
        in_process.append(time.perf_counter() - start)
        for key, value in timings.items():
            sections.setdefault(key, []).append(value)
    tools: dict[str, list[float]] = {}
    for argv, timeout in commands.ALL:
        for _ in range(5):
            start = time.perf_counter()
            run_command(argv, timeout)
            tools.setdefault(" ".join(argv), []).append(time.perf_counter() - start)
    cpu_rows: list[list[float]] = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", CPU_SIDE_BY_SIDE], capture_output=True, text=True, check=True)
        cpu_rows.append([float(x) for x in out.stdout.split()])
    load_after = os.getloadavg()

    probe_median = median(walls["probe"])
    print(f"agent-machine probe --format json: {runs} runs each, alternating; script {' '.join(script)}")
    print(f"load average before {load_before[0]:.2f} / after {load_after[0]:.2f} on {os.cpu_count()} CPUs"
          + ("  (busy machine: figures are inflated)" if max(load_before[0], load_after[0]) > 0.5 * (os.cpu_count() or 1)
             else ""))
    print()
    print(f"{'whole process':<28}{'median wall':>14}{'min':>12}{'max':>12}{'median CPU':>14}")
    for name in variants:
        print(f"{name:<28}{ms(median(walls[name])):>14}{ms(min(walls[name])):>12}{ms(max(walls[name])):>12}"
              f"{ms(median(cpus[name])):>14}")
    print()
    print(f"probe / target {TARGET_S:.1f} s          {probe_median / TARGET_S:6.2f}x  "
          f"({'meets' if probe_median <= TARGET_S else 'misses'} the target)")
    print(f"probe / version              {probe_median / median(walls['version']):6.2f}x  "
          f"(probe adds {ms(probe_median - median(walls['version'])).strip()})")
    print(f"probe / python -c pass       {probe_median / median(walls['python -c pass']):6.2f}x")
    print()
    print("where the time goes (medians)")
    print(f"  {'interpreter start (python -c pass)':<40}{ms(median(walls['python -c pass']))}")
    for i, name in enumerate(import_names):
        print(f"  {'import ' + name:<40}{ms(median([row[i] for row in imports]))}")
    print(f"  {'probe() in process, warm':<40}{ms(median(in_process))}")
    for key in sorted(sections, key=lambda k: -median(sections[k])):
        print(f"    {key:<38}{ms(median(sections[key]))}")
    print("  external commands (run concurrently by the probe; the summary only when the full text fails)")
    for key, values in tools.items():
        print(f"    {key:<38}{ms(median(values))}")
    ours, theirs = median([r[2] for r in cpu_rows]), median([r[1] for r in cpu_rows])
    print(f"cpu sub-probe vs py-cpuinfo (3 child processes, medians): ours {ms(ours).strip()}; "
          f"`import cpuinfo` {ms(median([r[0] for r in cpu_rows])).strip()} (forks `file -b`), "
          f"get_cpu_info() {ms(theirs).strip()} -> {theirs / ours:,.0f}x")
    if args.json:
        print(json.dumps({
            "runs": runs, "load_before": load_before, "load_after": load_after,
            "whole_process_median_s": {k: median(v) for k, v in walls.items()},
            "whole_process_cpu_median_s": {k: median(v) for k, v in cpus.items()},
            "imports_median_s": {n: median([row[i] for row in imports]) for i, n in enumerate(import_names)},
            "probe_in_process_median_s": median(in_process),
            "sections_median_s": {k: median(v) for k, v in sections.items()},
            "commands_median_s": {k: median(v) for k, v in tools.items()},
            "cpu_probe_vs_py_cpuinfo_s": {"ours": ours, "get_cpu_info": theirs},
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
