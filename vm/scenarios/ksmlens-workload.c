/*
 * ksmlens-workload - guest-side memory workload for ksmlens.
 *
 * Runs as root inside the ksmlens QEMU guest (Linux 6.12, KSM enabled).
 * The host-side driver starts it as
 *
 *   ksmlens-workload SCENARIO [--procs N] [--pages N] [--distinct N]
 *                             [--offset-pages N]
 *
 * and talks to it over stdin/stdout.  After setting up the scenario it
 * prints one line "ready <json>"; then, for every command line read from
 * stdin, it prints exactly one line "ok <json>" or "err <message>".
 * On "quit" or EOF all workload processes are killed and reaped.
 * This program never touches /sys/kernel/mm/ksm: the driver sets KSM knobs.
 *
 * Process layout:
 *  - The controller (this process) holds no scenario memory.  It is a child
 *    subreaper so that it can also reap grandchildren.
 *  - It forks one child per scenario process.  Each child mmaps and fills
 *    its regions, marks them MADV_MERGEABLE, reports them to the controller
 *    ("region NAME START PAGES PGOFF CONTENT" lines, then "ready") and then
 *    serves one-line commands over its pair of pipes, answering each with one
 *    line ("ok [payload]" or "err message").
 *  - A grandchild made by the "fork" command gets a pipe pair to its parent
 *    child, which relays controller lines of the form "@PID command".
 *  - Every child/grandchild has PR_SET_PDEATHSIG=SIGKILL, so the whole tree
 *    dies with the controller.
 *
 * move_pages(2) for "where"/"migrate" is issued by the controller on the
 * other processes' pids, via syscall(SYS_move_pages) (no libnuma).
 *
 * Commands: info | where | migrate NODE [PID] | write PID REGION I [J...] |
 * touch | merge | unmerge | mremap [PID [REGION]] | fork [PID] |
 * pause-volatile | resume-volatile | madvise PID REGION ADVICE FIRST COUNT |
 * mprotect PID REGION none|read|rw FIRST COUNT | read PID REGION FIRST COUNT |
 * pin PID REGION I | unpin PID | clone-vm [PID] | kill PID | sigbus PID |
 * churn PID PAGES MS | quit.
 * "step" in the state JSON counts the command lines handled before the
 * current one (0 in "ready").
 * Page i of a "pattern" region depends only on its key base + i % period
 * (the region's own period, else --distinct); "write" stamps 8 unique bytes
 * (pid, sequence) at the start of each named page.  A "zero" region is
 * written with zeros (private zero-filled pages, use_zero_pages material);
 * a "readzero" region is only read (the shared zero page, clean PTEs).
 * "pin" vmsplice()s a page into a pipe the process keeps open: the pipe
 * holds a reference on the page (so reclaim cannot free it) until "unpin".
 * "clone-vm" makes a clone(CLONE_VM) child that is not a thread (same mm,
 * own tgid); it only sleeps.  "kill" SIGKILLs and reaps a process.
 * "madvise PID REGION hwpoison I 1" injects a memory failure into page I
 * (MADV_HWPOISON, needs CONFIG_MEMORY_FAILURE); every process records the
 * SIGBUS it gets (si_code BUS_MCEERR_AR/AO, si_addr) and survives it;
 * "sigbus PID" reports them.
 * "churn" starts a thread in the process that, until "churn PID 0 0",
 * maps PAGES pages of 16 repeating contents, MADV_MERGEABLE, sleeps MS
 * milliseconds and munmaps them, again and again: ksmd keeps merging and
 * freeing rmap_items (paused walks land in its half-done updates).
 *
 * Build: gcc -O2 -Wall -Wextra -static -o ksmlens-workload ksmlens-workload.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>

#define MPOL_MF_MOVE_ALL (1 << 2)	/* <linux/mempolicy.h>, no libnuma */
#define MPOL_BIND 2
#ifndef PR_SET_MEMORY_MERGE		/* uapi of 6.4+; older libc headers lack it */
#define PR_SET_MEMORY_MERGE 67
#define PR_GET_MEMORY_MERGE 68
#endif
#ifndef MADV_COLD
#define MADV_COLD 20
#endif
#ifndef MADV_HWPOISON
#define MADV_HWPOISON 100
#endif
#ifndef BUS_MCEERR_AR
#define BUS_MCEERR_AR 4
#endif
#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif
#define MAX_REGIONS 4
#define MAX_PINS 16
#define THP_SIZE (2UL << 20)		/* x86_64 PMD-sized THP */
#define STATUS_UNSET INT_MIN		/* move_pages status slot not written */
#define SAME_KEY UINT64_MAX		/* pattern key of "same" content */
#define MREMAP_DISTANCE (1UL << 30)	/* mremap moves at least 1 GiB away */
#define VOLATILE_PERIOD_NS 200000000L	/* volatile region rewrite period */

struct region {
	char name[16];
	unsigned long start;		/* current start address */
	size_t pages;
	unsigned long pgoff;		/* vm_pgoff hint: anon start>>PAGE_SHIFT
					 * at mmap time, or the file offset */
	char content[16];		/* pattern, same, unique, volatile */
	int file_backed;		/* file-cow: MAP_PRIVATE of shm_path */
	unsigned long moved_from;	/* start before last mremap, 0 if none */
	char prot[8];			/* "rw", or what mprotect made of all of it */
};

/* How a child maps one region (child_setup()). */
struct spec {
	const char *name, *content;
	size_t pages;			/* 0: --pages */
	size_t period;			/* pattern period, 0: --distinct */
	uint64_t key_base;		/* pattern page i has key key_base + i % period */
	int node;			/* mbind(MPOL_BIND) to this node, -1: none */
	int flags;
};
#define SPEC_GUARD 1			/* PROT_NONE guard page either side: own VMA */
#define SPEC_THP 2			/* THP-aligned, MADV_HUGEPAGE before the fill */
#define SPEC_NOMADV 4			/* no MADV_MERGEABLE (prctl merges it) */

struct proc {				/* controller's view of one process */
	pid_t pid;
	const char *role;
	FILE *cmd, *rep;		/* pipes to a direct child (else NULL) */
	int relay;			/* grandchild: index of its parent, or -1 */
	int nocmd;			/* clone-vm child: takes no commands */
	int dead;			/* killed and reaped ("kill") */
	int nregions;
	struct region regions[MAX_REGIONS];
};

/* Options. */
static const char *scenario;
static int nprocs_opt = -1;
static size_t npages = 64, distinct = 16, offset_pages = 16;
static size_t pagesz;
static char shm_path[64];		/* file-cow backing file, "" if none */

/* Controller state. */
static pid_t controller;
static struct proc *procs;
static int nprocs;
static unsigned long step;		/* commands handled so far */

/* Child state (only meaningful inside a child or grandchild). */
static FILE *ctl_in, *ctl_out;		/* pipes to our parent */
static struct region my[MAX_REGIONS];
static int nmy;
static struct gkid { pid_t pid; FILE *cmd, *rep; } *gkids;
static int ngkids;
static uint64_t rng;
static unsigned long write_seq;
static int child_idx;			/* which scenario child we are */
static int pins[MAX_PINS];		/* read ends of "pin" pipes */
static int npins;
static struct {
	int running;			/* rewriting thread exists in this process */
	int paused;
	unsigned char *mem;		/* the "volatile" region, NULL if none */
	size_t len;
	pthread_mutex_t lock;		/* held while rewriting / mremapping */
} vol = { .lock = PTHREAD_MUTEX_INITIALIZER };

static const struct { const char *name; int procs; } scenarios[] = {
	{ "merge", 3 }, { "chain", 6 }, { "mremap", 2 },
	{ "smartscan", 1 }, { "fork", 2 }, { "file-cow", 2 },
	{ "zero-pages", 2 }, { "unmerge", 1 }, { "exit", 3 },
	{ "prot-none", 2 }, { "swap", 1 }, { "numa-nodes", 1 },
	{ "prctl", 2 }, { "thp", 2 }, { "clone-vm", 1 },
};

