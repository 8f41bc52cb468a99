"""A reviewer's own kernel tree and patches: ``ksmlens vm build --source DIR
[--patch FILE]... --variant NAME``.

What is needed beside :mod:`ksmlens.lab.kbuild`'s make and config steps:

* :func:`tree_version`: ``VERSION`` / ``PATCHLEVEL`` / ``SUBLEVEL`` of
  ``DIR/Makefile``; only versions ksmlens's config fragments are written
  for are built (:func:`check_version`).
* :func:`tree_digest`: the content key of DIR, fast: the ``git`` tree id of
  a clean git checkout (``git status`` clean, untracked files included),
  else every file's path, mode and bytes hashed (BLAKE2b, two threads), with
  a stat cache (path, size, mtime -> digest) so a warm hash reads
  only what changed.
* :func:`read_patches`: ``git format-patch`` files, a series of them, or an
  mbox saved from the list with several messages (split with
  :mod:`mailbox`; cover letters and replies, which carry no diff, skipped;
  ordered by ``[PATCH n/m]`` where every message has it, else file order).
* :func:`apply_patches`: ``patch -p1`` each in order on a copy of DIR (a
  patch that does not apply is refused in one line naming it and the
  failing hunk); DIR itself is never written.

The copy (``rsync -a --delete``, so an unchanged file keeps its mtime and
make rebuilds only what changed), the ``make O=`` tree and the build live
under ``<cache>/own/NAME/``; the artifacts in ``<cache>/kernels/NAME-KEY/``
like the built-in variants'; the variant's record in
``<cache>/variants/NAME.json`` (:func:`ksmlens.kernel.variants.custom_variants`).
``--arch arm64`` cross-builds the same tree: ``own/arm64-NAME/`` and
``kernels/arm64-NAME-KEY/``, its key in the same record (one name is one tree
and its patches, built for one architecture or both).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import email.header
import hashlib
import json
import mailbox
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ksmlens.errors import KsmlensError
from ksmlens.kernel.arch import X86_64, Arch, get_arch
from ksmlens.kernel.variants import VARIANT_NAME, VARIANTS
from ksmlens.lab import kbuild
# finding an own tree's build is kbuild's (it finds every kernel); the names
# stay importable from here
from ksmlens.lab.kbuild import find_own_kernel, read_record  # noqa: F401
from ksmlens.lab.paths import cache_root, variants_root

__all__ = ["tree_version", "check_version", "tree_digest", "Patch", "read_patches", "build_own",
           "find_own_kernel", "own_key",
           "apply_patches", "check_name", "own_dir", "write_record", "read_record"]


# ------------------------------------------------------------------ the tree

def tree_version(src: Path) -> tuple[int, int, int]:
    """(VERSION, PATCHLEVEL, SUBLEVEL) from ``src/Makefile``; KsmlensError
    if ``src`` is not a kernel tree."""
    mk = Path(src) / "Makefile"
    if not Path(src).is_dir():
        raise KsmlensError(f"{src} is not a directory", "give --source the top of a kernel tree")
    try:
        text = mk.read_text(errors="replace")[:4096]
    except OSError:
        raise KsmlensError(f"{src} has no Makefile: not a kernel tree",
                           "give --source the top of a kernel tree (where Makefile and "
                           "mm/ are)") from None
    got = {k: re.search(rf"^{k}\s*=\s*(\d*)\s*$", text, re.M) for k in
           ("VERSION", "PATCHLEVEL", "SUBLEVEL")}
    if not got["VERSION"] or not got["PATCHLEVEL"] or not (Path(src) / "mm" / "ksm.c").exists():
        raise KsmlensError(f"{src}/Makefile has no VERSION/PATCHLEVEL or there is no mm/ksm.c: "
                           "not a kernel tree", "give --source the top of a Linux tree")
    sub = got["SUBLEVEL"].group(1) if got["SUBLEVEL"] else ""
    return int(got["VERSION"].group(1)), int(got["PATCHLEVEL"].group(1)), int(sub or 0)


def check_version(src: Path, supported: list[str]) -> str:
    """The series of ``src`` (``"6.12"``) if it is one of ``supported``
    (the sources ksmlens's config fragments are written for); else one line:
    which version it is and which are supported."""
    v = tree_version(src)
    series = f"{v[0]}.{v[1]}"
    if series not in supported:
        raise KsmlensError(f"{src} is Linux {v[0]}.{v[1]}.{v[2]}: ksmlens's kernel config "
                           f"(vm/config/) is written for {', '.join(supported)} only",
                           f"build a {' or '.join(supported)} tree")
    return series


def _git_tree_id(src: Path) -> str | None:
    """``HEAD^{tree}`` of a git checkout whose work tree equals it (no
    change, no untracked file that is not ignored); None otherwise."""
    if not (src / ".git").exists():
        return None
    try:
        top = subprocess.run(["git", "-C", str(src), "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, check=True).stdout.strip()
        if Path(top).resolve() != src.resolve():
            return None
        st = subprocess.run(["git", "-C", str(src), "status", "--porcelain",
                             "--untracked-files=all"], capture_output=True, text=True, check=True)
        if st.stdout.strip():
            return None
        return subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD^{tree}"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _file_digest(path: str) -> bytes:
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


_STAT_FORMAT = 1   # the stat cache: {"format": 1, "files": {rel: [size, mtime_ns, digest]}}


def tree_digest(src: Path, *, stat_cache: Path | None = None) -> dict:
    """The content key of the kernel tree ``src``: ``{"kind": "git" |
    "content", "id": hex, "files": n, "read": files read, "seconds": s}``.

    ``git``: the tree id of a clean checkout (what its files are, by git's
    own hashes). ``content``: BLAKE2b over every file's relative path, mode
    (executable bit; a symlink's target) and bytes, ``.git`` left out,
    in sorted order. A file whose (size, mtime_ns) equals its entry in
    ``stat_cache`` (a JSON file, rewritten) is not read again: an edit
    changes the mtime, and the same tarball unpacked again hits."""
    src = Path(src)
    t0 = time.monotonic()
    gid = _git_tree_id(src)
    if gid:
        return {"kind": "git", "id": gid, "files": None, "read": 0,
                "seconds": round(time.monotonic() - t0, 2)}
    old: dict = {}
    if stat_cache and stat_cache.exists():
        try:
            d = json.loads(stat_cache.read_text())
            old = d["files"] if d.get("format") == _STAT_FORMAT else {}
        except (ValueError, AttributeError, KeyError):
            old = {}
    entries: list[tuple[str, str, str | None]] = []   # rel, kind/mode, symlink target
    todo: dict[str, tuple] = {}
    new: dict = {}
    stack = [("", str(src))]                 # (relative dir + "/", absolute dir)
    while stack:
        rdir, adir = stack.pop()
        with os.scandir(adir) as it:
            for e in it:
                rel = rdir + e.name
                if e.is_dir(follow_symlinks=False):
                    if rel != ".git":
                        stack.append((rel + "/", e.path))
                    continue
                st = e.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    entries.append((rel, "l", os.readlink(e.path)))
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                # git's racy-clean check also uses ctime and inode; those change
                # when the same tarball is unpacked again, size and mtime do not
                sig = [st.st_size, st.st_mtime_ns]
                entries.append((rel, "x" if st.st_mode & 0o111 else "f", None))
                o = old.get(rel)
                if o and o[:2] == sig:
                    new[rel] = o
                else:
                    todo[rel] = sig
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as ex:  # hashlib frees the GIL
        for rel, d in zip(todo, ex.map(_file_digest, [str(src / r) for r in todo],
                                       chunksize=64)):
            new[rel] = todo[rel] + [d.hex()]
    h = hashlib.blake2b(digest_size=20)
    for rel, mode, target in sorted(entries):
        h.update(f"{rel}\0{mode}\0".encode())
        h.update((target or new[rel][2]).encode() + b"\n")
    if stat_cache:
        stat_cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = stat_cache.with_name(stat_cache.name + ".tmp")
        tmp.write_text(json.dumps({"format": _STAT_FORMAT, "files": new}))
        tmp.replace(stat_cache)
    return {"kind": "content", "id": h.hexdigest(), "files": len(entries), "read": len(todo),
            "seconds": round(time.monotonic() - t0, 2)}


# ------------------------------------------------------------------ patches

@dataclasses.dataclass(frozen=True)
class Patch:
    """One patch to apply: ``name`` (``FILE`` or ``FILE#k`` for the k-th
    message of an mbox), ``subject`` (the mail's, or the file's first
    ``Subject:`` line), ``text`` (what ``patch -p1`` reads)."""
    name: str
    subject: str
    text: str

    @property
    def diff(self) -> str:
        """The patch from its first diff line on: what changes the tree (the
        mail headers and the commit message do not)."""
        m = _DIFF.search(self.text)
        return self.text[m.start():] if m else self.text

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.diff.encode()).hexdigest()[:16]


_DIFF = re.compile(r"^(diff --git |--- \S|Index: )", re.M)
_NUM = re.compile(r"\[[^\]]*?\b(\d+)/(\d+)\s*\]")


def _subject(msg) -> str:
    raw = msg.get("Subject", "") or ""
    try:
        return " ".join(str(email.header.make_header(email.header.decode_header(raw))).split())
    except (ValueError, LookupError):
        return " ".join(raw.split())


def _body(msg) -> str:
    """The first text part of ``msg`` holding a diff, its transfer encoding
    (quoted-printable, base64) undone; "" if none has one."""
    for part in msg.walk():
        if part.is_multipart():
            continue
        if part.get_content_maintype() not in ("text", "application") and part.get_payload():
            continue
        data = part.get_payload(decode=True)
        if data is None:
            continue
        text = data.decode(part.get_content_charset() or "utf-8", errors="replace")
        if _DIFF.search(text):
            return text
    return ""


def read_patches(files) -> list[Patch]:
    """The patches in ``files``, in order: each file is one patch (a ``git
    format-patch`` file, a plain diff) or an mbox of several messages (saved
    from the list; a message without a diff, e.g. the cover letter or a
    reply, is skipped). Within an mbox, messages are ordered by their
    ``[PATCH n/m]`` number where every one has it. KsmlensError for a file
    that is missing or holds no diff."""
    out: list[Patch] = []
    for f in files:
        f = Path(f)
        try:
            data = f.read_text(errors="replace")
        except OSError as e:
            raise KsmlensError(f"patch {f}: {e.strerror}", "give --patch an existing file") \
                from None
        # (k, subject, body) per mbox message; a plain diff appends a marker
        msgs: list[Any] = []
        if data.startswith("From "):            # mbox: a format-patch file is one too
            box = mailbox.mbox(str(f), create=False)
            try:
                for k, msg in enumerate(box):
                    body = _body(msg)
                    if body:
                        msgs.append((k, _subject(msg), body))
            finally:
                box.close()
            nums = [_NUM.search(s) for _, s, _ in msgs]
            if len(msgs) > 1 and all(nums):
                order = sorted(range(len(msgs)), key=lambda i: int(nums[i].group(1)))
                msgs = [msgs[i] for i in order]
            several = len(msgs) > 1
            for k, subj, body in msgs:
                out.append(Patch(f"{f.name}#{k + 1}" if several else f.name, subj, body))
        elif _DIFF.search(data):
            m = re.search(r"^Subject:\s*(.*)$", data, re.M)
            msgs.append(1)
            out.append(Patch(f.name, m.group(1).strip() if m else f.name, data))
        if not msgs:
            raise KsmlensError(f"patch {f} holds no diff",
                               "give a `git format-patch` file, an mbox or a unified diff")
    return out


def apply_patches(tree: Path, patches: list[Patch], *, shown_as: str | None = None) -> None:
    """Apply ``patches`` in order with ``patch -p1`` in ``tree`` (a copy:
    never the reviewer's DIR), context exact (``--fuzz=0``, as ``git am``:
    a hunk may move, not match loosely). Each is tried with ``--dry-run`` first; one
    that does not apply is refused in one line naming it, its subject, the
    file and the hunk (``tree`` is left as the patches before it made it)."""
    for p in patches:
        for dry in (True, False):
            r = subprocess.run(["patch", "-p1", "--forward", "--batch", "--fuzz=0",
                                "--no-backup-if-mismatch",
                                "-r", "-"] + (["--dry-run"] if dry else []),
                               input=p.text, cwd=tree, capture_output=True, text=True)
            if r.returncode == 0:
                continue
            out = (r.stdout + r.stderr).splitlines()
            where, failed = None, None
            for line in out:
                m = re.match(r"(?:checking|patching) file (.+)", line)
                if m:
                    where = m.group(1).strip()
                if failed is None and ("FAILED" in line or "malformed" in line
                                       or "Reversed" in line or "can't find file" in line):
                    failed = f"{where}: {line.strip()}" if where else line.strip()
            raise KsmlensError(
                f"patch {p.name} ({p.subject}) does not apply to {shown_as or tree}: "
                f"{failed or (out[-1] if out else 'patch failed')}",
                "rebase it onto this tree (or give the tree it was written for)")


# ------------------------------------------------------------------ the variant record

def check_name(name: str) -> str:
    """An own tree's variant name: the end of its ``uname -r``, not a
    built-in variant's."""
    if not re.fullmatch(VARIANT_NAME, name or ""):
        raise KsmlensError(f"variant name {name!r}: letters, digits and _ only "
                           "(it ends the kernel's uname -r)", "pick e.g. --variant mine")
    if name in VARIANTS:
        raise KsmlensError(f"{name!r} is a built-in variant",
                           "give your tree another --variant name")
    return name


def own_dir(name: str, arch: str | Arch | None = None) -> Path:
    """``<cache>/own/NAME`` (``own/arm64-NAME`` for arm64): the copy
    (``src/``), the ``make O=`` tree (``tree/``) and the stat cache of an
    own tree built for ``arch`` (None: x86-64)."""
    return cache_root() / "own" / f"{get_arch(arch).prefix}{name}"


# what makes two builds of one name the same tree (its content, not its
# path: the same tarball unpacked elsewhere is the same tree): then the
# record keeps each architecture's key; other content or patches start it anew
_SAME_TREE = ("series", "digest", "patches")


def write_record(name: str, record: dict, arch: str | Arch | None = None) -> Path:
    """Write ``<cache>/variants/NAME.json`` (atomically): the tree, its
    patches and ``keys`` (architecture name -> the build's key, ``key`` is
    x86-64's). A build of the same tree and patches for another
    architecture adds its key; a different tree or patches replace the
    record (the other architecture's build is then not this variant)."""
    a = get_arch(arch)
    d = variants_root()
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{name}.json"
    old = read_record(name) or {}
    keys = {}
    if all(old.get(k) == record.get(k) for k in _SAME_TREE):
        keys = kbuild.own_build_keys(old)
    keys[a.name] = record["key"]
    out = {"name": name, **{k: v for k, v in record.items() if k != "key"}, "keys": keys}
    if X86_64.name in keys:
        out["key"] = keys[X86_64.name]      # what a record before arm64 said
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(p)
    return p


# ------------------------------------------------------------------ build, find

OWN_FORMAT = 1   # bump when the own-tree build changes what it produces


def own_key(digest: dict, series: str, config: bytes, patches: list[Patch],
            arch: str | Arch | None = None) -> str:
    """The artifact key of an own tree: its content digest, its series, the
    architecture (off x86-64, whose keys predate it), the config fragments
    and every patch's diff (:attr:`Patch.diff`), in order."""
    a = get_arch(arch)
    h = hashlib.sha256()
    h.update(f"own-format={OWN_FORMAT}\ntree={digest['kind']}:{digest['id']}\n"
             f"series={series}\n".encode())
    if a is not X86_64:
        h.update(f"arch={a.name}\n".encode())
    h.update(config)
    for p in patches:       # the diffs: one patch as a file or in an mbox is one key
        h.update(p.diff.encode() + b"\0")
    return h.hexdigest()[:12]


def build_own(source_dir, patch_files=(), name: str = "mine", *, force: bool = False,
              jobs: int | None = None, quiet: bool = False, timings: dict | None = None,
              arch: str | Arch | None = None):
    """Build the kernel tree ``source_dir`` with ``patch_files`` applied
    (:func:`read_patches`) and ksmlens's config, as variant ``name``
    (``uname -r`` ends ``-ksmlens-NAME``) for ``arch`` (None: x86-64; arm64
    cross-built with Debian's ``gcc-aarch64-linux-gnu`` and the arm64
    fragment, like the lab's variants), or find it in the cache by content;
    returns its :class:`ksmlens.lab.kbuild.Kernel` and writes the variant's
    record, so ``vm up --variant NAME [--arch A]`` boots it.

    ``source_dir`` is never written: it is copied (``rsync -a --delete``,
    ``.git`` left out) to :func:`own_dir` ``/src``, patched there and built
    out of tree in :func:`own_dir` ``/tree``. ``timings`` (a dict) receives
    ``digest`` (s to hash the tree), ``digest_kind``, ``cache_hit``, ``copy``,
    ``build`` and ``total`` (s). Refused in one line: a version the config
    does not support, a tree built in place, a patch that does not apply, a
    failed build."""
    t0 = time.monotonic()
    timings = {} if timings is None else timings
    name = check_name(name)
    a = get_arch(arch)
    src = Path(source_dir).resolve()
    series = check_version(src, list(kbuild.SOURCES))
    source = kbuild.get_source(series)
    for built in (".config", "include/config/auto.conf"):
        if (src / built).exists():
            raise KsmlensError(f"{src} has been configured or built in place ({built}): "
                               "ksmlens builds out of tree (make O=), which needs a clean one",
                               f"give a clean tree (`make mrproper` in a copy of {src})")
    patches = read_patches(patch_files)
    config = b"".join(f.name.encode() + b"\0" + f.read_bytes()
                      for f in kbuild.fragments(source, a))
    work = own_dir(name, a)
    digest = tree_digest(src, stat_cache=work / "stat-cache.json")
    timings.update(digest=digest["seconds"], digest_kind=digest["kind"])
    key = own_key(digest, series, config, patches, a)
    record = {"source_dir": str(src), "series": series,
              "version": ".".join(map(str, tree_version(src))), "key": key,
              "digest": {k: digest[k] for k in ("kind", "id")},
              "patches": [{"name": p.name, "subject": p.subject, "sha": p.sha}
                          for p in patches]}
    out = kbuild.own_kernel_dir(name, key, a)

    def log(msg):
        if not quiet:
            print(f"ksmlens: {msg}", file=sys.stderr, flush=True)

    if not force and (out / "meta.json").exists():
        write_record(name, record, a)
        timings.update(cache_hit=True, total=round(time.monotonic() - t0, 2))
        return find_own_kernel(name, a)
    timings["cache_hit"] = False
    kbuild.require_tools(a, extra=("rsync",))
    with kbuild.BuildLock(cache_root() / "build.lock"):
        copy, tree = work / "src", work / "tree"
        copy.mkdir(parents=True, exist_ok=True)
        tc = time.monotonic()
        log(f"copying {src} to {copy}")
        r = subprocess.run(["rsync", "-a", "--delete", "--exclude=/.git", f"{src}/", f"{copy}/"],
                           capture_output=True, text=True)
        if r.returncode:
            raise KsmlensError(f"copying {src} failed: {(r.stderr or r.stdout).strip()[-200:]}",
                               f"is {src} readable, and is there room in {cache_root()}?")
        for p in patches:
            log(f"applying {p.name}: {p.subject}")
        apply_patches(copy, patches, shown_as=str(src))
        timings["copy"] = round(time.monotonic() - tc, 2)
        tmp_out = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp_out, ignore_errors=True)
        tmp_out.mkdir(parents=True)
        tb = time.monotonic()
        with open(tmp_out / "build.log", "w", buffering=1) as logf:
            kbuild.configure(copy, tree, source, logf, log, a)
            prog = None if quiet else kbuild.Progress(a.prefix + name, None)
            localversion = f"LOCALVERSION=-{name}"
            jobs = jobs or (os.cpu_count() or 1) + 1
            log(f"building {name} ({src}) for {a.name} in {tree} (log: {out}/build.log)")
            kbuild.make(copy, tree, [f"-j{jobs}", localversion, a.image], logf, prog, a)
            if prog:
                prog.show("done", end=True)
            release = subprocess.run(
                ["make", "-s", f"O={tree}", *a.make_args(), localversion, "kernelrelease"],
                cwd=copy, capture_output=True, text=True, check=True).stdout.strip()
        timings["build"] = round(time.monotonic() - tb, 2)
        for f, to in ((a.image_path, a.image), ("vmlinux", "vmlinux"), (".config", "config")):
            shutil.copy2(tree / f, tmp_out / to)
        meta = {"variant": name, "release": release, "key": key, "arch": a.name,
                "source": str(src),
                "source_name": series, "patches": record["patches"],
                "digest": record["digest"], "build_seconds": timings["build"],
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp_out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        kbuild.publish_build(tmp_out, out, f"{a.prefix}{name}-")   # and drop superseded ones
        write_record(name, record, a)
        log(f"built {release} for {a.name} in {timings['build']} s: {out}")
    timings["total"] = round(time.monotonic() - t0, 2)
    return find_own_kernel(name, a)
