#!/usr/bin/env python3
"""The README's benchmark tables, rendered from the committed results files.

    python3 bench/tables.py                   # rewrite every README block from bench/results/
    python3 bench/tables.py daemon --check    # exit 1 if the README's block is not the rendering

Each table lives in README.md between ``<!-- bench:NAME:begin ...-->`` and
``<!-- bench:NAME:end -->`` and is produced only here, from ``bench/results/NAME.json``:
``scripts/bench.sh`` and ``scripts/bench-guest.sh`` call this after a run (and with
``--render-only`` without one), and tests/unit/test_readme_tables.py fails when the README's
block differs from what this module renders from the committed file.

Every block states where its figures come from: the commit, the date, the machine and CPU
placement, the load, and the command-line options and settings (sandbox, seccomp, cache,
thread pool) of every daemon.  Results written before the benchmarks recorded their settings
get them derived from the recorded command lines and the daemons' defaults, and the block says
so; daemons that ran with different settings are named, in bold, above the table.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
README = REPO / "README.md"
TABLES = ("daemon", "guest")
SETTING_KEYS = ("sandbox", "seccomp", "cache", "thread_pool_size")
LABEL = {"py": "pyvirtiofsd", "rust": "Rust virtiofsd", "c": "C virtiofsd (QEMU 7.2)"}
# What each daemon did when an option was not given, for results files that recorded only
# command lines (virtiofsd --help of the Rust 1.13.2 and QEMU 7.2 ones; pyvirtiofsd's defaults
# when those files were written: its seccomp default became kill later, and every newer file
# records its settings).  The C virtiofsd's seccomp filter cannot be turned off.
DEFAULTS = {
    "py": {"sandbox": "namespace", "seccomp": "none", "cache": "auto", "thread_pool_size": 0},
    "rust": {"sandbox": "namespace", "seccomp": "kill", "cache": "auto", "thread_pool_size": 0},
    "c": {"sandbox": "namespace", "seccomp": "kill", "cache": "auto", "thread_pool_size": 0},
}


# ----------------------------------------------------------------------------------------
# Provenance helpers (also used by the benchmarks when they write their results)
# ----------------------------------------------------------------------------------------

def git_commit(repo: Path = REPO) -> str | None:
    """The checked-out commit, with "-dirty" when the work tree has uncommitted changes."""
    r = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty",
                        "--abbrev=12"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                       text=True)
    return r.stdout.strip() or None


def pyvirtiofs_build(python: str = sys.executable) -> str | None:
    """Which request path pyvirtiofsd runs (mypyc-compiled or pure Python), as the daemon's
    own ``--version`` says it: the same interpreter and source tree the benchmark starts."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO / "src"), env.get("PYTHONPATH")) if x)
    try:
        out = subprocess.run([python, "-m", "pyvirtiofs", "--version"], capture_output=True,
                             text=True, timeout=60, env=env).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.startswith("request path:"):
            return line.split(":", 1)[1].strip()
    return None


def build_text(m: dict) -> str:
    """The sentence saying which pyvirtiofsd build a run measured."""
    b = m.get("pyvirtiofs_build")
    return (f" pyvirtiofsd's request path: {b}." if b
            else " Which pyvirtiofsd build ran (compiled or pure Python) was not recorded.")


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------------------
# Daemon settings, from what the results file recorded
# ----------------------------------------------------------------------------------------

def settings_from_argv(kind: str, argv: list[str]) -> dict:
    """Sandbox, seccomp, cache and thread pool of a daemon started with ``argv``: the options
    it was given, the daemon's defaults for the rest."""
    out = dict(DEFAULTS[kind])
    opts: list[tuple[str, str]] = []
    i = 1
    while i < len(argv):
        a = argv[i]
        if a == "-o" and i + 1 < len(argv):            # C virtiofsd: -o key=value[,key=value]
            for kv in argv[i + 1].split(","):
                k, _, v = kv.partition("=")
                opts.append((k, v))
            i += 2
            continue
        if a.startswith("--"):
            k, eq, v = a[2:].partition("=")
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                v = argv[i + 1]
                i += 1
            opts.append((k, v))
        i += 1
    for k, v in opts:
        if k in ("sandbox", "seccomp"):
            out[k] = v
        elif k == "cache":
            out[k] = "never" if v == "none" else v
        elif k == "thread-pool-size":
            out["thread_pool_size"] = int(v)
    if kind == "c":
        out["seccomp"] = "kill"      # always on, whatever the command line says
    return out