static int is(const char *s) { return strcmp(scenario, s) == 0; }

/* ---------------------------------------------------------------- content */

static uint64_t splitmix64(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static uint64_t new_seed(void)
{
	uint64_t s;
	if (getrandom(&s, sizeof(s), 0) != (ssize_t)sizeof(s))
		s = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32) ^
		    (uint64_t)(uintptr_t)&s;
	return s;
}

/* Fill len bytes (a multiple of 8) with the pseudo-random stream *s. */
static void fill_random(void *p, size_t len, uint64_t *s)
{
	uint64_t *w = p;
	for (size_t i = 0; i < len / 8; i++)
		w[i] = splitmix64(s);
}

/* Fill a page with content that depends only on key (same in every proc). */
static void fill_key(void *page, uint64_t key)
{
	uint64_t s = key ^ 0x6b736d6c656e7321ULL;	/* "ksmlens!" */
	fill_random(page, pagesz, &s);
}

/* ------------------------------------------------------------ child side */

#define CHURN_KEY 0xC4C4000000ULL
static struct {
	pthread_t thr;
	int running;
	volatile int stop;
	size_t pages;
	long ms;
	volatile unsigned long cycles;
} churn;

static void *churn_thread(void *arg)
{
	struct timespec ts = { churn.ms / 1000, (churn.ms % 1000) * 1000000L };
	(void)arg;
	while (!churn.stop) {
		size_t len = churn.pages * pagesz;
		char *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED) {
			nanosleep(&ts, NULL);
			continue;
		}
		for (size_t i = 0; i < churn.pages; i++)
			fill_key(p + i * pagesz, CHURN_KEY + i % 16);
		madvise(p, len, MADV_MERGEABLE);
		nanosleep(&ts, NULL);
		munmap(p, len);
		churn.cycles++;
	}
	return NULL;
}

/* "churn PAGES MS": start (or with PAGES 0 stop) the churn thread. */
static void child_churn(char **save)
{
	char *a = strtok_r(NULL, " \t", save), *b = strtok_r(NULL, " \t", save);
	char *end1 = NULL, *end2 = NULL;
	unsigned long pages = a ? strtoul(a, &end1, 10) : 0;
	long ms = b ? strtol(b, &end2, 10) : -1;
	int rc;

	if (!a || !b || *end1 || *end2 || ms < 0 || pages > (1UL << 24)) {
		fprintf(ctl_out, "err usage: churn PAGES MS\n");
		return;
	}
	if (churn.running) {
		churn.stop = 1;
		pthread_join(churn.thr, NULL);
		churn.running = 0;
	}
	if (pages) {
		churn.stop = 0;
		churn.pages = pages;
		churn.ms = ms;
		if ((rc = pthread_create(&churn.thr, NULL, churn_thread, NULL))) {
			fprintf(ctl_out, "err pthread_create: %s\n", strerror(rc));
			return;
		}
		churn.running = 1;
	}
	fprintf(ctl_out, "ok {\"churn\":%s,\"cycles\":%lu}\n",
		pages ? "true" : "false", churn.cycles);
}

static void *volatile_thread(void *arg)
{
	uint64_t s = new_seed();
	struct timespec ts = { 0, VOLATILE_PERIOD_NS };
	(void)arg;
	for (;;) {
		nanosleep(&ts, NULL);
		pthread_mutex_lock(&vol.lock);
		if (!vol.paused)
			fill_random(vol.mem, vol.len, &s);
		pthread_mutex_unlock(&vol.lock);
	}
	return NULL;
}

/* mmap, fill and (unless SPEC_NOMADV) MADV_MERGEABLE one region; NULL or
 * an error message. */
static const char *map_spec(const struct spec *sp, int fd, size_t off_pages)
{
	static char err[256];
	size_t n = sp->pages ? sp->pages : npages;
	size_t period = sp->period ? sp->period : distinct;
	size_t len = n * pagesz, extra = 0;
	int flags = MAP_PRIVATE | (fd < 0 ? MAP_ANONYMOUS : 0);
	off_t off = fd < 0 ? 0 : (off_t)(off_pages * pagesz);
	unsigned char *p, *base;
	volatile unsigned char sink = 0;
	struct region *r;

	if (sp->flags & SPEC_GUARD)
		extra = 2 * pagesz;
	else if (sp->flags & SPEC_THP)
		extra = THP_SIZE;
	base = mmap(NULL, len + extra, extra && !(sp->flags & SPEC_THP) ?
		    PROT_NONE : PROT_READ | PROT_WRITE, flags, fd, off);
	if (base == MAP_FAILED) {
		snprintf(err, sizeof(err), "mmap %s (%zu pages): %s",
			 sp->name, n, strerror(errno));
		return err;
	}
	p = base;
	if (sp->flags & SPEC_GUARD) {
		p = base + pagesz;
		if (mprotect(p, len, PROT_READ | PROT_WRITE)) {
			snprintf(err, sizeof(err), "mprotect %s: %s", sp->name,
				 strerror(errno));
			return err;
		}
	} else if (sp->flags & SPEC_THP) {
		p = (unsigned char *)(((uintptr_t)base + THP_SIZE - 1) &
				      ~(THP_SIZE - 1));
		if (p > base)
			munmap(base, p - base);
		munmap(p + len, base + extra - p);
		if (madvise(p, len, MADV_HUGEPAGE)) {
			snprintf(err, sizeof(err), "madvise(MADV_HUGEPAGE) %s: %s",
				 sp->name, strerror(errno));
			return err;
		}
	}
	if (sp->node >= 0) {
		unsigned long mask = 1UL << sp->node;
		if (syscall(SYS_mbind, p, len, MPOL_BIND, &mask,
			    8 * sizeof(mask), 0)) {
			snprintf(err, sizeof(err), "mbind %s to node %d: %s "
				 "(needs a NUMA node %d)", sp->name, sp->node,
				 strerror(errno), sp->node);
			return err;
		}
	}
	for (size_t i = 0; i < n; i++) {
		unsigned char *pg = p + i * pagesz;
		if (!strcmp(sp->content, "pattern"))
			fill_key(pg, sp->key_base + i % period);
		else if (!strcmp(sp->content, "same"))
			fill_key(pg, SAME_KEY);
		else if (!strcmp(sp->content, "zero"))
			memset(pg, 0, pagesz);	/* write fault: private zeros */
		else if (!strcmp(sp->content, "readzero"))
			sink += *(volatile unsigned char *)pg;	/* zero page */
		else				/* unique, volatile */
			fill_random(pg, pagesz, &rng);
	}
	(void)sink;
	if (!(sp->flags & SPEC_NOMADV) && madvise(p, len, MADV_MERGEABLE)) {
		snprintf(err, sizeof(err), "madvise(MADV_MERGEABLE) %s: %s",
			 sp->name, strerror(errno));
		return err;
	}
	r = &my[nmy++];
	snprintf(r->name, sizeof(r->name), "%s", sp->name);
	snprintf(r->content, sizeof(r->content), "%s", sp->content);
	snprintf(r->prot, sizeof(r->prot), "rw");
	r->start = (unsigned long)p;
	r->pages = n;
	r->pgoff = fd < 0 ? (unsigned long)p / pagesz : off_pages;
	r->file_backed = fd >= 0;
	return NULL;
}

static const char *map_region(const char *name, const char *content,
			      int fd, size_t off_pages)
{
	struct spec sp = { .name = name, .content = content, .node = -1 };
	return map_spec(&sp, fd, off_pages);
}

/* Map a list of specs; NULL or the first error. */
static const char *map_specs(const struct spec *sp, int n)
{
	const char *e;
	for (int i = 0; i < n; i++)
		if ((e = map_spec(&sp[i], -1, 0)))
			return e;
	return NULL;
}

#define SPECS(...) do { \
	const struct spec s_[] = { __VA_ARGS__ }; \
	return map_specs(s_, sizeof(s_) / sizeof(*s_)); \
} while (0)

