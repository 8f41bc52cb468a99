/*
 * ksmlens-manyvmas - many VMAs in one anon_vma, a few KSM pages among them:
 * the state that makes rmap_walk_ksm() expensive (the "Optimize
 * rmap_walk_ksm" series' reason: one KSM page, 20,000 VMAs in its anon_vma
 * tree, 99.9 % of the stock walk's iterations skipped).
 *
 *   ksmlens-manyvmas many-vmas --shape split|fork --vmas N [--pages P]
 *                              [--forks C] [--mremap K]
 *
 * split: one region of N pages, one page per VMA (every other page
 *        mprotect(PROT_READ): neighbours cannot merge), all N VMAs in the
 *        anon_vma of the first fault (__split_vma() -> anon_vma_clone()).
 * fork:  a region of N / (C + 1) pages split the same way; "fork" makes C
 *        children that keep every mapping: their VMAs join the parent's
 *        anon_vma tree (anon_vma_fork()), N VMAs in all.
 *
 * Every page is random except P pairs: page 2k and page M/2 + 2k (M the
 * region's pages) hold the same content k, so KSM makes P KSM pages of two
 * rmap_items each, in one mm and one anon_vma.  Protocol as
 * ksmlens-workload.c: "ready <json>", then one "ok <json>" or "err <why>"
 * per command line.  Commands:
 *   info          the state
 *   mremap [K]    (default --mremap's K) move the VMA of the first page of pairs 0..K-1 >= 1 GiB
 *                 away (mremap(MAYMOVE|FIXED)): vm_pgoff stays, the address
 *                 does not (move_vma() breaks the KSM page; ksmd re-merges it)
 *   fork          (fork shape) C children that keep the mappings and sleep
 *   hwpoison K    madvise(MADV_HWPOISON) the second page of pair K (never moved):
 *                 memory_failure() of its KSM page (irreversible); answers
 *                 the madvise result and the SIGBUSes this process got
 *                 (si_code, si_addr): it survives them
 *   quit
 * This program never touches /sys/kernel/mm/ksm: the driver sets KSM knobs.
 *
 * Build: gcc -O2 -Wall -Wextra -static -o ksmlens-manyvmas ksmlens-manyvmas.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#define MREMAP_DISTANCE (1UL << 30)	/* moved >= 1 GiB away */
#define MAX_PAIRS 4096
#define MAX_FORKS 4096

static size_t pagesz, vmas = 20000, pairs = 16, forks = 9, npages, want_moved;
static const char *shape = "split";
static char *region;
static pid_t kids[MAX_FORKS];
static size_t nkids, nmoved;
static unsigned long moved[MAX_PAIRS];	/* new address of pair k's first page */
static uint64_t rng = 0x9e3779b97f4a7c15ULL;
#define MAX_SIGNALS 16
static volatile sig_atomic_t nsig;
static int sig_code[MAX_SIGNALS];
static unsigned long sig_addr[MAX_SIGNALS];