def daemon_settings(kind: str, entry: dict) -> tuple[dict, bool]:
    """(settings, recorded): the settings the results file recorded for a daemon, or, for
    files written before the benchmarks recorded them, those derived from its argv."""
    if "settings" in entry:
        return {k: entry["settings"][k] for k in SETTING_KEYS}, True
    return settings_from_argv(kind, entry["argv"]), False


def options_shown(kind: str, argv: list[str]) -> str:
    """The command line without the binary, the socket and the shared directory's path."""
    shown = []
    skip = False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if i == 0 or (kind == "py" and a in ("-m", "pyvirtiofs") and i <= 2):
            continue
        if a.startswith(("--socket-path", "--shared-dir")):
            skip = "=" not in a
            continue
        if a == "-o" and i + 1 < len(argv) and argv[i + 1].startswith("source="):
            skip = True
            continue
        shown.append(a)
    return " ".join(shown)


def settings_section(entries: dict[str, tuple[str, dict]]) -> list[str]:
    """entries: key -> (kind, results entry with 'argv').  Lines stating every daemon's
    settings and options, and, in bold, which settings differ between them."""
    settings = {}
    derived = False
    for key, (kind, entry) in entries.items():
        settings[key], recorded = daemon_settings(kind, entry)
        derived |= not recorded
    diffs = [k for k in SETTING_KEYS if len({s[k] for s in settings.values()}) > 1]
    if diffs:
        lines = [f"**Not like for like: the daemons ran with different "
                 f"{' and '.join(k.replace('_', ' ') for k in diffs)} settings.**"]
    else:
        lines = ["Every daemon ran with the same sandbox, seccomp, cache and thread-pool "
                 "settings."]
    if derived:
        lines[-1] += (" This run did not record its settings: they are derived from the "
                      "command lines it recorded and each daemon's defaults.")
    lines += ["", "| daemon | sandbox | seccomp | cache | thread pool | options (socket and "
              "directory left out) |", "|---|---|---|---|---|---|"]
    for key, (kind, entry) in entries.items():
        st = settings[key]
        lines.append(f"| {LABEL[kind]} | {st['sandbox']} | {st['seccomp']} | {st['cache']} | "
                     f"{st['thread_pool_size'] or 'none'} | "
                     f"`{options_shown(kind, entry['argv'])}` |")
    return lines


def like_for_like(entries: dict[str, tuple[str, dict]]) -> bool:
    return len({json.dumps(daemon_settings(kind, e)[0], sort_keys=True)
                for kind, e in entries.values()}) == 1


# ----------------------------------------------------------------------------------------
# The tables
# ----------------------------------------------------------------------------------------