/* The regions of the issue-9 scenarios, after the field programs in
 * shared/field/ (NN-*.c: same sizes and layouts). */
static const char *field_setup(void)
{
	static char err[256];

	if (is("zero-pages")) {
		if (child_idx == 0)	/* 02-zero-pages: Z, R, D */
			SPECS({ "zero", "zero", 64, 0, 0, -1, SPEC_GUARD },
			      { "read", "readzero", 16, 0, 0, -1, SPEC_GUARD },
			      { "equal", "same", 8, 0, 0, -1, SPEC_GUARD });
		/* 01-fork-counters: 16 contents x 2 pages, 16 zero pages */
		SPECS({ "pairs", "pattern", 32, 16, 0, -1, SPEC_GUARD },
		      { "zero", "zero", 16, 0, 0, -1, SPEC_GUARD });
	}
	if (is("unmerge"))		/* 05-unmerge-stale */
		SPECS({ "pairs", "pattern", 32, 16, 0, -1, SPEC_GUARD });
	if (is("exit")) {		/* 06-exited-sharer: P maps X; C1, C2 X + Y */
		if (child_idx == 0)
			SPECS({ "x", "pattern", 16, 16, 0, -1, SPEC_GUARD });
		SPECS({ "x", "pattern", 16, 16, 0, -1, SPEC_GUARD },
		      { "y", "pattern", 8, 8, 100, -1, SPEC_GUARD });
	}
	if (is("swap"))			/* 13-swap-ksm, reclaimed by memory.reclaim */
		SPECS({ "data", "pattern", 64, 16, 0, -1, SPEC_GUARD },
		      { "pinned", "same", 2, 0, 0, -1, SPEC_GUARD });
	if (is("numa-nodes"))		/* 08-numa-migrate: N0 on node 0, N1 on 1 */
		SPECS({ "n0", "pattern", 16, 8, 0, 0, SPEC_GUARD },
		      { "n1", "pattern", 16, 8, 0, 1, SPEC_GUARD });
	if (is("prctl")) {		/* no madvise: PR_SET_MEMORY_MERGE */
		if (prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) ||
		    prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0) != 1) {
			snprintf(err, sizeof(err), "prctl(PR_SET_MEMORY_MERGE): %s",
				 strerror(errno));
			return err;
		}
		SPECS({ "data", "pattern", 0, 0, 0, -1, SPEC_NOMADV });
	}
	if (is("thp"))			/* one PMD-sized THP of pattern pages */
		SPECS({ "data", "pattern", THP_SIZE / 4096, 0, 0, -1, SPEC_THP });	/* 4 KiB pages */
	return NULL;
}

/* Create this child's regions for the scenario; NULL or an error message. */
static const char *child_setup(void)
{
	static char err[256];
	const char *e;
	int fd, rc;

	if (is("zero-pages") || is("unmerge") || is("exit") || is("swap") ||
	    is("numa-nodes") || is("prctl") || is("thp"))
		return field_setup();
	if (is("chain"))
		return map_region("data", "same", -1, 0);
	if (is("file-cow")) {
		fd = open(shm_path, O_RDONLY);	/* MAP_PRIVATE needs read only */
		if (fd < 0) {
			snprintf(err, sizeof(err), "open %s: %s", shm_path,
				 strerror(errno));
			return err;
		}
		e = map_region("data", "pattern", fd, offset_pages);
		close(fd);
		return e;
	}
	if (is("smartscan")) {
		if ((e = map_region("unique", "unique", -1, 0)) ||
		    (e = map_region("volatile", "volatile", -1, 0)) ||
		    (e = map_region("data", "pattern", -1, 0)))
			return e;
		vol.mem = (unsigned char *)my[1].start;
		vol.len = my[1].pages * pagesz;
		pthread_t thr;
		if ((rc = pthread_create(&thr, NULL, volatile_thread, NULL))) {
			snprintf(err, sizeof(err), "pthread_create: %s",
				 strerror(rc));
			return err;
		}
		vol.running = 1;
		return NULL;
	}
	/* merge mremap fork prot-none clone-vm */
	return map_region("data", "pattern", -1, 0);
}

static struct region *find_my(const char *name)
{
	for (int i = 0; name && i < nmy; i++)
		if (!strcmp(my[i].name, name))
			return &my[i];
	return NULL;
}

static void child_loop(void) __attribute__((noreturn));

/* "@PID command": pass the command to our grandchild PID, relay its reply. */
static void relay(char *line)
{
	char *end, *rep = NULL;
	size_t cap = 0;
	long pid = strtol(line, &end, 10);

	for (int i = 0; i < ngkids; i++) {
		if (gkids[i].pid != pid)
			continue;
		fprintf(gkids[i].cmd, "%s\n", end + strspn(end, " \t"));
		fflush(gkids[i].cmd);
		if (getline(&rep, &cap, gkids[i].rep) <= 0)
			fprintf(ctl_out, "err grandchild %ld died\n", pid);
		else
			fprintf(ctl_out, "%.*s\n", (int)strcspn(rep, "\r\n"), rep);
		free(rep);
		return;
	}
	fprintf(ctl_out, "err no grandchild %ld\n", pid);
}

/* "write REGION I [J...]": stamp 8 unique bytes at the start of each page. */
static void child_write(struct region *r, char *rest)
{
	for (int pass = 0; pass < 2; pass++) {	/* validate, then write */
		char *p = rest, *end;
		int count = 0;
		for (;;) {
			p += strspn(p, " \t");
			if (!*p)
				break;
			errno = 0;
			unsigned long i = strtoul(p, &end, 10);
			if (end == p || (*end && *end != ' ' && *end != '\t') ||
			    errno || i >= r->pages) {
				fprintf(ctl_out, "err bad page index for %s\n",
					r->name);
				return;
			}
			if (pass) {
				uint64_t stamp = ((uint64_t)getpid() << 32) |
						 ++write_seq;
				memcpy((char *)(r->start + i * pagesz), &stamp,
				       sizeof(stamp));
			}
			count++;
			p = end;
		}
		if (!count) {
			fprintf(ctl_out, "err no page index given\n");
			return;
		}
	}
	fprintf(ctl_out, "ok\n");
}

/* "mremap REGION": move it >= 1 GiB away into a reserved PROT_NONE hole. */
static void child_mremap(struct region *r)
{
	size_t len = r->pages * pagesz;
	char *res, *want;
	void *got;
	int e;

	/* Reserve len + 2 GiB; the new spot is 1 GiB into the reservation, so
	 * it is >= 1 GiB from the old region whichever side that lies on. */
	res = mmap(NULL, len + 2 * MREMAP_DISTANCE, PROT_NONE,
		   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (res == MAP_FAILED) {
		fprintf(ctl_out, "err reserve: %s\n", strerror(errno));
		return;
	}
	want = res + MREMAP_DISTANCE;
	pthread_mutex_lock(&vol.lock);	/* the volatile thread may write it */
	got = mremap((void *)r->start, len, len, MREMAP_MAYMOVE | MREMAP_FIXED,
		     want);
	e = errno;
	if (got != MAP_FAILED && vol.mem == (unsigned char *)r->start)
		vol.mem = got;
	pthread_mutex_unlock(&vol.lock);
	/* Drop what is left of the reservation.  VM_MERGEABLE moved with the
	 * VMA, so no new madvise(MADV_MERGEABLE) is made. */
	munmap(res, MREMAP_DISTANCE);
	munmap(want + len, MREMAP_DISTANCE);
	if (got == MAP_FAILED) {
		munmap(want, len);
		fprintf(ctl_out, "err mremap: %s\n", strerror(e));
		return;
	}
	r->moved_from = r->start;
	r->start = (unsigned long)got;
	fprintf(ctl_out, "ok %lu %lu\n", r->moved_from, r->start);
}

/* "fork": make a grandchild that keeps our mappings and serves commands. */
static void child_fork(void)
{
	int c[2], r[2];
	pid_t parent = getpid(), pid;

	if (pipe(c) || pipe(r)) {
		fprintf(ctl_out, "err pipe: %s\n", strerror(errno));
		return;
	}
	fflush(ctl_out);
	fflush(stderr);
	pid = fork();
	if (pid < 0) {
		fprintf(ctl_out, "err fork: %s\n", strerror(errno));
		close(c[0]); close(c[1]); close(r[0]); close(r[1]);
		return;
	}
	if (pid == 0) {			/* grandchild */
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != parent)
			_exit(1);
		fclose(ctl_in);
		fclose(ctl_out);
		for (int i = 0; i < ngkids; i++) {
			fclose(gkids[i].cmd);
			fclose(gkids[i].rep);
		}
		ngkids = 0;
		vol.running = 0;	/* threads do not survive fork, and */
		pthread_mutex_init(&vol.lock, NULL);	/* it may have held this */
		close(c[1]);
		close(r[0]);
		ctl_in = fdopen(c[0], "r");
		ctl_out = fdopen(r[1], "w");
		child_loop();		/* never returns */
	}
	close(c[0]);
	close(r[1]);
	struct gkid *g = realloc(gkids, (ngkids + 1) * sizeof(*gkids));
	if (!g) {
		kill(pid, SIGKILL);
		fprintf(ctl_out, "err out of memory\n");
		return;
	}
	gkids = g;
	gkids[ngkids].pid = pid;
	gkids[ngkids].cmd = fdopen(c[1], "w");
	gkids[ngkids].rep = fdopen(r[0], "r");
	ngkids++;
	fprintf(ctl_out, "ok %d\n", (int)pid);
}