static void die(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fputs("ksmlens-manyvmas: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(2);
}

static uint64_t splitmix64(void)
{
	uint64_t z = (rng += 0x9e3779b97f4a7c15ULL);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static size_t pair_page(size_t k, int second)
{
	return (second ? npages / 2 : 0) + 2 * k;
}

static void fill(char *page, int key)
{
	uint64_t *w = (uint64_t *)page;

	for (size_t i = 0; i < pagesz / 8; i++)
		w[i] = key < 0 ? splitmix64() : 0x6b736d6c656e7300ULL + (uint64_t)key * 977 + i;
}

static void setup(void)
{
	size_t len;

	npages = strcmp(shape, "fork") ? vmas : vmas / (forks + 1);
	if (npages < 4 * pairs)
		die("--vmas %zu gives %zu pages per region: too few for %zu pairs",
		    vmas, npages, pairs);
	len = npages * pagesz;
	region = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (region == MAP_FAILED)
		die("mmap %zu pages: %s", npages, strerror(errno));
	if (madvise(region, len, MADV_NOHUGEPAGE))
		die("MADV_NOHUGEPAGE: %s", strerror(errno));
	for (size_t i = 0; i < npages; i++)
		fill(region + i * pagesz, -1);
	for (size_t k = 0; k < pairs; k++) {
		fill(region + pair_page(k, 0) * pagesz, (int)k);
		fill(region + pair_page(k, 1) * pagesz, (int)k);
	}
	if (madvise(region, len, MADV_MERGEABLE))
		die("MADV_MERGEABLE: %s", strerror(errno));
	/* one VMA per page: every odd page read-only */
	for (size_t i = 1; i < npages; i += 2)
		if (mprotect(region + i * pagesz, pagesz, PROT_READ))
			die("mprotect page %zu: %s (vm.max_map_count?)", i, strerror(errno));
}

static void state(void)
{
	printf("{\"pid\":%d,\"shape\":\"%s\",\"vmas\":%zu,\"region_pages\":%zu,"
	       "\"region\":%lu,\"pairs\":[", (int)getpid(), shape, vmas, npages,
	       (unsigned long)region);
	for (size_t k = 0; k < pairs; k++)
		printf("%s[%lu,%lu]", k ? "," : "",
		       k < nmoved ? moved[k] :
		       (unsigned long)(region + pair_page(k, 0) * pagesz),
		       (unsigned long)(region + pair_page(k, 1) * pagesz));
	printf("],\"forks\":%zu,\"mremap\":%zu,\"moved\":%zu,\"children\":[",
	       strcmp(shape, "fork") ? 0 : forks, want_moved, nmoved);
	for (size_t i = 0; i < nkids; i++)
		printf("%s%d", i ? "," : "", (int)kids[i]);
	/* ksmlens-workload's "procs" shape (ScenarioRun.pids(), .regions()) */
	printf("],\"procs\":[");
	for (size_t i = 0; i <= nkids; i++)
		printf("%s{\"pid\":%d,\"role\":\"%s\",\"regions\":[{\"name\":\"many\","
		       "\"start\":%lu,\"pages\":%zu,\"content\":\"many\"}]}", i ? "," : "",
		       i ? (int)kids[i - 1] : (int)getpid(), i ? "child" : "parent",
		       (unsigned long)region, npages);
	printf("]}");
}

static int do_mremap(size_t k)
{
	if (!k)
		k = want_moved;
	if (!k || k > pairs || nmoved)
		return printf("err mremap takes 1..%zu, once", pairs), 0;
	for (size_t i = 0; i < k; i++) {
		char *old = region + pair_page(i, 0) * pagesz;
		char *to = region + npages * pagesz + MREMAP_DISTANCE + 2 * i * pagesz;
		void *p = mremap(old, pagesz, pagesz, MREMAP_MAYMOVE | MREMAP_FIXED, to);

		if (p == MAP_FAILED)
			return printf("err mremap pair %zu: %s", i, strerror(errno)), 0;
		moved[i] = (unsigned long)p;
		nmoved = i + 1;
	}
	return 1;
}

static int do_fork(void)
{
	if (strcmp(shape, "fork") || nkids)
		return printf("err fork: only once, in the fork shape"), 0;
	for (size_t i = 0; i < forks; i++) {
		pid_t p = fork();

		if (p < 0)
			return printf("err fork: %s", strerror(errno)), 0;
		if (p == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			for (;;)
				pause();
		}
		kids[nkids++] = p;
	}
	return 1;
}

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
	(void)sig;
	(void)uc;
	if (nsig < MAX_SIGNALS) {
		sig_code[nsig] = si->si_code;
		sig_addr[nsig] = (unsigned long)si->si_addr;
		nsig++;
	}
}

static void do_hwpoison(size_t k)
{
	char *page = region + pair_page(k, 1) * pagesz;
	const char *res = "ok";

	if (k >= pairs) {
		printf("err hwpoison takes a pair 0..%zu\n", pairs - 1);
		fflush(stdout);
		return;
	}
	nsig = 0;
	if (madvise(page, pagesz, MADV_HWPOISON))
		res = errno == EBUSY ? "EBUSY" : strerror(errno);
	printf("ok {\"hwpoison\":{\"pair\":%zu,\"address\":%lu,\"madvise\":\"%s\","
	       "\"signals\":[", k, (unsigned long)page, res);
	for (int i = 0; i < nsig; i++)
		printf("%s[%d,%lu]", i ? "," : "", sig_code[i], sig_addr[i]);
	printf("]}}\n");
	fflush(stdout);
}

static void cleanup(void)
{
	for (size_t i = 0; i < nkids; i++)
		kill(kids[i], SIGKILL);
	for (size_t i = 0; i < nkids; i++)
		waitpid(kids[i], NULL, 0);
	nkids = 0;
}

static size_t num(const char *opt, const char *v, size_t min, size_t max)
{
	char *end;
	unsigned long n;

	if (!v)
		die("%s needs a value", opt);
	errno = 0;
	n = strtoul(v, &end, 10);
	if (errno || *end || n < min || n > max)
		die("%s %s: want a number in [%zu, %zu]", opt, v, min, max);
	return n;
}

int main(int argc, char **argv)
{
	char *line = NULL;
	size_t cap = 0;

	pagesz = sysconf(_SC_PAGESIZE);
	if (argc < 2 || strcmp(argv[1], "many-vmas"))
		die("usage: %s many-vmas --shape split|fork --vmas N [--pages P] [--forks C] "
		    "[--mremap K]",
		    argv[0]);
	for (int i = 2; i < argc; i += 2) {
		const char *a = argv[i], *v = argv[i + 1];

		if (!strcmp(a, "--shape")) {
			if (!v || (strcmp(v, "split") && strcmp(v, "fork")))
				die("--shape: split or fork");
			shape = v;
		} else if (!strcmp(a, "--vmas"))
			vmas = num(a, v, 8, 1UL << 24);
		else if (!strcmp(a, "--pages"))
			pairs = num(a, v, 1, MAX_PAIRS);
		else if (!strcmp(a, "--forks"))
			forks = num(a, v, 1, MAX_FORKS);
		else if (!strcmp(a, "--mremap"))
			want_moved = num(a, v, 0, MAX_PAIRS);
		else
			die("unknown option %s", a);
	}
	if (want_moved > pairs)
		die("--mremap %zu: more than the %zu pairs", want_moved, pairs);
	signal(SIGPIPE, SIG_IGN);
	{
		struct sigaction sa = { .sa_sigaction = on_sigbus, .sa_flags = SA_SIGINFO };

		sigemptyset(&sa.sa_mask);
		sigaction(SIGBUS, &sa, NULL);	/* children inherit it */
	}
	setup();
	printf("ready ");
	state();
	putchar('\n');
	fflush(stdout);
	while (getline(&line, &cap, stdin) >= 0) {
		char cmd[32] = "";
		size_t k = 0;
		int ok = 1;

		sscanf(line, "%31s %zu", cmd, &k);
		if (!strcmp(cmd, "quit")) {
			cleanup();
			printf("ok {\"quit\":true}\n");
			return 0;
		} else if (!strcmp(cmd, "mremap"))
			ok = do_mremap(k);
		else if (!strcmp(cmd, "fork"))
			ok = do_fork();
		else if (!strcmp(cmd, "hwpoison")) {
			do_hwpoison(k);		/* answers its own line */
			continue;
		} else if (strcmp(cmd, "info"))
			ok = (printf("err unknown command %s", cmd), 0);
		if (ok) {
			printf("ok ");
			state();
		}
		putchar('\n');
		fflush(stdout);
	}
	cleanup();
	return 0;
}
