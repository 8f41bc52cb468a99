// SPDX-License-Identifier: GPL-2.0
/*
 * ksm-mremap-migrate: ksmlens's equivalent of the kernel selftest
 * tools/testing/selftests/mm/rmap.c TEST_F(migrate, ksm_and_mremap), which
 * the "ksm: rmap_walk_ksm() pgoff" series added in v7.3 (it is not in 6.12).
 * Written from the test's public description, not copied:
 *
 *   32 anonymous pages with the same content; the upper 16 are mremap()ed
 *   (MREMAP_MAYMOVE | MREMAP_FIXED) over the lower 16, so the VMA now at the
 *   old start keeps the vm_pgoff of the upper half (mm/mremap.c keeps the
 *   pgoff of a VMA that has an anon_vma); KSM merges its 16 pages into one KSM
 *   page; that page is migrated to the other NUMA node with
 *   move_pages(MPOL_MF_MOVE_ALL). Migration unmaps the page through
 *   rmap_walk_ksm(): a kernel whose walk searches address >> PAGE_SHIFT (the
 *   series' v1-v3) finds none of the 16 mappings, so the page cannot move.
 *
 * Prints TAP (one test); exit 0 pass, 1 fail, 4 skip (kselftest's codes).
 *   --hold     after the merge print "merged ..." and wait for a line on
 *              stdin before migrating (ksmlens runs its own verify there)
 *   --timeout S  how long to wait for KSM to merge (default 120 s)
 *
 * Needs root (KSM sysfs, pagemap PFNs) and two NUMA nodes. Built statically
 * on the host by ksmlens (no libnuma: move_pages is a raw syscall).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NPAGES 32
#define HALF (NPAGES / 2)
#define KSM "/sys/kernel/mm/ksm/"
#define MPOL_MF_MOVE_ALL (1 << 2)
#define KSFT_PASS 0
#define KSFT_FAIL 1
#define KSFT_SKIP 4
#define STATUS_UNSET (-100000)

static long psize;
static char saved_run[16];
static int run_saved;

static long read_long(const char *path)
{
	char buf[64];
	long v = -1;
	int fd = open(path, O_RDONLY);

	if (fd < 0)
		return -1;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);

	close(fd);
	if (n > 0) {
		buf[n] = 0;
		v = strtol(buf, NULL, 10);
	}
	return v;
}

static int write_str(const char *path, const char *s)
{
	int fd = open(path, O_WRONLY);

	if (fd < 0)
		return -1;
	ssize_t n = write(fd, s, strlen(s));

	close(fd);
	return n == (ssize_t)strlen(s) ? 0 : -1;
}

static void restore_run(void)
{
	if (run_saved)
		write_str(KSM "run", saved_run);
}

static int finish(int code, const char *why)
{
	restore_run();
	if (code == KSFT_PASS)
		printf("ok 1 migrate.ksm_and_mremap\n");
	else if (code == KSFT_SKIP)
		printf("ok 1 migrate.ksm_and_mremap # SKIP %s\n", why);
	else
		printf("not ok 1 migrate.ksm_and_mremap # %s\n", why);
	printf("# Totals: pass:%d fail:%d skip:%d\n", code == KSFT_PASS,
	       code == KSFT_FAIL, code == KSFT_SKIP);
	fflush(stdout);
	return code;
}

/* The PFN mapped at addr (pagemap; root sees PFNs), or 0 if not present. */
static uint64_t pfn_of(int pagemap, void *addr)
{
	uint64_t e;

	if (pread(pagemap, &e, sizeof(e), (uintptr_t)addr / psize * sizeof(e)) != sizeof(e))
		return 0;
	if (!(e & (1ULL << 63)))
		return 0;
	return e & ((1ULL << 55) - 1);
}

static long move_pages1(void *addr, const int *node, int *status, int flags)
{
	void *pages[1] = { addr };

	return syscall(SYS_move_pages, 0, 1UL, pages, node, status, flags);
}

/* The node the page at addr is on, or a negative errno. */
static int node_of(void *addr)
{
	int status = -1;

	if (move_pages1(addr, NULL, &status, 0))
		return -errno;
	return status;
}

static int all_merged(int pagemap, char *p, uint64_t *pfn)
{
	uint64_t first = pfn_of(pagemap, p);

	if (!first)
		return 0;
	for (int i = 1; i < HALF; i++)
		if (pfn_of(pagemap, p + i * psize) != first)
			return 0;
	*pfn = first;
	return 1;
}