/* Parse "FIRST COUNT" of region r into a byte range; 0, or -1 with the
 * error reply written. */
static int child_range(struct region *r, char **save, unsigned long *addr,
		       size_t *len)
{
	char *a = strtok_r(NULL, " \t", save), *b = strtok_r(NULL, " \t", save);
	char *e1 = NULL, *e2 = NULL;
	unsigned long first = a ? strtoul(a, &e1, 10) : 0;
	unsigned long count = b ? strtoul(b, &e2, 10) : 0;

	if (!a || !b || *e1 || *e2 || !count || first >= r->pages ||
	    count > r->pages - first) {
		fprintf(ctl_out, "err bad page range for %s (%zu pages)\n",
			r->name, r->pages);
		return -1;
	}
	*addr = r->start + first * pagesz;
	*len = count * pagesz;
	return 0;
}

static const struct { const char *name; int advice; } advices[] = {
	{ "mergeable", MADV_MERGEABLE }, { "unmergeable", MADV_UNMERGEABLE },
	{ "dontneed", MADV_DONTNEED }, { "pageout", MADV_PAGEOUT },
	{ "cold", MADV_COLD }, { "hugepage", MADV_HUGEPAGE },
	{ "nohugepage", MADV_NOHUGEPAGE }, { "hwpoison", MADV_HWPOISON },
};

/* SIGBUS received (memory failure: BUS_MCEERR_AR / BUS_MCEERR_AO), kept
 * for the "sigbus" command; the process survives them. */
#define MAX_SIGBUS 16
static volatile sig_atomic_t nsigbus;
static struct { int code; unsigned long addr; } sigbus_seen[MAX_SIGBUS];

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
	(void)sig; (void)uc;
	if (nsigbus < MAX_SIGBUS) {
		sigbus_seen[nsigbus].code = si->si_code;
		sigbus_seen[nsigbus].addr = (unsigned long)si->si_addr;
	}
	nsigbus++;
}

/* "sigbus": "ok N CODE:ADDR ..." (the first MAX_SIGBUS). */
static void child_sigbus(void)
{
	fprintf(ctl_out, "ok %d", (int)nsigbus);
	for (int i = 0; i < nsigbus && i < MAX_SIGBUS; i++)
		fprintf(ctl_out, " %d:%lu", sigbus_seen[i].code,
			sigbus_seen[i].addr);
	fprintf(ctl_out, "\n");
}

/* "advise REGION ADVICE FIRST COUNT": madvise() on pages of a region. */
static void child_advise(struct region *r, char **save)
{
	char *name = strtok_r(NULL, " \t", save);
	unsigned long addr;
	size_t len, i;

	for (i = 0; name && i < sizeof(advices) / sizeof(*advices); i++)
		if (!strcmp(name, advices[i].name))
			break;
	if (!name || i == sizeof(advices) / sizeof(*advices)) {
		fprintf(ctl_out, "err unknown advice %s\n", name ? name : "");
		return;
	}
	if (child_range(r, save, &addr, &len))
		return;
	if (madvise((void *)addr, len, advices[i].advice))
		fprintf(ctl_out, "err madvise %s %s: %s\n", r->name, name,
			strerror(errno));
	else
		fprintf(ctl_out, "ok\n");
}

/* "protect REGION none|read|rw FIRST COUNT": mprotect() pages of a region. */
static void child_protect(struct region *r, char **save)
{
	char *name = strtok_r(NULL, " \t", save);
	int prot;
	unsigned long addr;
	size_t len;

	if (name && !strcmp(name, "none"))
		prot = PROT_NONE;
	else if (name && !strcmp(name, "read"))
		prot = PROT_READ;
	else if (name && !strcmp(name, "rw"))
		prot = PROT_READ | PROT_WRITE;
	else {
		fprintf(ctl_out, "err protection must be none, read or rw\n");
		return;
	}
	if (child_range(r, save, &addr, &len))
		return;
	if (mprotect((void *)addr, len, prot)) {
		fprintf(ctl_out, "err mprotect %s %s: %s\n", r->name, name,
			strerror(errno));
		return;
	}
	if (len == r->pages * pagesz)
		snprintf(r->prot, sizeof(r->prot), "%s", name);
	fprintf(ctl_out, "ok\n");
}

/* "read REGION FIRST COUNT": read one byte of each page (read faults,
 * swap-ins); replies with the number of pages read. */
static void child_read(struct region *r, char **save)
{
	unsigned long addr;
	size_t len;
	volatile unsigned char sink = 0;

	if (child_range(r, save, &addr, &len))
		return;
	for (size_t k = 0; k < len; k += pagesz)
		sink += *(volatile unsigned char *)(addr + k);
	(void)sink;
	fprintf(ctl_out, "ok %zu\n", len / pagesz);
}

/* "pin REGION I": vmsplice() page I into a pipe we keep: the pipe buffer
 * holds a page reference (FOLL_GET, no unshare), which pageout() refuses
 * to free (is_page_cache_freeable()), so a reclaimed page stays in the
 * swap cache.  "unpin" closes every such pipe. */
static void child_pin(struct region *r, char **save)
{
	char *a = strtok_r(NULL, " \t", save), *end = NULL;
	unsigned long i = a ? strtoul(a, &end, 10) : 0;
	struct iovec iov;
	int p[2];

	if (!a || *end || i >= r->pages) {
		fprintf(ctl_out, "err bad page index for %s\n", r->name);
		return;
	}
	if (npins == MAX_PINS) {
		fprintf(ctl_out, "err too many pins\n");
		return;
	}
	if (pipe(p)) {
		fprintf(ctl_out, "err pipe: %s\n", strerror(errno));
		return;
	}
	iov.iov_base = (void *)(r->start + i * pagesz);
	iov.iov_len = pagesz;
	if (vmsplice(p[1], &iov, 1, 0) != (ssize_t)pagesz) {
		fprintf(ctl_out, "err vmsplice: %s\n", strerror(errno));
		close(p[0]);
		close(p[1]);
		return;
	}
	close(p[1]);
	pins[npins++] = p[0];
	fprintf(ctl_out, "ok %d\n", npins);
}

static int clone_idle(void *arg)
{
	(void)arg;
	/* Shares our memory (and our libc state): no stdio, no errno use. */
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	for (;;)	/* pause() with no libc: arm64 has no SYS_pause; ppoll of nothing blocks */
		syscall(SYS_ppoll, NULL, 0, NULL, NULL, 0);
	return 0;
}

/* "clone-vm": a clone(CLONE_VM) child that is not a thread: our mm, its
 * own thread group (like a vfork child before exec, but we keep running). */
static void child_clone_vm(void)
{
	static char *stack;
	size_t sz = 64 * 1024;
	pid_t pid;

	if (!stack && (stack = mmap(NULL, sz, PROT_READ | PROT_WRITE,
				    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)) ==
	    MAP_FAILED) {
		stack = NULL;
		fprintf(ctl_out, "err mmap stack: %s\n", strerror(errno));
		return;
	}
	fflush(ctl_out);
	pid = clone(clone_idle, stack + sz, CLONE_VM | SIGCHLD, NULL);
	if (pid < 0)
		fprintf(ctl_out, "err clone: %s\n", strerror(errno));
	else
		fprintf(ctl_out, "ok %d\n", (int)pid);
}

/* Handle one command line; always writes exactly one reply line. */
static void child_command(char *line)
{
	char *save = NULL, *cmd;
	struct region *r;

	if (line[0] == '@') {
		relay(line + 1);
		return;
	}
	cmd = strtok_r(line, " \t", &save);
	if (!cmd) {
		fprintf(ctl_out, "err empty command\n");
	} else if (!strcmp(cmd, "touch")) {
		size_t n = 0;
		for (int i = 0; i < nmy; i++)
			for (size_t k = 0; strcmp(my[i].prot, "none") &&
			     k < my[i].pages; k++, n++)
				(void)*(volatile unsigned char *)
					(my[i].start + k * pagesz);
		fprintf(ctl_out, "ok %zu\n", n);
	} else if (!strcmp(cmd, "merge") || !strcmp(cmd, "unmerge")) {
		int adv = cmd[0] == 'm' ? MADV_MERGEABLE : MADV_UNMERGEABLE;
		for (int i = 0; i < nmy; i++) {
			if (madvise((void *)my[i].start, my[i].pages * pagesz,
				    adv)) {
				fprintf(ctl_out, "err madvise %s %s: %s\n", cmd,
					my[i].name, strerror(errno));
				return;
			}
		}
		fprintf(ctl_out, "ok\n");
	} else if (!strcmp(cmd, "write") || !strcmp(cmd, "mremap")) {
		char *name = strtok_r(NULL, " \t", &save);
		if (!(r = find_my(name ? name : "data")))
			fprintf(ctl_out, "err no region %s\n",
				name ? name : "data");
		else if (cmd[0] == 'w')
			child_write(r, save ? save : "");
		else
			child_mremap(r);
	} else if (!strcmp(cmd, "advise") || !strcmp(cmd, "protect") ||
		   !strcmp(cmd, "read") || !strcmp(cmd, "pin")) {
		char *name = strtok_r(NULL, " \t", &save);
		if (!(r = find_my(name)))
			fprintf(ctl_out, "err no region %s\n", name ? name : "");
		else if (cmd[0] == 'a')
			child_advise(r, &save);
		else if (cmd[0] == 'r')
			child_read(r, &save);
		else if (cmd[1] == 'r')
			child_protect(r, &save);
		else
			child_pin(r, &save);
	} else if (!strcmp(cmd, "sigbus")) {
		child_sigbus();
	} else if (!strcmp(cmd, "unpin")) {
		while (npins)
			close(pins[--npins]);
		fprintf(ctl_out, "ok\n");
	} else if (!strcmp(cmd, "clone-vm")) {
		child_clone_vm();
	} else if (!strcmp(cmd, "churn")) {
		child_churn(&save);
	} else if (!strcmp(cmd, "fork")) {
		child_fork();
	} else if (!strcmp(cmd, "pause-volatile") ||
		   !strcmp(cmd, "resume-volatile")) {
		if (!vol.mem) {
			fprintf(ctl_out, "err no volatile region\n");
			return;
		}
		if (vol.running)
			pthread_mutex_lock(&vol.lock);
		vol.paused = cmd[0] == 'p';
		if (vol.running)
			pthread_mutex_unlock(&vol.lock);
		fprintf(ctl_out, "ok\n");
	} else {
		fprintf(ctl_out, "err unknown child command %s\n", cmd);
	}
}

static void child_loop(void)
{
	char *line = NULL;
	size_t cap = 0;

	while (getline(&line, &cap, ctl_in) > 0) {
		line[strcspn(line, "\r\n")] = 0;
		child_command(line);
		fflush(ctl_out);
	}
	_exit(0);			/* parent closed our command pipe */
}

static void child_main(int cfd, int rfd) __attribute__((noreturn));
static void child_main(int cfd, int rfd)
{
	const char *e;
	int devnull;

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() != controller)
		_exit(1);
	signal(SIGTERM, SIG_DFL);
	signal(SIGINT, SIG_DFL);
	signal(SIGHUP, SIG_DFL);
	{	/* memory failure signals are recorded, not fatal ("sigbus") */
		struct sigaction sa = { .sa_sigaction = on_sigbus,
					.sa_flags = SA_SIGINFO | SA_RESTART };
		sigemptyset(&sa.sa_mask);
		sigaction(SIGBUS, &sa, NULL);
	}
	/* stdin/stdout carry the driver protocol: keep our hands off them. */
	if ((devnull = open("/dev/null", O_RDONLY)) >= 0) {
		dup2(devnull, 0);
		close(devnull);
	}
	dup2(2, 1);
	for (int i = 0; i < nprocs; i++) {	/* earlier siblings' pipes */
		if (procs[i].cmd)
			fclose(procs[i].cmd);
		if (procs[i].rep)
			fclose(procs[i].rep);
	}
	ctl_in = fdopen(cfd, "r");
	ctl_out = fdopen(rfd, "w");
	rng = new_seed();
	if ((e = child_setup())) {
		fprintf(ctl_out, "err %s\n", e);
		fflush(ctl_out);
		_exit(1);
	}
	for (int i = 0; i < nmy; i++)
		fprintf(ctl_out, "region %s %lu %zu %lu %s\n", my[i].name,
			my[i].start, my[i].pages, my[i].pgoff, my[i].content);
	fprintf(ctl_out, "ready\n");
	fflush(ctl_out);
	child_loop();
}

/* ------------------------------------------------------- controller side */

/* Kill and reap every workload process, remove the file-cow file. */
static void cleanup(void)
{
	for (int i = 0; i < nprocs; i++)
		if (!procs[i].dead)
			kill(procs[i].pid, SIGKILL);
	/* As a subreaper we also inherit and reap orphaned grandchildren. */
	for (;;) {
		if (waitpid(-1, NULL, 0) > 0 || errno == EINTR)
			continue;
		break;
	}
	if (shm_path[0])
		unlink(shm_path);
}

static void on_signal(int sig)
{
	/* Children die by PDEATHSIG; only the shm file needs removing. */
	if (getpid() == controller && shm_path[0])
		unlink(shm_path);
	_exit(128 + sig);
}

