"""The seccomp filter allows what the daemon uses and stops what it must never do."""

import os
import signal
import struct

from pyvirtiofs import seccomp


def run_filtered(mode, action):
    pid = os.fork()
    if pid == 0:
        try:
            seccomp.install(mode)
            action()
            os._exit(0)
        except BaseException:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return status


def test_allowed_calls_work_under_the_filter(tmp_path):
    def work():
        fd = os.open(tmp_path, os.O_PATH)
        os.stat(fd)
        os.listdir(tmp_path)
        (tmp_path / "x").write_bytes(b"1")
        os.rename(tmp_path / "x", tmp_path / "y")
    assert os.waitstatus_to_exitcode(run_filtered("kill", work)) == 0
    assert (tmp_path / "y").exists()


def test_a_call_off_the_list_kills_the_process(tmp_path):
    status = run_filtered("kill", lambda: os.chroot(str(tmp_path)))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


def test_program_shape():
    prog = seccomp.build_program(seccomp.RET_KILL_PROCESS, [1, 2, 3])
    insns = [struct.unpack("=HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
    # every match jumps to the final ALLOW
    for i, (code, jt, jf, k) in enumerate(insns[4:7]):
        assert insns[4 + i + 1 + jt][3] == seccomp.RET_ALLOW
    assert insns[-2][3] == seccomp.RET_KILL_PROCESS


def test_log_mode_lets_a_call_off_the_list_through(tmp_path):
    # --seccomp=log: the kernel logs the call and lets it run (getpgid is off the list)
    assert "getpgid" not in seccomp.ALLOWED
    assert os.waitstatus_to_exitcode(run_filtered("log", lambda: os.getpgid(0))) == 0
    status = run_filtered("kill", lambda: os.getpgid(0))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


def test_trap_mode_raises_sigsys_the_process_can_catch(tmp_path):
    # --seccomp=trap: SIGSYS instead of the call; a handler sees it and the process lives on
    def call_and_catch():
        caught = []
        signal.signal(signal.SIGSYS, lambda *a: caught.append(1))
        try:
            os.getpgid(0)
        except OSError:
            pass  # the call did not run
        if not caught:
            os._exit(4)
    assert os.waitstatus_to_exitcode(run_filtered("trap", call_and_catch)) == 0


def test_unshare_is_allowed_for_clone_fs_only():
    # A serving thread takes a umask of its own with unshare(CLONE_FS) (linux.own_umask);
    # any other unshare (namespaces) stays forbidden.
    from pyvirtiofs import linux
    status = run_filtered("kill", lambda: linux.check(linux.libc.unshare(linux.CLONE_FS), "x"))
    assert os.waitstatus_to_exitcode(status) == 0
    clone_newuts = 0x04000000
    status = run_filtered("kill", lambda: linux.check(linux.libc.unshare(clone_newuts), "x"))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS
    status = run_filtered("kill", lambda: linux.check(
        linux.libc.unshare(linux.CLONE_FS | clone_newuts), "x"))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS
