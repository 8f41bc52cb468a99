#!/bin/sh
# Host-side smoke test for ksmlens-workload.
#
# Builds the program into a temporary directory, runs every scenario with
# small sizes, drives the stdin/stdout protocol, checks that every reply is
# one line of valid JSON with the expected shape, and that no workload
# process (or file-cow file) is left behind.  When /proc/PID/mem of the
# workload processes is readable (root, or ptrace_scope allowing ancestors)
# the page contents are checked too.
#
# It never touches /sys/kernel/mm/ksm; madvise(MADV_MERGEABLE) and
# move_pages() are harmless on any Linux host.  "migrate 0" is a no-op on
# a one-node host.  Exit status is nonzero on any failure.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM
gcc -O2 -Wall -Wextra -Werror -static -o "$tmp/ksmlens-workload" \
	"$here/ksmlens-workload.c"

python3 - "$tmp/ksmlens-workload" <<'EOF'
import hashlib, json, os, queue, signal, subprocess, sys, threading, time

BIN = sys.argv[1]
PAGE = os.sysconf("SC_PAGE_SIZE")
GIB = 1 << 30
checks = 0
seen_pids = set()
started = []                                    # every Workload, for cleanup


def check(cond, what):
    global checks
    if not cond:
        raise AssertionError(what)
    checks += 1