__attribute__((format(printf, 1, 2), noreturn))
static void die_setup(const char *fmt, ...)
{
	char msg[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	fprintf(stderr, "err %s\n", msg);
	printf("err %s\n", msg);
	fflush(stdout);
	cleanup();
	exit(1);
}

static struct proc *add_proc(pid_t pid, const char *role, int relay_idx)
{
	struct proc *p = realloc(procs, (nprocs + 1) * sizeof(*procs));
	if (!p) {
		kill(pid, SIGKILL);
		return NULL;
	}
	procs = p;
	p = &procs[nprocs++];
	memset(p, 0, sizeof(*p));
	p->pid = pid;
	p->role = role;
	p->relay = relay_idx;
	return p;
}

/* Fork one scenario child and collect its region report. */
static void spawn_child(void)
{
	int c[2], r[2];
	char *line = NULL;
	size_t cap = 0;
	struct proc *p;
	pid_t pid;

	if (pipe(c) || pipe(r))
		die_setup("pipe: %s", strerror(errno));
	fflush(stdout);
	fflush(stderr);
	if ((pid = fork()) < 0)
		die_setup("fork: %s", strerror(errno));
	if (pid == 0) {
		close(c[1]);
		close(r[0]);
		child_idx = nprocs;
		child_main(c[0], r[1]);
	}
	close(c[0]);
	close(r[1]);
	if (!(p = add_proc(pid, "sharer", -1)))
		die_setup("out of memory");
	p->cmd = fdopen(c[1], "w");
	p->rep = fdopen(r[0], "r");
	if (!p->cmd || !p->rep)
		die_setup("fdopen: %s", strerror(errno));
	for (;;) {
		struct region rg = { 0 };
		if (getline(&line, &cap, p->rep) <= 0)
			die_setup("child %d died during setup", (int)pid);
		line[strcspn(line, "\r\n")] = 0;
		if (!strcmp(line, "ready"))
			break;
		if (!strncmp(line, "err ", 4))
			die_setup("child %d: %s", (int)pid, line + 4);
		if (p->nregions >= MAX_REGIONS ||
		    sscanf(line, "region %15s %lu %zu %lu %15s", rg.name,
			   &rg.start, &rg.pages, &rg.pgoff, rg.content) != 5)
			die_setup("child %d: bad setup line '%s'", (int)pid, line);
		rg.file_backed = shm_path[0] != 0;
		snprintf(rg.prot, sizeof(rg.prot), "rw");
		p->regions[p->nregions++] = rg;
	}
	free(line);
}

/* Send one command to procs[i] (relayed through its parent for a
 * grandchild) and read the reply payload into buf.  0 on "ok", -1 on
 * error with the message in buf. */
__attribute__((format(printf, 4, 5)))
static int proc_cmd(int i, char *buf, size_t len, const char *fmt, ...)
{
	struct proc *p = &procs[i];
	struct proc *via = p->relay >= 0 ? &procs[p->relay] : p;
	char *line = NULL;
	size_t cap = 0;
	int rc = -1;
	va_list ap;

	if (p->dead || p->nocmd) {
		snprintf(buf, len, "pid %d %s", (int)p->pid, p->dead ?
			 "was killed" : "takes no commands (clone-vm child)");
		return -1;
	}
	if (p->relay >= 0)
		fprintf(via->cmd, "@%d ", (int)p->pid);
	va_start(ap, fmt);
	vfprintf(via->cmd, fmt, ap);
	va_end(ap);
	fputc('\n', via->cmd);
	if (fflush(via->cmd) || getline(&line, &cap, via->rep) <= 0) {
		snprintf(buf, len, "pid %d: process gone", (int)p->pid);
	} else {
		line[strcspn(line, "\r\n")] = 0;
		if (!strncmp(line, "ok", 2) && (!line[2] || line[2] == ' ')) {
			snprintf(buf, len, "%s", line[2] ? line + 3 : "");
			rc = 0;
		} else {
			snprintf(buf, len, "pid %d: %s", (int)p->pid,
				 strncmp(line, "err ", 4) ? line : line + 4);
		}
	}
	free(line);
	return rc;
}

static int find_pid(const char *s)
{
	char *end;
	long pid = s ? strtol(s, &end, 10) : 0;

	for (int i = 0; s && !*end && i < nprocs; i++)
		if (procs[i].pid == pid && !procs[i].dead)
			return i;
	return -1;
}

static struct region *find_region(struct proc *p, const char *name)
{
	for (int j = 0; j < p->nregions; j++)
		if (!strcmp(p->regions[j].name, name))
			return &p->regions[j];
	return NULL;
}

static void print_state(void)
{
	printf("{\"scenario\":\"%s\",\"controller\":%d,\"page_size\":%zu,"
	       "\"distinct\":%zu,\"procs\":[", scenario, (int)controller,
	       pagesz, distinct);
	int first = 1;

	for (int i = 0; i < nprocs; i++) {
		struct proc *p = &procs[i];
		if (p->dead)
			continue;
		printf("%s{\"pid\":%d,\"role\":\"%s\",\"parent\":%d,"
		       "\"regions\":[", first ? "" : ",", (int)p->pid, p->role,
		       p->relay >= 0 ? (int)procs[p->relay].pid : (int)controller);
		for (int j = 0; j < p->nregions; j++) {
			struct region *r = &p->regions[j];
			printf("%s{\"name\":\"%s\",\"start\":%lu,\"pages\":%zu,"
			       "\"vm_pgoff_hint\":%lu,\"content\":\"%s\"",
			       j ? "," : "", r->name, r->start, r->pages,
			       r->pgoff, r->content);
			if (r->file_backed)
				printf(",\"file\":\"%s\",\"file_offset_pages\":%zu",
				       shm_path, offset_pages);
			if (r->moved_from)
				printf(",\"moved_from\":%lu", r->moved_from);
			if (r->prot[0] && strcmp(r->prot, "rw"))
				printf(",\"prot\":\"%s\"", r->prot);
			putchar('}');
		}
		printf("]}");
		first = 0;
	}
	printf("],\"exited\":[");
	first = 1;
	for (int i = 0; i < nprocs; i++)
		if (procs[i].dead) {
			printf("%s%d", first ? "" : ",", (int)procs[i].pid);
			first = 0;
		}
	printf("],\"step\":%lu}", step);
}

/* "where" (node < 0) or "migrate NODE [PID]" (only = proc index or -1). */
static void cmd_move_pages(int node, int only)
{
	size_t max = 0;
	int first = 1;

	for (int i = 0; i < nprocs; i++)
		for (int j = 0; j < procs[i].nregions; j++)
			if (procs[i].regions[j].pages > max)
				max = procs[i].regions[j].pages;
	void **addrs = calloc(max + 1, sizeof(*addrs));
	int *nodes = calloc(max + 1, sizeof(int));
	int *status = calloc(max + 1, sizeof(int));
	if (!addrs || !nodes || !status) {
		printf("err out of memory\n");
		goto out;
	}
	printf("ok {\"%s\":[", node < 0 ? "where" : "migrate");
	for (int i = 0; i < nprocs; i++) {
		if (procs[i].dead || (only >= 0 && i != only))
			continue;
		for (int j = 0; j < procs[i].nregions; j++) {
			struct region *r = &procs[i].regions[j];
			for (size_t k = 0; k < r->pages; k++) {
				addrs[k] = (void *)(r->start + k * pagesz);
				nodes[k] = node;
				status[k] = STATUS_UNSET;
			}
			long rc = syscall(SYS_move_pages, procs[i].pid,
					  (unsigned long)r->pages, addrs,
					  node < 0 ? NULL : nodes, status,
					  node < 0 ? 0 : MPOL_MF_MOVE_ALL);
			if (rc < 0)
				rc = -errno;
			printf("%s{\"pid\":%d,\"region\":\"%s\",\"rc\":%ld,"
			       "\"status\":[", first ? "" : ",",
			       (int)procs[i].pid, r->name, rc);
			first = 0;
			for (size_t k = 0; k < r->pages; k++) {
				if (status[k] == STATUS_UNSET)
					printf("%snull", k ? "," : "");
				else
					printf("%s%d", k ? "," : "", status[k]);
			}
			printf("]}");
		}
	}
	printf("]}\n");
out:
	free(addrs);
	free(nodes);
	free(status);
}

/* Send the same command to every process; reply with the summed payload. */
static void cmd_all(const char *cmd, const char *key)
{
	char buf[512];
	unsigned long total = 0;

	for (int i = 0; i < nprocs; i++) {
		if (procs[i].dead || procs[i].nocmd)
			continue;
		if (proc_cmd(i, buf, sizeof(buf), "%s", cmd)) {
			printf("err %s\n", buf);
			return;
		}
		total += strtoul(buf, NULL, 10);
	}
	if (!strcmp(cmd, "touch"))
		printf("ok {\"%s\":%lu}\n", key, total);
	else
		printf("ok {\"%s\":true}\n", key);
}

static void cmd_write(int argc, char **argv)
{
	int i = find_pid(argv[1]);
	struct region *r = i < 0 ? NULL : find_region(&procs[i], argv[2]);
	char buf[512], *list, *end;
	size_t len = 1;

	if (i < 0 || !r) {
		printf("err no such %s %s\n", i < 0 ? "pid" : "region",
		       i < 0 ? argv[1] : argv[2]);
		return;
	}
	for (int k = 3; k < argc; k++) {	/* validate the page indices */
		unsigned long idx = strtoul(argv[k], &end, 10);
		if (*end || argv[k][0] < '0' || argv[k][0] > '9' ||
		    idx >= r->pages) {
			printf("err bad page index %s (region %s has %zu pages)\n",
			       argv[k], r->name, r->pages);
			return;
		}
		len += strlen(argv[k]) + 1;
	}
	if (!(list = calloc(1, len))) {
		printf("err out of memory\n");
		return;
	}
	for (int k = 3; k < argc; k++)
		strcat(strcat(list, " "), argv[k]);
	if (proc_cmd(i, buf, sizeof(buf), "write %s%s", r->name, list)) {
		printf("err %s\n", buf);
	} else {
		printf("ok {\"pid\":%d,\"region\":\"%s\",\"written\":[",
		       (int)procs[i].pid, r->name);
		for (int k = 3; k < argc; k++)
			printf("%s%lu", k > 3 ? "," : "", strtoul(argv[k], NULL, 10));
		printf("]}\n");
	}
	free(list);
}

static void cmd_mremap(int argc, char **argv)
{
	int i = argc > 1 ? find_pid(argv[1]) : 0;
	const char *name = argc > 2 ? argv[2] : "data";
	struct region *r = i < 0 ? NULL : find_region(&procs[i], name);
	unsigned long old, new;
	char buf[512];

	if (!r) {
		printf("err %s\n", i < 0 ? "no such pid" : "no such region");
		return;
	}
	if (proc_cmd(i, buf, sizeof(buf), "mremap %s", name)) {
		printf("err %s\n", buf);
		return;
	}
	if (sscanf(buf, "%lu %lu", &old, &new) != 2) {
		printf("err bad mremap reply '%s'\n", buf);
		return;
	}
	r->moved_from = old;
	r->start = new;
	printf("ok {\"pid\":%d,\"region\":\"%s\",\"old\":%lu,\"new\":%lu}\n",
	       (int)procs[i].pid, name, old, new);
}

static void cmd_fork(int argc, char **argv)
{
	int i = argc > 1 ? find_pid(argv[1]) : 0;
	char buf[512];
	struct proc *g;
	int gpid;

	if (i < 0 || procs[i].relay >= 0) {
		printf("err %s\n", i < 0 ? "no such pid" :
		       "only direct children can fork");
		return;
	}
	if (proc_cmd(i, buf, sizeof(buf), "fork")) {
		printf("err %s\n", buf);
		return;
	}
	if (sscanf(buf, "%d", &gpid) != 1) {
		printf("err bad fork reply '%s'\n", buf);
		return;
	}
	if (!(g = add_proc(gpid, "forked", i))) {
		printf("err out of memory\n");
		return;
	}
	g->nregions = procs[i].nregions;	/* inherited mappings */
	memcpy(g->regions, procs[i].regions, sizeof(g->regions));
	printf("ok {\"forked\":%d}\n", gpid);
}

static void cmd_volatile(const char *cmd)
{
	char buf[512];
	int n = 0;

	for (int i = 0; i < nprocs; i++) {
		if (procs[i].dead || !find_region(&procs[i], "volatile"))
			continue;
		if (proc_cmd(i, buf, sizeof(buf), "%s", cmd)) {
			printf("err %s\n", buf);
			return;
		}
		n++;
	}
	if (!n)
		printf("err no process has a volatile region\n");
	else
		printf("ok {\"volatile\":\"%s\",\"procs\":%d}\n",
		       cmd[0] == 'p' ? "paused" : "running", n);
}

/* "madvise PID REGION ADVICE FIRST COUNT", "mprotect PID REGION PROT FIRST
 * COUNT", "read PID REGION FIRST COUNT", "pin PID REGION I": forwarded to
 * the process as advise / protect / read / pin REGION ... */
static void cmd_region_op(int argc, char **argv)
{
	static const struct { const char *cmd, *child; int argc; } ops[] = {
		{ "madvise", "advise", 6 }, { "mprotect", "protect", 6 },
		{ "read", "read", 5 }, { "pin", "pin", 4 },
	};
	char buf[512], args[256] = "";
	size_t k;
	int i;
	struct region *r;

	for (k = 0; strcmp(ops[k].cmd, argv[0]); k++)
		;
	if (argc != ops[k].argc) {
		printf("err usage: %s PID REGION %s\n", argv[0],
		       k == 0 ? "ADVICE FIRST COUNT" : k == 1 ?
		       "none|read|rw FIRST COUNT" : k == 2 ? "FIRST COUNT" : "I");
		return;
	}
	i = find_pid(argv[1]);
	r = i < 0 ? NULL : find_region(&procs[i], argv[2]);
	if (!r) {
		printf("err no such %s %s\n", i < 0 ? "pid" : "region",
		       i < 0 ? argv[1] : argv[2]);
		return;
	}
	for (int a = 3; a < argc; a++)
		snprintf(args + strlen(args), sizeof(args) - strlen(args),
			 "%s%s", a > 3 ? " " : "", argv[a]);
	if (proc_cmd(i, buf, sizeof(buf), "%s %s %s", ops[k].child, r->name,
		     args)) {
		printf("err %s\n", buf);
		return;
	}
	if (k == 1 && !strcmp(argv[4], "0") &&
	    strtoul(argv[5], NULL, 10) == r->pages)
		snprintf(r->prot, sizeof(r->prot), "%s", argv[3]);
	printf("ok {\"pid\":%d,\"region\":\"%s\",\"%s\":\"%s\"",
	       (int)procs[i].pid, r->name, argv[0], args);
	if (buf[0])
		printf(",\"result\":%ld", strtol(buf, NULL, 10));
	printf("}\n");
}

/* "unpin PID" and "clone-vm [PID]". */
static void cmd_proc_op(int argc, char **argv)
{
	int i = argc > 1 ? find_pid(argv[1]) : 0;
	char buf[512];
	struct proc *c;
	int cpid;

	if (i < 0 || argc > 2 || (argc < 2 && argv[0][0] == 'u')) {
		printf("err %s\n", argc > 2 || argc < 2 ? "usage: unpin PID | "
		       "clone-vm [PID]" : "no such pid");
		return;
	}
	if (proc_cmd(i, buf, sizeof(buf), "%s", argv[0])) {
		printf("err %s\n", buf);
		return;
	}
	if (argv[0][0] == 'u') {
		printf("ok {\"unpinned\":%d}\n", (int)procs[i].pid);
		return;
	}
	if (sscanf(buf, "%d", &cpid) != 1 ||
	    !(c = add_proc(cpid, "clone-vm", i))) {
		printf("err bad clone-vm reply '%s'\n", buf);
		return;
	}
	c->nocmd = 1;			/* shares procs[i]'s mm and regions */
	printf("ok {\"clone_vm\":%d,\"mm_of\":%d}\n", cpid, (int)procs[i].pid);
}

/* "sigbus PID": the SIGBUS the process received, as
 * {"pid":P,"count":N,"signals":[[SI_CODE,ADDR],...]}. */
static void cmd_sigbus(int argc, char **argv)
{
	int i = argc == 2 ? find_pid(argv[1]) : -1;
	char buf[512], *p, *end;
	long n;

	if (i < 0) {
		printf("err %s\n", argc != 2 ? "usage: sigbus PID" : "no such pid");
		return;
	}
	if (proc_cmd(i, buf, sizeof(buf), "sigbus")) {
		printf("err %s\n", buf);
		return;
	}
	n = strtol(buf, &p, 10);
	printf("ok {\"pid\":%d,\"count\":%ld,\"signals\":[", (int)procs[i].pid, n);
	for (int k = 0; *p; k++) {
		long code = strtol(p, &end, 10);
		unsigned long addr = *end == ':' ? strtoul(end + 1, &end, 10) : 0;
		if (end == p)
			break;
		printf("%s[%ld,%lu]", k ? "," : "", code, addr);
		p = end;
	}
	printf("]}\n");
}

/* "churn PID PAGES MS": forwarded to the process as churn PAGES MS. */
static void cmd_churn(int argc, char **argv)
{
	char buf[512];
	int i = argc == 4 ? find_pid(argv[1]) : -1;

	if (argc != 4) {
		printf("err usage: churn PID PAGES MS (PAGES 0: stop)\n");
		return;
	}
	if (i < 0) {
		printf("err no such pid %s\n", argv[1]);
		return;
	}
	if (proc_cmd(i, buf, sizeof(buf), "churn %s %s", argv[2], argv[3]))
		printf("err %s\n", buf);
	else
		printf("ok %s\n", buf);
}

/* "kill PID": SIGKILL, reap (a direct child), and forget it; what it forked
 * or cloned dies with it (PR_SET_PDEATHSIG). */
static void cmd_kill(int argc, char **argv)
{
	int i = argc == 2 ? find_pid(argv[1]) : -1;
	pid_t pid;

	if (i < 0) {
		printf("err %s\n", argc == 2 ? "no such pid" : "usage: kill PID");
		return;
	}
	pid = procs[i].pid;
	kill(pid, SIGKILL);
	if (procs[i].relay < 0)		/* ours: the mm is gone once reaped */
		while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
			;
	procs[i].dead = 1;
	printf("ok {\"killed\":[%d", (int)pid);
	for (int j = 0; j < nprocs; j++)
		if (procs[j].relay == i && !procs[j].dead) {
			procs[j].dead = 1;
			printf(",%d", (int)procs[j].pid);
		}
	printf("]}\n");
}

/* Execute one driver command; prints exactly one reply line. */
static void command(int argc, char **argv)
{
	const char *c = argv[0];

	if (!strcmp(c, "info")) {
		printf("ok ");
		print_state();
		putchar('\n');
	} else if (!strcmp(c, "where")) {
		cmd_move_pages(-1, -1);
	} else if (!strcmp(c, "migrate")) {
		char *end = NULL;
		long node = argc > 1 ? strtol(argv[1], &end, 10) : -1;
		int only = argc > 2 ? find_pid(argv[2]) : -1;
		if (argc < 2 || argc > 3 || *end || node < 0 || node > INT_MAX)
			printf("err usage: migrate NODE [PID]\n");
		else if (argc > 2 && only < 0)
			printf("err no such pid %s\n", argv[2]);
		else
			cmd_move_pages((int)node, only);
	} else if (!strcmp(c, "write")) {
		if (argc < 4)
			printf("err usage: write PID REGION I [J...]\n");
		else
			cmd_write(argc, argv);
	} else if (!strcmp(c, "touch")) {
		cmd_all("touch", "touched");
	} else if (!strcmp(c, "merge") || !strcmp(c, "unmerge")) {
		cmd_all(c, c);
	} else if (!strcmp(c, "mremap")) {
		cmd_mremap(argc, argv);
	} else if (!strcmp(c, "fork")) {
		cmd_fork(argc, argv);
	} else if (!strcmp(c, "pause-volatile") ||
		   !strcmp(c, "resume-volatile")) {
		cmd_volatile(c);
	} else if (!strcmp(c, "madvise") || !strcmp(c, "mprotect") ||
		   !strcmp(c, "read") || !strcmp(c, "pin")) {
		cmd_region_op(argc, argv);
	} else if (!strcmp(c, "unpin") || !strcmp(c, "clone-vm")) {
		cmd_proc_op(argc, argv);
	} else if (!strcmp(c, "sigbus")) {
		cmd_sigbus(argc, argv);
	} else if (!strcmp(c, "kill")) {
		cmd_kill(argc, argv);
	} else if (!strcmp(c, "churn")) {
		cmd_churn(argc, argv);
	} else {
		printf("err unknown command %.64s\n", c);
	}
}

static size_t parse_num(const char *opt, const char *s, size_t min)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = s ? strtoull(s, &end, 10) : 0;
	if (!s || !*s || *end || errno || s[0] == '-' || v < min ||
	    v > (1ULL << 30))
		die_setup("bad value for %s: %s", opt, s ? s : "(missing)");
	return v;
}

