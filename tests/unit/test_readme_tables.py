"""The README's benchmark tables are the benchmark code's rendering of the committed results,
and they say with which settings every daemon ran.

* The blocks between ``<!-- bench:daemon:... -->`` and ``<!-- bench:guest:... -->`` in README.md
  are exactly what bench/tables.py renders from bench/results/{daemon,guest}.json: a figure
  edited by hand, or results committed without re-rendering, fails here.
* Every results file lets the settings (sandbox, seccomp, cache, thread pool) of every daemon be
  known; where the run recorded them, they match the command line the daemon was started with.
* A table whose daemons ran with different settings says so in bold; one whose daemons ran
  alike says that.
* The benchmark code starts every daemon with the same settings (checked on the command lines
  it builds, read back the way the renderer reads them), and refuses settings a daemon
  cannot have with a one-line error.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import daemon_settings  # noqa: E402
import tables  # noqa: E402

GUEST_KIND = tables.GUEST_KIND


def daemon_entries(name: str, res: dict) -> dict[str, tuple[str, dict]]:
    """key -> (daemon kind, the entry holding its argv and settings) of a results file."""
    if name == "daemon":
        return {k: (k, v) for k, v in res["daemons"].items()}
    return {k: (GUEST_KIND[k], v) for k, v in res["daemon_logs"].items()}


@pytest.mark.parametrize("name", tables.TABLES)
def test_readme_block_is_the_rendering_of_the_committed_results(name):
    readme = (REPO / "README.md").read_text()
    block = tables.readme_block(readme, name)
    rendered = tables.render(name)
    assert block == rendered, (
        f"README.md's bench:{name} block is not what bench/tables.py renders from "
        f"bench/results/{name}.json; run `bash scripts/bench{'-guest' if name == 'guest' else ''}"
        f".sh --render-only` (never edit the block by hand)")


@pytest.mark.parametrize("name", tables.TABLES)
def test_results_file_records_every_daemons_settings(name):
    res = tables.load(name)
    entries = daemon_entries(name, res)
    assert {"py", "rust"} <= {kind for kind, _ in entries.values()}
    for key, (kind, entry) in entries.items():
        assert entry.get("argv"), f"{name}.json: no command line recorded for {key}"
        from_argv = tables.settings_from_argv(kind, entry["argv"])
        assert set(from_argv) == set(daemon_settings.KEYS)
        if "settings" in entry:
            # what the run says it used is what the daemon's command line gave it
            assert entry["settings"] == from_argv, (key, entry["settings"], entry["argv"])
            assert entry["settings"] == res["meta"]["settings"]


@pytest.mark.parametrize("name", tables.TABLES)
def test_block_states_whether_the_daemons_ran_alike(name):
    res = tables.load(name)
    entries = daemon_entries(name, res)
    block = tables.readme_block((REPO / "README.md").read_text(), name)
    if tables.like_for_like(entries):
        assert "Every daemon ran with the same sandbox, seccomp, cache" in block
        assert "Not like for like" not in block
    else:
        assert "**Not like for like: the daemons ran with different" in block
    for key, (kind, entry) in entries.items():
        s, _ = tables.daemon_settings(kind, entry)
        row = (f"| {tables.LABEL[kind]} | {s['sandbox']} | {s['seccomp']} | {s['cache']} | "
               f"{s['thread_pool_size'] or 'none'} | ")
        assert row in block, row


def test_renderer_flags_daemons_with_different_settings():
    res = tables.load("daemon")
    res = copy.deepcopy(res)
    alike = daemon_settings.DaemonSettings().record()
    for v in res["daemons"].values():
        v["settings"] = dict(alike)
    text = tables.render_daemon(res)
    assert "Every daemon ran with the same sandbox" in text
    assert "Not like for like" not in text
    assert "did not record its settings" not in text
    res["daemons"]["rust"]["settings"]["seccomp"] = "none"
    text = tables.render_daemon(res)
    assert "**Not like for like: the daemons ran with different seccomp settings.**" in text
    assert "| Rust virtiofsd | chroot | none | auto | none |" in text


def test_renderer_states_commit_load_placement_and_rounds():
    res = copy.deepcopy(tables.load("daemon"))
    res["meta"].update(commit="0123456789ab", cpu_model="Test CPU", placement="same",
                       cpus_used=[1], loadavg_start=[3.25, 0, 0], repeat=3)
    text = tables.render_daemon(res)
    assert "at commit `0123456789ab`" in text
    assert "on Test CPU (2 CPUs)" in text
    assert "pinned to the same CPU (1)" in text
    assert "load average 3.2 before" in text
    assert "Median of 3 interleaved rounds" in text
    del res["meta"]["commit"]
    assert "a commit this run did not record" in tables.render_daemon(res)


def test_check_mode_catches_a_hand_edited_figure(tmp_path):
    readme = (REPO / "README.md").read_text()
    copy_ = tmp_path / "README.md"
    copy_.write_text(readme)
    assert tables.main(["--check", "--readme", str(copy_)]) == 0
    block = tables.readme_block(readme, "daemon")
    first_row = next(line for line in block.splitlines() if line.startswith("| null"))
    cells = first_row.split(" | ")
    cells[1] = "999,999"
    copy_.write_text(readme.replace(first_row, " | ".join(cells)))
    assert tables.main(["--check", "--readme", str(copy_)]) == 1
    assert tables.main(["--readme", str(copy_)]) == 0          # re-render repairs it
    assert copy_.read_text() == readme


# ---- the object-storage benchmark (bench/objstore_bench.py) ------------------------------

def test_objstore_block_is_the_rendering_of_the_committed_results():
    block = tables.readme_block((REPO / "README.md").read_text(), "objstore")
    assert block == tables.render("objstore"), (
        "README.md's bench:objstore block is not what bench/objstore_bench.py renders from "
        "bench/results/objstore.json; run `.venv/bin/python bench/objstore_bench.py "
        "--render-only` (never edit the block by hand)")


def test_objstore_results_are_medians_of_three_rounds_with_the_load_recorded():
    res = tables.load("objstore")
    m = res["meta"]
    assert m["rounds"] >= 3 and len(res["rounds"]) == m["rounds"]
    assert {"pyv", "s3fs"} <= set(m["clients"])
    assert "load average" in m["uptime_before"] and "load average" in m["uptime_after"]
    assert m["big_mib"] == 1024 and m["files"] == 1000  # what the issue asks for
    for w, row in res["summary"].items():
        for c in m["clients"]:
            values = [rd[c][w] for rd in res["rounds"]]
            assert row[c]["values"] == values
            assert row[c]["median"] == statistics.median(values)
    block = tables.readme_block((REPO / "README.md").read_text(), "objstore")
    assert f"Median of {m['rounds']} rounds" in block
    assert m["uptime_before"].split("load average: ")[-1] in block


def test_objstore_check_mode_catches_a_hand_edited_figure(tmp_path):
    readme = (REPO / "README.md").read_text()
    copy_ = tmp_path / "README.md"
    copy_.write_text(readme)
    assert tables.main(["objstore", "--check", "--readme", str(copy_)]) == 0
    row = next(line for line in tables.readme_block(readme, "objstore").splitlines()
               if line.startswith("| sequential read"))
    cells = row.split(" | ")
    cells[2] = "999.9"
    copy_.write_text(readme.replace(row, " | ".join(cells)))
    assert tables.main(["objstore", "--check", "--readme", str(copy_)]) == 1


# ---- the benchmark code passes the same settings to every daemon -------------------------

SETTINGS = [daemon_settings.DaemonSettings(),
            daemon_settings.DaemonSettings(sandbox="namespace", cache="always",
                                           thread_pool_size=4)]
SETTINGS_NO_C = [daemon_settings.DaemonSettings(sandbox="none", seccomp="none"),
                 daemon_settings.DaemonSettings(sandbox="none", seccomp="kill", cache="never")]


@pytest.fixture
def daemon_bench(monkeypatch):
    import daemon_bench as db
    monkeypatch.setattr(db.peers, "find_rust_virtiofsd", lambda *a, **k: "/x/virtiofsd")
    monkeypatch.setattr(db.peers, "find_c_virtiofsd", lambda *a, **k: "/usr/lib/qemu/virtiofsd")
    return db


@pytest.mark.parametrize("settings", SETTINGS + SETTINGS_NO_C)
def test_daemon_bench_starts_every_daemon_with_the_same_settings(daemon_bench, settings):
    kinds = ("py", "rust", "c") if settings in SETTINGS else ("py", "rust")
    got = {}
    for kind in kinds:
        argv = daemon_bench.daemon_command(kind, "/tmp/s.sock", "/srv/share", 20000, settings)
        got[kind] = tables.settings_from_argv(kind, argv)
    assert all(s == settings.record() for s in got.values()), got


@pytest.mark.parametrize("settings", SETTINGS + SETTINGS_NO_C)
def test_guest_bench_starts_every_daemon_with_the_same_settings(settings):
    import guest_bench
    got = {share: tables.settings_from_argv(
        GUEST_KIND[share], guest_bench.daemon_argv(share, "/tmp/s.sock", "/srv/share",
                                                   settings, "/x/virtiofsd"))
        for share in ("pyv", "rust")}
    assert all(s == settings.record() for s in got.values()), got


def test_c_virtiofsd_settings_it_cannot_have_are_refused(daemon_bench, capsys):
    for bad in (["--sandbox", "none"], ["--seccomp", "none"]):
        with pytest.raises(SystemExit) as e:
            daemon_bench.main(["--daemons", "py,c", *bad])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "C virtiofsd" in err and "--daemons py,rust" in err, err