class Workload:
    def __init__(self, *args):
        self.p = subprocess.Popen([BIN, *args], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        started.append(self)
        self.q = queue.Queue()
        threading.Thread(target=self._reader, daemon=True).start()
        kind, self.ready = self._line()
        check(kind == "ready", f"expected ready, got {kind} {self.ready}")
        self._note(self.ready)

    def _reader(self):
        for line in self.p.stdout:
            self.q.put(line)
        self.q.put(None)

    def _line(self, timeout=20):
        line = self.q.get(timeout=timeout)
        if line is None:
            raise AssertionError("workload closed stdout; stderr: "
                                 + self.p.stderr.read())
        check(line.endswith("\n") and line.count("\n") == 1, "one line")
        kind, _, rest = line.rstrip("\n").partition(" ")
        if kind in ("ready", "ok"):
            return kind, json.loads(rest)
        check(kind == "err" and rest, f"bad reply line {line!r}")
        return kind, rest

    def _note(self, state):
        seen_pids.add(state["controller"])
        for p in state["procs"]:
            seen_pids.add(p["pid"])

    def raw(self, cmd):
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self._line()

    def ok(self, cmd):
        kind, val = self.raw(cmd)
        check(kind == "ok", f"{cmd!r} -> {kind} {val}")
        return val

    def err(self, cmd):
        kind, val = self.raw(cmd)
        check(kind == "err", f"{cmd!r} should fail, got {val}")
        return val

    def info(self):
        st = self.ok("info")
        self._note(st)
        return st

    def quit(self):
        check(self.ok("quit") == {"quit": True}, "quit reply")
        check(self.p.wait(timeout=20) == 0, "exit status 0 after quit")


def ours(pid):
    """True while pid is (still) a ksmlens-workload process, even a zombie."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().startswith("ksmlens-worklo")  # comm: 15 chars
    except OSError:
        return False


def all_gone(pids):
    deadline = time.time() + 5
    while time.time() < deadline:
        alive = [p for p in pids if ours(p)]
        if not alive:
            return True
        time.sleep(0.05)
    print("still alive:", alive, file=sys.stderr)
    return False


def page(pid, addr):
    """Return the page's bytes, or None if /proc/PID/mem is not readable."""
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
            f.seek(addr)
            return f.read(PAGE)
    except OSError:
        return None


def digest(pid, start, i):
    b = page(pid, start + i * PAGE)
    return None if b is None else hashlib.sha1(b).hexdigest()


def common(w, scen, nprocs, pages, distinct):
    st = w.info()
    check(st["scenario"] == scen and st["controller"] == w.p.pid, "header")
    check(st == w.ready and st["step"] == 0, "ready == first info, step 0")
    check(len(st["procs"]) == nprocs, f"{nprocs} procs")
    nregions = sum(len(p["regions"]) for p in st["procs"])
    for p in st["procs"]:
        for r in p["regions"]:
            check(r["pages"] == pages and r["start"] % PAGE == 0, "region")
            check(r["content"] in ("pattern", "same", "unique", "volatile"),
                  "content kind")
    where = w.ok("where")["where"]
    check(len(where) == nregions, "where covers every region")
    for e in where:
        check(e["rc"] == 0 and len(e["status"]) == pages, "where status")
        check(all(isinstance(s, int) for s in e["status"]), "where ints")
    mig = w.ok("migrate 0")["migrate"]
    check(len(mig) == nregions and all("rc" in e for e in mig), "migrate")
    pid0 = st["procs"][0]["pid"]
    mig = w.ok(f"migrate 0 {pid0}")["migrate"]
    check({e["pid"] for e in mig} == {pid0}, "migrate restricted to pid")
    check(w.ok("touch")["touched"] == nregions * pages, "touch count")
    check(w.ok("unmerge") == {"unmerge": True}, "unmerge")
    check(w.ok("merge") == {"merge": True}, "merge")
    w.err("frobnicate")
    w.err("")
    w.err("migrate")
    w.err("migrate 0 1")                       # pid 1 is not ours
    w.err(f"write {pid0} data {pages}")        # index out of range
    w.err(f"write {pid0} nosuchregion 0")
    check(w.info()["step"] == 13, "step counts commands")
    # Content checks on the "data" regions, when /proc/PID/mem is readable.
    datas = [(p["pid"], r) for p in st["procs"] for r in p["regions"]
             if r["name"] == "data"]
    pid, r = datas[0]
    if digest(pid, r["start"], 0) is None:
        print(f"  ({scen}: /proc/PID/mem not readable, content not checked)")
        return st
    if r["content"] == "pattern":
        for pid2, r2 in datas:
            for i in range(pages):
                check(digest(pid2, r2["start"], i) ==
                      digest(pid, r["start"], i % distinct), "pattern")
        if pages > 1 and distinct > 1:
            check(digest(pid, r["start"], 0) != digest(pid, r["start"], 1),
                  "distinct pattern pages differ")
    elif r["content"] == "same":
        d0 = digest(pid, r["start"], 0)
        check(all(digest(p2, r2["start"], i) == d0 for p2, r2 in datas
                  for i in range(pages)), "same content everywhere")
    check(page(pid, r["start"]) != bytes(PAGE), "pages are not zero")
    # write: the page changes and no longer matches its twin, others keep.
    before = [digest(pid, r["start"], i) for i in range(pages)]
    check(w.ok(f"write {pid} data 0") ==
          {"pid": pid, "region": "data", "written": [0]}, "write reply")
    after = [digest(pid, r["start"], i) for i in range(pages)]
    check(after[0] != before[0] and after[1:] == before[1:], "write effect")
    if len(datas) > 1:
        check(after[0] != digest(datas[1][0], datas[1][1]["start"], 0),
              "written page is unique")
    return st


def scenario(scen, nprocs, pages, extra=(), distinct=4):
    """Context-free helper: run common checks, return (w, state)."""
    args = [scen, "--pages", str(pages), "--distinct", str(distinct), *extra]
    w = Workload(*args)
    try:
        return w, common(w, scen, nprocs, pages, distinct)
    except BaseException:
        stop(w)
        raise


def stop(w):
    """Failure path: SIGTERM lets the controller remove its shm file."""
    w.p.terminate()
    try:
        w.p.wait(timeout=5)
    except subprocess.TimeoutExpired:
        w.p.kill()
        w.p.wait()


def finish(w, quit=True):
    if quit:
        w.quit()
    else:                                       # EOF on stdin
        w.p.stdin.close()
        check(w.p.wait(timeout=20) == 0, "exit 0 on EOF")
    check(all_gone(seen_pids), "no workload process left")


def t_merge():
    w, st = scenario("merge", 3, 8)
    check(all(p["role"] == "sharer" for p in st["procs"]), "roles")
    finish(w)
    w, st = scenario("merge", 2, 5, ["--procs", "2"], distinct=3)
    finish(w, quit=False)
    w = Workload("merge")                       # program defaults
    st = w.info()
    check(len(st["procs"]) == 3 and st["distinct"] == 16 and
          all(p["regions"][0]["pages"] == 64 for p in st["procs"]),
          "defaults: 3 procs, 64 pages, distinct 16")
    finish(w)


def t_chain():
    w, st = scenario("chain", 6, 8)
    check(all(r["content"] == "same" for p in st["procs"]
              for r in p["regions"]), "chain content same")
    finish(w)


def t_mremap():
    w, st = scenario("mremap", 2, 8)
    a, b = st["procs"]
    old = a["regions"][0]["start"]
    d0 = digest(a["pid"], old, 0)
    mv = w.ok("mremap")
    check(mv["pid"] == a["pid"] and mv["old"] == old, "mremap default pid")
    check(abs(mv["new"] - mv["old"]) >= GIB, "moved >= 1 GiB")
    st2 = w.info()
    r = st2["procs"][0]["regions"][0]
    check(r["start"] == mv["new"] and r["moved_from"] == old, "info updated")
    check(r["vm_pgoff_hint"] == a["regions"][0]["vm_pgoff_hint"],
          "pgoff hint kept")
    check("moved_from" not in st2["procs"][1]["regions"][0], "other unmoved")
    if d0 is not None:
        check(digest(a["pid"], mv["new"], 0) == d0, "content moved along")
    with open(f"/proc/{a['pid']}/maps") as f:
        maps = f.read()
    check(f"{mv['new']:x}-" in maps, "new mapping in maps")
    check(f"{old:x}-{old + 8 * PAGE:x}" not in maps, "old mapping gone")
    where = w.ok("where")["where"]
    check(all(e["rc"] == 0 and all(s >= 0 for s in e["status"])
              for e in where), "where after mremap")
    mv2 = w.ok(f"mremap {b['pid']}")
    check(mv2["pid"] == b["pid"] and abs(mv2["new"] - mv2["old"]) >= GIB,
          "mremap PID")
    check(w.ok("touch")["touched"] == 16, "touch after mremap")
    w.err("mremap 1")
    finish(w)


def t_smartscan():
    w, st = scenario("smartscan", 1, 8)
    p = st["procs"][0]
    regs = {r["name"]: r for r in p["regions"]}
    check(sorted(regs) == ["data", "unique", "volatile"], "three regions")
    check(regs["unique"]["content"] == "unique", "unique content kind")
    check(regs["volatile"]["content"] == "volatile", "volatile kind")
    pid = p["pid"]
    u = [digest(pid, regs["unique"]["start"], i) for i in range(8)]
    vsum = lambda: [digest(pid, regs["volatile"]["start"], i)
                    for i in range(8)]
    if u[0] is not None:
        check(len(set(u)) == 8, "unique pages all differ")
        v1 = vsum(); time.sleep(0.5); v2 = vsum()
        check(all(x != y for x, y in zip(v1, v2)), "volatile changes")
    check(w.ok("pause-volatile")["volatile"] == "paused", "pause")
    if u[0] is not None:
        v1 = vsum(); time.sleep(0.6); v2 = vsum()
        check(v1 == v2, "paused volatile is stable")
        check(u == [digest(pid, regs["unique"]["start"], i)
                    for i in range(8)], "unique stays put")
    check(w.ok("resume-volatile")["volatile"] == "running", "resume")
    if u[0] is not None:
        time.sleep(0.5)
        check(vsum() != v2, "resumed volatile changes")
    check(w.ok(f"write {pid} unique 1 2 3")["written"] == [1, 2, 3],
          "write several")
    finish(w)
    w, st = scenario("merge", 3, 4)
    w.err("pause-volatile")
    finish(w)


def t_fork():
    w, st = scenario("fork", 2, 8)
    a, b = st["procs"]
    check(a["role"] == b["role"] == "sharer", "fork roles")
    g = w.ok("fork")["forked"]
    st2 = w.info()
    gp = [p for p in st2["procs"] if p["pid"] == g]
    check(len(gp) == 1 and gp[0]["role"] == "forked", "forked in procs")
    check(gp[0]["parent"] == a["pid"], "forked parent")
    check(gp[0]["regions"] == st2["procs"][0]["regions"], "inherited regions")
    check(ours(g), "grandchild alive")
    where = w.ok("where")["where"]
    check(any(e["pid"] == g for e in where), "where includes grandchild")
    check(w.ok("touch")["touched"] == 24, "touch via relay")
    start = a["regions"][0]["start"]
    dpar = digest(a["pid"], start, 2)
    check(w.ok(f"write {g} data 2")["pid"] == g, "write via relay")
    if dpar is not None:
        check(digest(g, start, 2) != dpar, "grandchild page rewritten")
        check(digest(a["pid"], start, 2) == dpar, "parent page untouched")
    check(w.ok(f"migrate 0 {g}")["migrate"][0]["pid"] == g, "migrate gc")
    check(w.ok("unmerge") == {"unmerge": True}, "unmerge via relay")
    g2 = w.ok(f"fork {b['pid']}")["forked"]
    check(g2 != g, "second fork")
    w.err(f"fork {g}")                          # grandchildren do not fork
    finish(w)


def t_filecow():
    w, st = scenario("file-cow", 2, 8, ["--offset-pages", "3"])
    path = f"/dev/shm/ksmlens-file-cow-{w.p.pid}"
    check(os.path.getsize(path) == (3 + 8) * PAGE, "file size")
    for p in st["procs"]:
        r = p["regions"][0]
        check(r["file"] == path and r["file_offset_pages"] == 3, "file info")
        check(r["vm_pgoff_hint"] == 3, "pgoff hint is the file offset")
        with open(f"/proc/{p['pid']}/maps") as f:
            line = [l for l in f if l.startswith(f"{r['start']:x}-")][0]
        check(path in line and int(line.split()[2], 16) == 3 * PAGE,
              "file mapping at the right offset")
    with open(path, "rb") as f:
        check(f.read() == bytes((3 + 8) * PAGE), "file stays zero (COW)")
    finish(w)
    check(not os.path.exists(path), "file removed on quit")
    w, st = scenario("file-cow", 3, 4, ["--procs", "3"])
    path = f"/dev/shm/ksmlens-file-cow-{w.p.pid}"
    w.p.send_signal(signal.SIGTERM)             # abnormal end: still clean
    w.p.wait(timeout=20)
    check(all_gone(seen_pids), "SIGTERM: no process left")
    check(not os.path.exists(path), "SIGTERM: file removed")


def t_field():
    """The issue-9 layouts (shared/field/) and their commands."""
    want = {"zero-pages": [["zero", "read", "equal"], ["pairs", "zero"]],
            "unmerge": [["pairs"]], "exit": [["x"], ["x", "y"], ["x", "y"]],
            "swap": [["data", "pinned"]], "prctl": [["data"], ["data"]],
            "thp": [["data"], ["data"]], "clone-vm": [["data"]],
            "prot-none": [["data"], ["data"]]}
    for scen, layout in want.items():
        w = Workload(scen)
        st = w.info()
        check([[r["name"] for r in p["regions"]] for p in st["procs"]] == layout,
              f"{scen} layout")
        check(st["exited"] == [], f"{scen}: nothing exited")
        finish(w)
    w = Workload("zero-pages")
    st = w.info()
    z = st["procs"][0]
    regs = {r["name"]: r for r in z["regions"]}
    check((regs["zero"]["pages"], regs["read"]["pages"], regs["equal"]["pages"]) ==
          (64, 16, 8), "zero-pages sizes")
    if page(z["pid"], regs["zero"]["start"]) is not None:
        check(page(z["pid"], regs["zero"]["start"]) == bytes(PAGE), "zero content")
        check(page(z["pid"], regs["read"]["start"]) == bytes(PAGE), "read content")
        f = st["procs"][1]
        r = f["regions"][0]
        check(digest(f["pid"], r["start"], 3) == digest(f["pid"], r["start"], 19) !=
              digest(f["pid"], r["start"], 4), "pairs: page i == page 16+i")
    pid = z["pid"]
    check(w.ok(f"madvise {pid} zero unmergeable 0 8")["madvise"] == "unmergeable 0 8",
          "madvise reply")
    w.ok(f"madvise {pid} zero dontneed 16 8")
    w.err(f"madvise {pid} zero frob 0 1")
    w.err(f"madvise {pid} zero dontneed 60 8")          # past the end
    w.err(f"madvise {pid} zero dontneed 0")             # usage
    check(w.ok(f"read {pid} read 0 16")["result"] == 16, "read count")
    check(w.ok(f"pin {pid} equal 3")["result"] == 1, "pin")
    check(w.ok(f"unpin {pid}") == {"unpinned": pid}, "unpin")
    w.err(f"pin {pid} equal 8")
    g = w.ok(f"fork {st['procs'][1]['pid']}")["forked"]
    check(w.ok(f"read {g} zero 0 16")["result"] == 16, "read via relay")
    finish(w)
    w = Workload("exit")
    st = w.info()
    p0, p1, p2 = (p["pid"] for p in st["procs"])
    check(w.ok(f"mprotect {p0} x none 0 16")["mprotect"] == "none 0 16", "mprotect")
    st = w.info()
    check(st["procs"][0]["regions"][0]["prot"] == "none", "prot in info")
    check(w.ok("touch")["touched"] == 2 * 24, "touch skips PROT_NONE")
    c = w.ok(f"clone-vm {p1}")
    check(c["mm_of"] == p1 and ours(c["clone_vm"]), "clone-vm")
    with open(f"/proc/{c['clone_vm']}/status") as f:
        tgid = int([l for l in f if l.startswith("Tgid:")][0].split()[1])
    check(tgid == c["clone_vm"], "clone-vm child is its own thread group")
    check(not os.path.exists(f"/proc/{p1}/task/{c['clone_vm']}"), "not a thread")
    w.err(f"unpin {c['clone_vm']}")                     # takes no commands
    check(w.ok(f"kill {p1}")["killed"] == [p1, c["clone_vm"]], "kill takes the clone")
    w.err(f"kill {p1}")
    st = w.info()
    check(st["exited"] == [p1, c["clone_vm"]], "exited")
    check([p["pid"] for p in st["procs"]] == [p0, p2], "procs after kill")
    check(all(e["pid"] != p1 for e in w.ok("where")["where"]), "where skips the dead")
    finish(w)
    # numa-nodes binds to node 1: a one-node host refuses at setup
    have2 = os.path.exists("/sys/devices/system/node/node1")
    p = subprocess.run([BIN, "numa-nodes"], capture_output=True, text=True, timeout=20,
                       stdin=subprocess.DEVNULL)
    if not have2:
        check(p.returncode == 1 and "needs a NUMA node 1" in p.stderr, "numa-nodes: 1 node")


def t_setup_failures():
    for args in (["nosuch"], ["merge", "--pages", "0"], [],
                 ["merge", "--bogus", "1"]):
        p = subprocess.run([BIN, *args], capture_output=True, text=True,
                           timeout=20, stdin=subprocess.DEVNULL)
        check(p.returncode == 1 and p.stderr.startswith("err "),
              f"setup failure {args}")
        check("ready" not in p.stdout, "no ready on failure")
    # An mmap that must fail (4 TiB); only safe without overcommit=1.
    with open("/proc/sys/vm/overcommit_memory") as f:
        mode = f.read().strip()
    if mode != "1":
        p = subprocess.run([BIN, "merge", "--pages", str(1 << 30)],
                           capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        check(p.returncode == 1 and "Cannot allocate memory" in p.stderr,
              "mmap failure reported with errno text")


failed = 0
for t in (t_merge, t_chain, t_mremap, t_smartscan, t_fork, t_filecow, t_field,
          t_setup_failures):
    before = checks
    try:
        t()
        print(f"PASS {t.__name__[2:]:16} ({checks - before} checks)")
    except Exception as e:
        failed += 1
        print(f"FAIL {t.__name__[2:]:16} {type(e).__name__}: {e}")
    for w in started:                           # leave nothing running
        if w.p.poll() is None:
            stop(w)
check(all_gone(seen_pids), "no process left at the end")
print(f"selftest: {checks} checks, {failed} failed, "
      f"{len(seen_pids)} workload pids all gone")
sys.exit(1 if failed else 0)
EOF
# Belt and braces: nothing built from $tmp may still run.
if pgrep -f "$tmp/ksmlens-workload" >/dev/null; then
	echo "FAIL leftover ksmlens-workload processes" >&2
	exit 1
fi