int main(int argc, char **argv)
{
	char *line = NULL, **args;
	size_t cap = 0;
	ssize_t n;
	int nchild;

	controller = getpid();
	pagesz = sysconf(_SC_PAGESIZE);
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v = argv[i + 1];
		if (a[0] != '-') {
			if (scenario)
				die_setup("more than one scenario given");
			scenario = a;
			continue;
		}
		if (!strcmp(a, "--procs"))
			nprocs_opt = (int)parse_num(a, v, 1);
		else if (!strcmp(a, "--pages"))
			npages = parse_num(a, v, 1);
		else if (!strcmp(a, "--distinct"))
			distinct = parse_num(a, v, 1);
		else if (!strcmp(a, "--offset-pages"))
			offset_pages = parse_num(a, v, 0);
		else
			die_setup("unknown option %s", a);
		i++;
	}
	nchild = -1;
	for (size_t i = 0; scenario && i < sizeof(scenarios) / sizeof(*scenarios); i++)
		if (is(scenarios[i].name))
			nchild = nprocs_opt > 0 ? nprocs_opt : scenarios[i].procs;
	if (nchild < 0)
		die_setup("usage: %s merge|chain|mremap|smartscan|fork|file-cow|"
			  "zero-pages|unmerge|exit|prot-none|swap|numa-nodes|"
			  "prctl|thp|clone-vm "
			  "[--procs N] [--pages N] [--distinct N] "
			  "[--offset-pages N]", argv[0]);

	signal(SIGPIPE, SIG_IGN);	/* dead child: EPIPE, not death */
	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);
	signal(SIGHUP, on_signal);
	if (prctl(PR_SET_CHILD_SUBREAPER, 1))
		die_setup("PR_SET_CHILD_SUBREAPER: %s", strerror(errno));

	if (is("file-cow")) {
		char path[sizeof(shm_path)];
		int fd;
		snprintf(path, sizeof(path), "/dev/shm/ksmlens-file-cow-%d",
			 (int)controller);
		if ((fd = open(path, O_RDWR | O_CREAT | O_EXCL, 0600)) < 0)
			die_setup("create %s: %s", path, strerror(errno));
		memcpy(shm_path, path, sizeof(path));	/* ours: delete at exit */
		if (ftruncate(fd, (off_t)((offset_pages + npages) * pagesz)))
			die_setup("ftruncate %s: %s", path, strerror(errno));
		close(fd);
	}
	for (int i = 0; i < nchild; i++)
		spawn_child();

	printf("ready ");
	print_state();
	putchar('\n');
	fflush(stdout);

	while ((n = getline(&line, &cap, stdin)) >= 0) {
		int ac = 0;
		char *save = NULL, *tok;

		if (!(args = calloc(n / 2 + 2, sizeof(*args)))) {
			printf("err out of memory\n");
		} else {
			for (tok = strtok_r(line, " \t\r\n", &save); tok;
			     tok = strtok_r(NULL, " \t\r\n", &save))
				args[ac++] = tok;
			if (ac == 0) {
				printf("err empty command\n");
			} else if (!strcmp(args[0], "quit")) {
				cleanup();
				printf("ok {\"quit\":true}\n");
				fflush(stdout);
				return 0;
			} else {
				command(ac, args);
			}
			free(args);
		}
		fflush(stdout);
		step++;
	}
	cleanup();			/* EOF on stdin */
	return 0;
}
