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
 * pause-volatile | resume-volatile | quit.  "step" in the state JSON counts
 * the command lines handled before the current one (0 in "ready").
 * Page i of a "pattern" region depends only on i % distinct; "write" stamps
 * 8 unique bytes (pid, sequence) at the start of each named page.
 *
 * Build: gcc -O2 -Wall -Wextra -static -o ksmlens-workload ksmlens-workload.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
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
#include <sys/wait.h>

#define MPOL_MF_MOVE_ALL (1 << 2)	/* <linux/mempolicy.h>, no libnuma */
#define MAX_REGIONS 3
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
};

struct proc {				/* controller's view of one process */
	pid_t pid;
	const char *role;
	FILE *cmd, *rep;		/* pipes to a direct child (else NULL) */
	int relay;			/* grandchild: index of its parent, or -1 */
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

/* mmap, fill and MADV_MERGEABLE one region; NULL or an error message. */
static const char *map_region(const char *name, const char *content,
			      int fd, size_t off_pages)
{
	static char err[256];
	size_t len = npages * pagesz;
	int flags = MAP_PRIVATE | (fd < 0 ? MAP_ANONYMOUS : 0);
	off_t off = fd < 0 ? 0 : (off_t)(off_pages * pagesz);
	unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, flags, fd, off);
	struct region *r;

	if (p == MAP_FAILED) {
		snprintf(err, sizeof(err), "mmap %s (%zu pages): %s",
			 name, npages, strerror(errno));
		return err;
	}
	for (size_t i = 0; i < npages; i++) {
		unsigned char *pg = p + i * pagesz;
		if (!strcmp(content, "pattern"))
			fill_key(pg, i % distinct);
		else if (!strcmp(content, "same"))
			fill_key(pg, SAME_KEY);
		else				/* unique, volatile */
			fill_random(pg, pagesz, &rng);
	}
	if (madvise(p, len, MADV_MERGEABLE)) {
		snprintf(err, sizeof(err), "madvise(MADV_MERGEABLE) %s: %s",
			 name, strerror(errno));
		return err;
	}
	r = &my[nmy++];
	snprintf(r->name, sizeof(r->name), "%s", name);
	snprintf(r->content, sizeof(r->content), "%s", content);
	r->start = (unsigned long)p;
	r->pages = npages;
	r->pgoff = fd < 0 ? (unsigned long)p / pagesz : off_pages;
	r->file_backed = fd >= 0;
	return NULL;
}

/* Create this child's regions for the scenario; NULL or an error message. */
static const char *child_setup(void)
{
	static char err[256];
	const char *e;
	int fd, rc;

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
	return map_region("data", "pattern", -1, 0);	/* merge mremap fork */
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
			for (size_t k = 0; k < my[i].pages; k++, n++)
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
		if (procs[i].pid == pid)
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
	for (int i = 0; i < nprocs; i++) {
		struct proc *p = &procs[i];
		printf("%s{\"pid\":%d,\"role\":\"%s\",\"parent\":%d,"
		       "\"regions\":[", i ? "," : "", (int)p->pid, p->role,
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
			putchar('}');
		}
		printf("]}");
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
		if (only >= 0 && i != only)
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
		if (!find_region(&procs[i], "volatile"))
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
		die_setup("usage: %s merge|chain|mremap|smartscan|fork|file-cow "
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