int main(int argc, char **argv)
{
	int hold = 0;
	double timeout = 120;
	char *base, *moved;
	uint64_t pfn = 0, pfn_after;
	int pagemap, nodes, src, dst, status = -1, after;
	long ret, scans0;
	struct timespec t0, t;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--hold"))
			hold = 1;
		else if (!strcmp(argv[i], "--timeout") && i + 1 < argc)
			timeout = atof(argv[++i]);
		else {
			fprintf(stderr, "usage: %s [--hold] [--timeout S]\n", argv[0]);
			return 2;
		}
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("TAP version 13\n1..1\n");
	psize = sysconf(_SC_PAGESIZE);

	/* Two nodes with memory: node0 and node1 directories with a meminfo. */
	nodes = 0;
	for (int n = 0; n < 64; n++) {
		char path[96];

		snprintf(path, sizeof(path), "/sys/devices/system/node/node%d/meminfo", n);
		if (access(path, R_OK) == 0)
			nodes++;
	}
	if (nodes < 2)
		return finish(KSFT_SKIP, "needs two NUMA nodes");
	int runfd = open(KSM "run", O_RDONLY);

	if (runfd < 0)
		return finish(KSFT_SKIP, "no " KSM "run (CONFIG_KSM off?)");
	ssize_t n = read(runfd, saved_run, sizeof(saved_run) - 1);

	close(runfd);
	if (n <= 0)
		return finish(KSFT_SKIP, "cannot read " KSM "run");
	saved_run[n] = 0;
	run_saved = 1;
	pagemap = open("/proc/self/pagemap", O_RDONLY);
	if (pagemap < 0)
		return finish(KSFT_FAIL, "open /proc/self/pagemap");

	base = mmap(NULL, NPAGES * psize, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (base == MAP_FAILED)
		return finish(KSFT_FAIL, "mmap");
	if (madvise(base, NPAGES * psize, MADV_NOHUGEPAGE) && errno != EINVAL)
		return finish(KSFT_FAIL, "MADV_NOHUGEPAGE");
	/* The same content in every page, unique to this process. */
	for (long off = 0; off < NPAGES * psize; off += sizeof(long))
		*(long *)(base + off) = 0x6b736d6c656e7300L ^ getpid() ^ (off % psize);
	/* The upper half over the lower half: faulted in, so it has an anon_vma
	 * and keeps its vm_pgoff at the new place. */
	moved = mremap(base + HALF * psize, HALF * psize, HALF * psize,
		       MREMAP_MAYMOVE | MREMAP_FIXED, base);
	if (moved != base)
		return finish(KSFT_FAIL, "mremap");
	printf("# mremap: %d pages from %p over %p\n",
	       HALF, (void *)(base + HALF * psize), (void *)moved);
	if (madvise(moved, HALF * psize, MADV_MERGEABLE))
		return finish(KSFT_FAIL, "MADV_MERGEABLE");
	scans0 = read_long(KSM "full_scans");
	if (write_str(KSM "run", "1"))
		return finish(KSFT_FAIL, "write 1 to " KSM "run");
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		if (read_long(KSM "full_scans") >= scans0 + 2 && all_merged(pagemap, moved, &pfn))
			break;
		clock_gettime(CLOCK_MONOTONIC, &t);
		if (t.tv_sec - t0.tv_sec + (t.tv_nsec - t0.tv_nsec) / 1e9 > timeout)
			return finish(KSFT_FAIL, "KSM did not merge the 16 pages into one");
		usleep(20000);
	}
	src = node_of(moved);
	if (src < 0)
		return finish(KSFT_FAIL, "move_pages query");
	printf("# merged: %d mappings of pfn 0x%llx on node %d after %ld full scans\n",
	       HALF, (unsigned long long)pfn, src, read_long(KSM "full_scans") - scans0);
	if (hold) {
		char line[64];

		printf("merged start=0x%lx pages=%d pfn=0x%llx node=%d pid=%d\n",
		       (unsigned long)moved, HALF, (unsigned long long)pfn, src, getpid());
		if (!fgets(line, sizeof(line), stdin))
			return finish(KSFT_FAIL, "stdin closed while holding");
		/* Whatever ran meanwhile (ksmlens verify migrates too): start
		 * again from where the page is now. */
		if (!all_merged(pagemap, moved, &pfn))
			return finish(KSFT_FAIL, "the 16 pages are no longer one KSM page");
		src = node_of(moved);
		printf("# after the hold: pfn 0x%llx on node %d\n", (unsigned long long)pfn, src);
	}
	dst = -1;
	for (int n = 0; n < 64 && dst < 0; n++) {
		char path[96];

		snprintf(path, sizeof(path), "/sys/devices/system/node/node%d/meminfo", n);
		if (n != src && access(path, R_OK) == 0)
			dst = n;
	}
	status = STATUS_UNSET;
	ret = move_pages1(moved, &dst, &status, MPOL_MF_MOVE_ALL);
	int err = errno;
	char st[32];

	if (status == STATUS_UNSET)
		snprintf(st, sizeof(st), "not written");
	else
		snprintf(st, sizeof(st), "%d", status);
	after = node_of(moved);
	pfn_after = pfn_of(pagemap, moved);
	printf("# move_pages(MPOL_MF_MOVE_ALL) to node %d: ret %ld%s%s, status %s; "
	       "now pfn 0x%llx on node %d\n", dst, ret, ret < 0 ? " " : "",
	       ret < 0 ? strerror(err) : "", st, (unsigned long long)pfn_after, after);
	if (ret == 0 && status == dst && after == dst && pfn_after != pfn) {
		uint64_t p2;

		if (!all_merged(pagemap, moved, &p2) || p2 != pfn_after)
			return finish(KSFT_FAIL, "migrated, but the mappings no longer share one page");
		return finish(KSFT_PASS, "");
	}
	char why[128];

	snprintf(why, sizeof(why), "the KSM page stayed on node %d: move_pages returned %ld, "
		 "status %s", after, ret, st);
	return finish(KSFT_FAIL, why);
}