def _num(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return ""
    return f" ({min(values):.2f}–{max(values):.2f})"


def commit_text(commit: str | None) -> str:
    return f"commit `{commit}`" if commit else "a commit this run did not record"


def daemon_entries(res: dict) -> dict[str, tuple[str, dict]]:
    return {k: (k, v) for k, v in res["daemons"].items()}


def _round_ratios(a: dict, b: dict, key: str, single: float) -> str:
    """The median of the per-round ratios and their range (round i of every daemon ran at
    about the same time); ``single`` when there was one round."""
    rs = [x / y for x, y in zip(a.get(key, []), b.get(key, [])) if y]
    if len(rs) < 2:
        return f"{single:.2f}"
    return f"{statistics.median(rs):.2f}{_spread(rs)}"


def render_daemon(res: dict) -> str:
    m = res["meta"]
    d = res["daemons"]
    py, rust = d["py"], d["rust"]
    cpus = ", ".join(str(c) for c in m["cpus_used"])
    if m["placement"] == "same":
        place = (f"the load generator and each daemon pinned to the same CPU ({cpus}), the "
                 "generator sleeping while it waits")
    elif m["placement"] == "split":
        place = f"the load generator and the daemon on different CPUs ({cpus})"
    else:
        place = "nothing pinned"
    rounds = m["repeat"]
    load = [w.get("other_load_cpus") or 0.0 for v in d.values() for w in v["workloads"].values()]
    lines = [
        f"Measured {m['date']} at {commit_text(m.get('commit'))}, on "
        f"{m.get('cpu_model') or 'a CPU model not recorded'} ({m['cpus']} CPUs), kernel {m['kernel']}, Python {m['python']}; {place}. "
        f"{'Median' if rounds > 1 else 'One'} of {rounds} interleaved round{'s' if rounds > 1 else ''}"
        f" of {m['duration_s']:g} s a workload{' (`--quick`)' if m.get('quick') else ''}. "
        f"Other work on that CPU during the workloads: up to {max(load):.2f} CPUs "
        f"(mean {statistics.mean(load):.2f}); load average "
        + (f"{m['loadavg_start'][0]:.1f} before, " if m.get("loadavg_start") else "")
        + f"{m['loadavg_end'][0]:.1f} after." + build_text(m),
        "",
    ]
    lines += settings_section(daemon_entries(res))
    lines += [
        "",
        "Figures: per workload and daemon, the round with the median throughput. Ratios: "
        "pyvirtiofsd's ÷ the Rust virtiofsd's in each round (the rounds interleave the "
        "daemons), their median and, in brackets, their range.",
        "",
        "| workload | py ops/s | Rust ops/s | py/Rust throughput (higher is better) | "
        "py CPU µs/op | Rust CPU µs/op | py/Rust CPU (lower is better) |",
        "|---|---|---|---|---|---|---|",
    ]
    for w, a in py["workloads"].items():
        b = rust["workloads"].get(w)
        if b is None:
            continue
        # large requests are shown as GB/s, small ones as operations/s
        data = bool(a.get("gb_per_s")) and a["gb_per_s"] * 1e9 / a["ops_per_s"] >= 65536
        if data:
            name, ta, tb, dig = f"{a['label']} (GB/s)", a["gb_per_s"], b["gb_per_s"], 2
        else:
            name, ta, tb, dig = a["label"], a["ops_per_s"], b["ops_per_s"], 0
        ca, cb = a["daemon_cpu_us_per_op"], b["daemon_cpu_us_per_op"]
        cdig = 1 if max(ca, cb) < 100 else 0
        thr = _round_ratios(a, b, "rounds_ops_per_s", a["ops_per_s"] / b["ops_per_s"])
        cpu = _round_ratios(a, b, "rounds_cpu_us_per_op", ca / cb)
        lines.append(f"| {name} | {_num(ta, dig)} | {_num(tb, dig)} | {thr} | "
                     f"{_num(ca, cdig)} | {_num(cb, cdig)} | {cpu} |")
    mem = {k: v["memory"] for k, v in d.items() if "memory" in v}
    if mem:
        files = next(iter(mem.values()))["files"]
        per = ", ".join(f"{_num(v['bytes_per_inode'])} bytes for {LABEL[k]}" for k, v in mem.items())
        idle = ", ".join(f"{v['rss_before'] / 2**20:.1f} MiB for {LABEL[k]}"
                         for k, v in mem.items())
        lines += ["", f"Memory: RSS per cached inode after {_num(files)} lookups: {per}. "
                  f"RSS before the lookups: {idle}."]
        if m.get("mem_files_requested", files) > files:
            lines[-1] += (f" The fd limit ({_num(m['rlimit_nofile'])}) capped the run at "
                          f"{_num(files)} of the {_num(m['mem_files_requested'])} files asked for.")
    others = [LABEL[k] for k in d if k not in ("py", "rust")]
    if others:
        lines += ["", f"The {' and '.join(others)} ran in the same rounds; "
                  "its figures are in `bench/results/daemon.json`."]
    return "\n".join(lines)


GUEST_LABEL = {"pyv": "pyvirtiofsd", "rust": "Rust virtiofsd", "ninep": "9p"}
GUEST_KIND = {"pyv": "py", "rust": "rust"}


def _gfmt(x: float) -> str:
    if x >= 100:
        return _num(x, 1) if x < 1000 else _num(x)
    if x >= 10:
        return f"{x:.2f}"
    return f"{x:.3f}"


def render_guest(res: dict) -> str:
    m = res["meta"]
    logs = res["daemon_logs"]
    shares = [s for s in ("pyv", "rust", "ninep") if any(s in v for v in res["summary"].values())]
    hl = m.get("host_load", {})
    lines = [
        f"Measured {m['date']} at {commit_text(m.get('commit') or m.get('repo_rev'))}, on "
        f"{m.get('cpu_model') or 'a CPU model not recorded'} ({m['host_cpus']} CPUs), {m['qemu']}, "
        f"{m['accel'].upper()}, {m['guest_cpus']} vCPU, guest Linux {m['guest_kernel']}; "
        f"nothing pinned. Median of {m['reps']} repetitions with the share order rotated"
        f"{' (`--quick`: smaller files and counts)' if m.get('quick') else ''}. "
        f"Other processes used {hl.get('foreign_cpu_cores_mean', 0):.2f} cores on average "
        f"(at most {hl.get('foreign_cpu_cores_max', 0):.2f}) during the run." + build_text(m),
        "",
    ]
    entries = {s: (GUEST_KIND[s], logs[s]) for s in shares if s in logs}
    lines += settings_section(entries)
    if "ninep" in shares:
        lines += ["", f"9p is served by QEMU itself, mounted `{m['ninep_mount']}`."]
    lines += [
        "",
        "Ratio = pyvirtiofsd's figure ÷ the peer's, of the medians; in brackets its range over "
        "the repetitions. For seconds, lower is better (above 1: pyvirtiofsd is slower); for "
        "MB/s and IOPS, higher is better (below 1: pyvirtiofsd is slower).",
        "",
    ]
    peers = [s for s in shares if s != "pyv"]
    head = ["workload", "unit"] + [GUEST_LABEL[s] for s in shares] + \
        [f"pyv/{GUEST_LABEL[p]}" for p in peers]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for w, row in res["summary"].items():
        # the driver's descriptions say N for the run's file count
        cells = [row["description"].replace(" N ", f" {_num(m['files'])} "), row["unit"]]
        for s in shares:
            cells.append(_gfmt(row[s]["median"]) if row.get(s) and row[s]["median"] else "-")
        for p in peers:
            a, b = row.get("pyv"), row.get(p)
            if not (a and b and a["median"] and b["median"]):
                cells.append("-")
                continue
            reps = [x / y for x, y in zip(a["values"], b["values"]) if y]
            cells.append(f"{a['median'] / b['median']:.2f}{_spread(reps)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_objstore(res: dict) -> str:
    import objstore_bench  # the object-storage benchmark renders its own table
    return objstore_bench.render(res)


RENDER = {"daemon": render_daemon, "guest": render_guest, "objstore": render_objstore}
ALL_TABLES = TABLES + ("objstore",)  # TABLES: the daemon comparisons (settings recorded)


def load(name: str, results_dir: Path = RESULTS) -> dict:
    with open(results_dir / f"{name}.json") as f:
        return json.load(f)


def render(name: str, results_dir: Path = RESULTS) -> str:
    return RENDER[name](load(name, results_dir))


# ----------------------------------------------------------------------------------------
# The README blocks
# ----------------------------------------------------------------------------------------

def begin_marker(name: str) -> str:
    return (f"<!-- bench:{name}:begin (generated by bench/tables.py from "
            f"bench/results/{name}.json: do not edit by hand) -->")


def end_marker(name: str) -> str:
    return f"<!-- bench:{name}:end -->"


def block_span(text: str, name: str) -> tuple[int, int]:
    """Offsets of the block's body (between the two marker lines)."""
    b = text.find(f"<!-- bench:{name}:begin")
    e = text.find(end_marker(name))
    if b < 0 or e < 0 or e < b or text.count(f"<!-- bench:{name}:begin") != 1:
        raise ValueError(f"README: no single pair of bench:{name} markers")
    return text.index("\n", b) + 1, e


def readme_block(text: str, name: str) -> str:
    b, e = block_span(text, name)
    return text[b:e].rstrip("\n")


def write_block(text: str, name: str, body: str) -> str:
    b, e = block_span(text, name)
    start = text.rfind("\n", 0, b - 1) + 1
    return text[:start] + begin_marker(name) + "\n" + body + "\n" + text[e:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tables", nargs="*", metavar="{daemon,guest,objstore}",
                    help="which blocks (default: all)")
    ap.add_argument("--readme", default=str(README))
    ap.add_argument("--results", default=str(RESULTS), help="folder of the results files")
    ap.add_argument("--check", action="store_true",
                    help="change nothing; exit 1 if a block differs from its rendering")
    a = ap.parse_args(argv)
    for name in a.tables:
        if name not in ALL_TABLES:
            ap.error(f"unknown table {name!r}: one of {', '.join(ALL_TABLES)}")
    path = Path(a.readme)
    text = path.read_text()
    new = text
    stale = []
    for name in a.tables or ALL_TABLES:
        body = render(name, Path(a.results))
        if readme_block(new, name) != body:
            stale.append(name)
        new = write_block(new, name, body)
    if a.check:
        for name in stale:
            print(f"{path}: the bench:{name} block is not the rendering of "
                  f"{Path(a.results) / (name + '.json')}", file=sys.stderr)
        return 1 if stale else 0
    if new != text:
        path.write_text(new)
    print(f"{path}: " + (f"rewrote {', '.join(stale)}" if stale else "up to date"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
