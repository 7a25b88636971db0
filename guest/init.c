/*
 * vmferry test guest: PID 1 of a tiny initramfs.
 *
 * It stamps a buffer with a pattern that is a pure function of (page index,
 * generation), keeps re-stamping random pages at a fixed rate (so live
 * migration always has dirty memory to chase) and keeps verifying every page
 * against its generation counter (so memory lost or torn by a migration is
 * noticed).  A heartbeat line on the serial console tells the host how it is
 * going:
 *
 *   VMFERRY-HB boot=<16 hex> seq=<n> dirtied=<pages> verified=<pages> errors=<n> up_ms=<n>
 *
 * Settings come from /proc/cmdline:
 *   vmferry.stamp_mib=N       buffer size in MiB (default 64)
 *   vmferry.dirty_mib_s=R     re-stamp rate in MiB/s, may be fractional (default 16, 0 = none)
 *   vmferry.hb_ms=M           heartbeat period (default 500)
 *   vmferry.verify_ms=V       time for one full verification pass (default 1000)
 *   vmferry.corrupt_after=S   self-test: after S seconds corrupt one page behind
 *                             the generation counter's back (default off)
 *   vmferry.ignore_power=1    note ACPI power button presses but do not power off
 *
 * Disk writer (only with vmferry.disk=): a child process stamps blocks
 * 0..N-1 of a block device, keeps re-stamping random blocks and verifying
 * every block with O_DIRECT reads (so the bytes go through the virtual disk,
 * never the guest's page cache).  Every 4 KiB block describes itself:
 *
 *   word 0   magic "VMFDISK1" (little endian 0x314b534944464d56)
 *   word 1   block index
 *   word 2   generation (1 = first stamp, +1 per re-stamp)
 *   word 3   ~(index ^ generation)
 *   word k   disk_seed(index, generation) ^ disk_key[k], k = 4..511
 *
 * so a stopped disk image can be checked offline (vmferry.testguest.verify_disk_image)
 * and a lost, stale or misplaced write is told apart from garbage.  Settings:
 *   vmferry.disk=/dev/vda        the device (must be under /dev/)
 *   vmferry.disk_blocks=N        blocks used (default: the whole device)
 *   vmferry.disk_mib_s=R         re-stamp rate in MiB/s, fractional (default 1, 0 = none)
 *   vmferry.disk_verify_mib_s=V  read-back rate in MiB/s (default 4)
 *   vmferry.disk_init=stamp|host stamp every block at boot (default), or trust that
 *                                the host stamped them all with generation 1
 * The heartbeat then goes on with
 *   disk_ready=<0|1> disk_written=<blocks> disk_verified=<blocks> disk_errors=<n> disk_ioerrors=<n>
 * (ready once the first stamping is done; written counts re-stamps after it;
 * errors are blocks read back with the wrong content, each repaired by a
 * re-stamp; ioerrors are failed reads or writes, and a disk that cannot be
 * set up at all).  VMFERRY-DISK-READY, VMFERRY-DISK-ERR and VMFERRY-DISK-FATAL
 * lines say more.  virtio_blk and its virtio transport are modules of the
 * cloud kernel: /init loads them when a disk is configured.
 *
 * ACPI power button: the cloud kernel has the button driver and evdev as
 * modules, so /init loads them from /lib/modules (build.sh puts them there) and
 * polls the button's event device once per tick.  A press prints
 *
 *   VMFERRY-POWEROFF boot=<16 hex>
 *
 * and powers the machine off (or, with vmferry.ignore_power=1, prints
 * VMFERRY-POWER-IGNORED boot=<16 hex> and goes on).  Without the button the
 * guest says VMFERRY-WARN once and runs as before.
 *
 * PID 1 must never exit (the kernel would panic), so every path ends in a loop.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/input.h>
#include <linux/fs.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/random.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysinfo.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE 4096u
#define WORDS_PER_PAGE (PAGE_SIZE / sizeof(uint64_t))
#define TICK_NS 10000000LL          /* 10 ms between bursts of work */
#define MAX_DT_NS 250000000LL       /* never catch up more than this at once */
#define ERR_LINES_PER_SEC 16
#define MAX_BUTTONS 4
#define MAX_EVDEV 32
#define DISK_BLOCK 4096u
#define DISK_WORDS (DISK_BLOCK / sizeof(uint64_t))
#define DISK_HDR_WORDS 4u
#define DISK_MAGIC 0x314b534944464d56ULL /* "VMFDISK1" */
#define DISK_CHUNK_BLOCKS 256u           /* first stamping: 1 MiB per write */
#define DISK_PATH_MAX 64

struct config {
	uint64_t stamp_mib;
	double dirty_mib_s;
	uint64_t hb_ms;
	uint64_t verify_ms;
	int64_t corrupt_after_s; /* < 0: off */
	int ignore_power;
	char disk[DISK_PATH_MAX]; /* "" = no disk writer */
	uint64_t disk_blocks;      /* 0 = whole device */
	double disk_mib_s;
	double disk_verify_mib_s;
	int disk_host_init;
};

/* Written by the disk worker, read by PID 1 for the heartbeat (MAP_SHARED). */
struct disk_stats {
	volatile uint64_t ready;
	volatile uint64_t written;
	volatile uint64_t verified;
	volatile uint64_t errors;
	volatile uint64_t ioerrors;
};

static uint64_t *buf;
static uint32_t *gen;
static uint64_t npages;
static uint64_t boot_id;
static int buttons[MAX_BUTTONS];
static int nbuttons;

static void out(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void out(const char *fmt, ...)
{
	char line[320];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n >= sizeof(line))
		n = sizeof(line) - 1;
	/* One write() per line so lines are never interleaved with kernel output mid-way. */
	for (int off = 0; off < n;) {
		ssize_t w = write(1, line + off, (size_t)(n - off));
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return;
		off += (int)w;
	}
}

static void hang(void) __attribute__((noreturn));

static void hang(void)
{
	for (;;)
		pause();
}

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void sleep_until(int64_t t)
{
	struct timespec ts = { .tv_sec = t / 1000000000LL, .tv_nsec = t % 1000000000LL };

	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
}

static uint64_t splitmix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

static uint64_t rng_state;

static uint64_t rng_next(void)
{
	/* xorshift64*: cheap, good enough to spread dirtying over the buffer. */
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545f4914f6cdd1dULL;
}

/* Word k of page i at generation g: seeded per (i, g), so a stale or foreign page never matches. */
static inline uint64_t page_seed(uint64_t i, uint32_t g)
{
	return splitmix64((i << 32) ^ g);
}

static void stamp_page(uint64_t i)
{
	uint64_t *p = buf + i * WORDS_PER_PAGE;
	uint64_t s = page_seed(i, gen[i]);

	for (unsigned k = 0; k < WORDS_PER_PAGE; k++)
		p[k] = s + k * 0x9e3779b97f4a7c15ULL;
}

static int page_ok(uint64_t i)
{
	const uint64_t *p = buf + i * WORDS_PER_PAGE;
	uint64_t s = page_seed(i, gen[i]);
	uint64_t diff = 0;

	for (unsigned k = 0; k < WORDS_PER_PAGE; k++)
		diff |= p[k] ^ (s + k * 0x9e3779b97f4a7c15ULL);
	return diff == 0;
}

static uint64_t parse_u64(const char *v, uint64_t dflt)
{
	char *end;
	unsigned long long x;

	errno = 0;
	x = strtoull(v, &end, 10);
	if (errno || end == v || (*end && *end != ' ' && *end != '\n'))
		return dflt;
	return x;
}

static void parse_rate(const char *v, double *dst)
{
	char *end;
	double d = strtod(v, &end);

	if (end != v && d >= 0)
		*dst = d;
}

static void read_config(struct config *c)
{
	char cmdline[4096];
	ssize_t n;
	int fd;

	c->stamp_mib = 64;
	c->dirty_mib_s = 16;
	c->hb_ms = 500;
	c->verify_ms = 1000;
	c->corrupt_after_s = -1;
	c->ignore_power = 0;
	c->disk[0] = 0;
	c->disk_blocks = 0;
	c->disk_mib_s = 1;
	c->disk_verify_mib_s = 4;
	c->disk_host_init = 0;

	fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return;
	n = read(fd, cmdline, sizeof(cmdline) - 1);
	close(fd);
	if (n <= 0)
		return;
	cmdline[n] = 0;

	for (char *tok = strtok(cmdline, " \n"); tok; tok = strtok(NULL, " \n")) {
		if (!strncmp(tok, "vmferry.stamp_mib=", 18)) {
			c->stamp_mib = parse_u64(tok + 18, c->stamp_mib);
		} else if (!strncmp(tok, "vmferry.dirty_mib_s=", 20)) {
			char *end;
			double d = strtod(tok + 20, &end);

			if (end != tok + 20 && d >= 0)
				c->dirty_mib_s = d;
		} else if (!strncmp(tok, "vmferry.hb_ms=", 14)) {
			c->hb_ms = parse_u64(tok + 14, c->hb_ms);
		} else if (!strncmp(tok, "vmferry.verify_ms=", 18)) {
			c->verify_ms = parse_u64(tok + 18, c->verify_ms);
		} else if (!strncmp(tok, "vmferry.corrupt_after=", 22)) {
			c->corrupt_after_s = (int64_t)parse_u64(tok + 22, (uint64_t)-1);
		} else if (!strncmp(tok, "vmferry.ignore_power=", 21)) {
			c->ignore_power = parse_u64(tok + 21, 0) != 0;
		} else if (!strncmp(tok, "vmferry.disk=", 13)) {
			snprintf(c->disk, sizeof(c->disk), "%s", tok + 13);
		} else if (!strncmp(tok, "vmferry.disk_blocks=", 20)) {
			c->disk_blocks = parse_u64(tok + 20, 0);
		} else if (!strncmp(tok, "vmferry.disk_mib_s=", 19)) {
			parse_rate(tok + 19, &c->disk_mib_s);
		} else if (!strncmp(tok, "vmferry.disk_verify_mib_s=", 26)) {
			parse_rate(tok + 26, &c->disk_verify_mib_s);
		} else if (!strncmp(tok, "vmferry.disk_init=", 18)) {
			c->disk_host_init = !strcmp(tok + 18, "host");
		}
	}
	if (c->stamp_mib == 0)
		c->stamp_mib = 1;
	if (c->hb_ms == 0)
		c->hb_ms = 500;
	if (c->verify_ms == 0)
		c->verify_ms = 1000;
}

static uint64_t make_boot_id(void)
{
	uint64_t id = 0;
	uint32_t lo, hi;

	/* Early in boot the pool may not be ready; a weak id is still unique enough per boot. */
	if (getrandom(&id, sizeof(id), GRND_NONBLOCK) == (ssize_t)sizeof(id) && id)
		return id;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	id = ((uint64_t)hi << 32 | lo) ^ (uint64_t)time(NULL) ^ (uint64_t)now_ns();
	return splitmix64(id) | 1;
}

static void setup_console(void)
{
	mkdir("/proc", 0555);
	mkdir("/dev", 0755);
	mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	/* Without a /dev/console node in the initramfs the kernel gave us no stdio. */
	if (fcntl(1, F_GETFD) < 0) {
		int fd = open("/dev/console", O_RDWR | O_NOCTTY);

		if (fd >= 0) {
			dup2(fd, 0);
			dup2(fd, 1);
			dup2(fd, 2);
			if (fd > 2)
				close(fd);
		}
	}
}

/* 0 or an errno; EEXIST (built in, or loaded already) counts as success. */
static int load_module(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	int err = 0;

	if (fd < 0)
		return errno;
	if (syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST)
		err = errno;
	close(fd);
	return err;
}

static int has_key(int fd, unsigned key)
{
	unsigned char bits[KEY_MAX / 8 + 1];

	memset(bits, 0, sizeof(bits));
	if (ioctl(fd, EVIOCGBIT(EV_KEY, sizeof(bits)), bits) < 0)
		return 0;
	return (bits[key / 8] >> (key % 8)) & 1;
}

/*
 * Loading the modules probes the button and creates its event node before
 * finit_module returns, so one scan of /dev/input is enough.
 */
static void setup_power_button(void)
{
	static const char *const mods[] = { "/lib/modules/evdev.ko", "/lib/modules/button.ko" };
	char path[32];

	for (size_t i = 0; i < sizeof(mods) / sizeof(mods[0]); i++) {
		int err = load_module(mods[i]);

		if (err) {
			out("VMFERRY-WARN no power button: cannot load %s: %s\n", mods[i], strerror(err));
			return;
		}
	}
	for (int i = 0; i < MAX_EVDEV && nbuttons < MAX_BUTTONS; i++) {
		int fd;

		snprintf(path, sizeof(path), "/dev/input/event%d", i);
		fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
		if (fd < 0)
			continue;
		if (has_key(fd, KEY_POWER))
			buttons[nbuttons++] = fd;
		else
			close(fd);
	}
	if (nbuttons == 0)
		out("VMFERRY-WARN no power button: no input device reports KEY_POWER\n");
}

/* Drains every button's queue; true when one of them was pressed. */
static int power_pressed(void)
{
	struct input_event ev[16];
	int pressed = 0;

	for (int b = 0; b < nbuttons; b++) {
		ssize_t n;

		while ((n = read(buttons[b], ev, sizeof(ev))) > 0) {
			for (size_t k = 0; k < (size_t)n / sizeof(ev[0]); k++)
				if (ev[k].type == EV_KEY && ev[k].code == KEY_POWER && ev[k].value == 1)
					pressed = 1;
		}
	}
	return pressed;
}

static void power_off(void) __attribute__((noreturn));

static void power_off(void)
{
	out("VMFERRY-POWEROFF boot=%016llx\n", (unsigned long long)boot_id);
	/* The line must leave the UART before the machine is gone. */
	tcdrain(1);
	sync();
	reboot(RB_POWER_OFF);
	out("VMFERRY-FATAL power off failed: %s\n", strerror(errno));
	hang();
}

/* ---- disk writer ------------------------------------------------------------------------- */

static uint64_t disk_key[DISK_WORDS];

static void init_disk_key(void)
{
	for (unsigned k = 0; k < DISK_WORDS; k++)
		disk_key[k] = splitmix64(0x6469736bULL + k); /* "disk" */
}

/* A different stream than the memory pages', so a memory page written to disk never passes. */
static inline uint64_t disk_seed(uint64_t i, uint64_t g)
{
	return splitmix64(splitmix64(i ^ 0xd15cd15cd15cd15cULL) ^ g);
}

static void stamp_block(uint64_t *b, uint64_t i, uint64_t g)
{
	uint64_t s = disk_seed(i, g);

	b[0] = DISK_MAGIC;
	b[1] = i;
	b[2] = g;
	b[3] = ~(i ^ g);
	for (unsigned k = DISK_HDR_WORDS; k < DISK_WORDS; k++)
		b[k] = s ^ disk_key[k];
}

/* The generation a well-formed block of index i claims, or -1 for anything else. */
static int64_t block_gen(const uint64_t *b, uint64_t i)
{
	uint64_t s, diff = 0;

	if (b[0] != DISK_MAGIC || b[1] != i || b[3] != ~(i ^ b[2]) || b[2] > INT64_MAX)
		return -1;
	s = disk_seed(i, b[2]);
	for (unsigned k = DISK_HDR_WORDS; k < DISK_WORDS; k++)
		diff |= b[k] ^ (s ^ disk_key[k]);
	return diff ? -1 : (int64_t)b[2];
}

static int full_pwrite(int fd, const void *p, size_t n, uint64_t off)
{
	while (n) {
		ssize_t w = pwrite(fd, p, n, (off_t)off);

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		p = (const char *)p + w;
		n -= (size_t)w;
		off += (uint64_t)w;
	}
	return 0;
}

static int full_pread(int fd, void *p, size_t n, uint64_t off)
{
	while (n) {
		ssize_t r = pread(fd, p, n, (off_t)off);

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			if (r == 0)
				errno = EIO;
			return -1;
		}
		p = (char *)p + r;
		n -= (size_t)r;
		off += (uint64_t)r;
	}
	return 0;
}

static void disk_fatal(struct disk_stats *st, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));

static void disk_fatal(struct disk_stats *st, const char *fmt, ...)
{
	char msg[200];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	st->ioerrors++;
	out("VMFERRY-DISK-FATAL %s\n", msg);
	/* The heartbeat goes on (PID 1); this process just stops working. */
	_exit(1);
}

/* virtio_blk and its transport, in dependency order; EEXIST (built in) is fine. */
static int load_disk_modules(void)
{
	static const char *const mods[] = {
		"/lib/modules/virtio_ring.ko", "/lib/modules/virtio.ko",
		"/lib/modules/virtio_pci_modern_dev.ko", "/lib/modules/virtio_pci_legacy_dev.ko",
		"/lib/modules/virtio_pci.ko", "/lib/modules/virtio_blk.ko",
	};

	for (size_t i = 0; i < sizeof(mods) / sizeof(mods[0]); i++) {
		int err = load_module(mods[i]);

		if (err) {
			out("VMFERRY-DISK-FATAL cannot load %s: %s\n", mods[i], strerror(err));
			return -1;
		}
	}
	return 0;
}

static int open_disk(struct disk_stats *st, const char *path)
{
	int64_t give_up = now_ns() + 10000000000LL;

	if (strncmp(path, "/dev/", 5) || strstr(path, ".."))
		disk_fatal(st, "vmferry.disk=%s is not a device under /dev/", path);
	/* devtmpfs makes the node when the driver probes the device; allow it a moment. */
	for (;;) {
		int fd = open(path, O_RDWR | O_DIRECT | O_CLOEXEC);

		if (fd >= 0)
			return fd;
		if (errno != ENOENT && errno != ENXIO)
			disk_fatal(st, "cannot open %s: %s", path, strerror(errno));
		if (now_ns() > give_up)
			disk_fatal(st, "no device %s after 10 s (no virtio disk?)", path);
		usleep(20000);
	}
}

static void disk_worker(const struct config *c, struct disk_stats *st, uint64_t seed)
{
	uint64_t size = 0, nblocks, cursor = 0, err_lines = 0;
	uint64_t *blk, *chunk;
	uint32_t *dgen;
	double write_credit = 0, verify_credit = 0, write_per_ns, verify_per_ns;
	int64_t start = now_ns(), last, next_tick, err_window;
	int fd = open_disk(st, c->disk);

	if (ioctl(fd, BLKGETSIZE64, &size) != 0)
		disk_fatal(st, "cannot size %s: %s", c->disk, strerror(errno));
	nblocks = c->disk_blocks ? c->disk_blocks : size / DISK_BLOCK;
	if (nblocks == 0 || nblocks > size / DISK_BLOCK)
		disk_fatal(st, "%s has %llu blocks of %u bytes, vmferry.disk_blocks=%llu does not fit",
			   c->disk, (unsigned long long)(size / DISK_BLOCK), DISK_BLOCK,
			   (unsigned long long)c->disk_blocks);
	dgen = mmap(NULL, nblocks * sizeof(*dgen), PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	/* O_DIRECT needs aligned buffers; mmap's are page aligned. */
	chunk = mmap(NULL, DISK_CHUNK_BLOCKS * DISK_BLOCK, PROT_READ | PROT_WRITE,
		     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (dgen == MAP_FAILED || chunk == MAP_FAILED)
		disk_fatal(st, "cannot allocate for %llu blocks", (unsigned long long)nblocks);
	blk = chunk;
	init_disk_key();
	rng_state = seed;

	for (uint64_t i = 0; i < nblocks; i += DISK_CHUNK_BLOCKS) {
		uint64_t n = nblocks - i < DISK_CHUNK_BLOCKS ? nblocks - i : DISK_CHUNK_BLOCKS;

		for (uint64_t j = 0; j < n; j++)
			dgen[i + j] = 1;
		if (c->disk_host_init)
			continue;
		for (uint64_t j = 0; j < n; j++)
			stamp_block(chunk + j * DISK_WORDS, i + j, 1);
		if (full_pwrite(fd, chunk, n * DISK_BLOCK, i * DISK_BLOCK) != 0)
			disk_fatal(st, "first stamping of %s failed at block %llu: %s", c->disk,
				   (unsigned long long)i, strerror(errno));
	}
	st->ready = 1;
	out("VMFERRY-DISK-READY dev=%s blocks=%llu stamp_ms=%lld\n", c->disk,
	    (unsigned long long)nblocks, (long long)((now_ns() - start) / 1000000));

	write_per_ns = c->disk_mib_s * (1024.0 * 1024.0 / DISK_BLOCK) / 1e9;
	verify_per_ns = c->disk_verify_mib_s * (1024.0 * 1024.0 / DISK_BLOCK) / 1e9;
	last = now_ns();
	next_tick = last;
	err_window = last;
	for (;;) {
		int64_t t = now_ns(), dt = t - last;

		if (dt > MAX_DT_NS)
			dt = MAX_DT_NS;
		last = t;

		write_credit += write_per_ns * (double)dt;
		while (write_credit >= 1.0) {
			uint64_t i = rng_next() % nblocks;

			stamp_block(blk, i, dgen[i] + 1);
			if (full_pwrite(fd, blk, DISK_BLOCK, i * DISK_BLOCK) == 0) {
				dgen[i]++;
				st->written++;
			} else {
				/* Unknown what reached the disk: the next read of it tells. */
				st->ioerrors++;
				out("VMFERRY-DISK-IOERR write block=%llu: %s\n",
				    (unsigned long long)i, strerror(errno));
				dgen[i]++;
			}
			write_credit -= 1.0;
		}

		verify_credit += verify_per_ns * (double)dt;
		while (verify_credit >= 1.0) {
			uint64_t i = cursor;

			verify_credit -= 1.0;
			cursor = (cursor + 1) % nblocks;
			if (full_pread(fd, blk, DISK_BLOCK, i * DISK_BLOCK) != 0) {
				st->ioerrors++;
				out("VMFERRY-DISK-IOERR read block=%llu: %s\n", (unsigned long long)i,
				    strerror(errno));
				continue;
			}
			int64_t found = block_gen(blk, i);

			if (found != (int64_t)dgen[i]) {
				st->errors++;
				if (t - err_window >= 1000000000LL) {
					err_window = t;
					err_lines = 0;
				}
				if (err_lines++ < ERR_LINES_PER_SEC)
					out("VMFERRY-DISK-ERR block=%llu gen=%u found=%lld\n",
					    (unsigned long long)i, dgen[i], (long long)found);
				/* Repair, so errors counts events, not passes over one bad block. */
				stamp_block(blk, i, dgen[i] + 1);
				if (full_pwrite(fd, blk, DISK_BLOCK, i * DISK_BLOCK) != 0)
					st->ioerrors++;
				dgen[i]++;
			}
			st->verified++;
		}

		next_tick += TICK_NS;
		if (next_tick <= now_ns())
			next_tick = now_ns() + TICK_NS;
		sleep_until(next_tick);
	}
}

/*
 * The disk worker is a child process, so blocking disk I/O (a mirror throttling writes) never
 * stalls the memory verifier or the heartbeat.  It is forked before the memory buffer exists:
 * it shares no copy-on-write pages with PID 1.
 */
static struct disk_stats *start_disk(const struct config *c, pid_t *pid)
{
	struct disk_stats *st;

	st = mmap(NULL, sizeof(*st), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (st == MAP_FAILED) {
		out("VMFERRY-DISK-FATAL cannot map the counters: %s\n", strerror(errno));
		return NULL;
	}
	memset((void *)st, 0, sizeof(*st));
	if (load_disk_modules() != 0) {
		st->ioerrors++;
		return st;
	}
	*pid = fork();
	if (*pid < 0) {
		st->ioerrors++;
		out("VMFERRY-DISK-FATAL cannot fork the disk writer: %s\n", strerror(errno));
	} else if (*pid == 0) {
		disk_worker(c, st, splitmix64(boot_id ^ 0xd15c));
		_exit(1);
	}
	return st;
}

int main(void)
{
	struct config c;
	uint64_t seq = 0, dirtied = 0, verified = 0, errors = 0;
	uint64_t verify_cursor = 0, err_lines = 0;
	double dirty_credit = 0, verify_credit = 0;
	double dirty_per_ns, verify_per_ns;
	int64_t start, last, next_tick, next_hb, corrupt_at, err_window;
	int corrupted = 0;
	struct disk_stats *disk = NULL;
	pid_t disk_pid = -1;

	setup_console();
	read_config(&c);
	boot_id = make_boot_id();
	setup_power_button();
	if (c.disk[0])
		disk = start_disk(&c, &disk_pid);
	rng_state = boot_id;
	start = now_ns();

	npages = c.stamp_mib * (1024 * 1024 / PAGE_SIZE);
	{
		struct sysinfo si;

		/* Overcommit would let mmap succeed and the OOM killer then kill PID 1 (a panic). */
		if (sysinfo(&si) == 0) {
			uint64_t avail = (uint64_t)si.freeram * si.mem_unit;

			if (npages * (PAGE_SIZE + sizeof(*gen)) > avail / 10 * 9) {
				out("VMFERRY-FATAL stamp_mib=%llu does not fit in %llu MiB of free guest memory\n",
				    (unsigned long long)c.stamp_mib,
				    (unsigned long long)(avail >> 20));
				hang();
			}
		}
	}
	buf = mmap(NULL, npages * PAGE_SIZE, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	gen = mmap(NULL, npages * sizeof(*gen), PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED || gen == MAP_FAILED) {
		out("VMFERRY-FATAL cannot allocate %llu MiB: %s\n",
		    (unsigned long long)c.stamp_mib, strerror(errno));
		hang();
	}
	for (uint64_t i = 0; i < npages; i++) {
		gen[i] = 1;
		stamp_page(i);
	}
	out("VMFERRY-READY boot=%016llx pages=%llu stamp_ms=%lld\n",
	    (unsigned long long)boot_id, (unsigned long long)npages,
	    (long long)((now_ns() - start) / 1000000));

	dirty_per_ns = c.dirty_mib_s * (1024.0 * 1024.0 / PAGE_SIZE) / 1e9;
	verify_per_ns = (double)npages / ((double)c.verify_ms * 1e6);
	last = now_ns();
	next_tick = last;
	next_hb = last;
	err_window = last;
	corrupt_at = c.corrupt_after_s >= 0 ? start + c.corrupt_after_s * 1000000000LL : -1;

	for (;;) {
		int64_t t = now_ns();
		int64_t dt = t - last;

		/* A paused or migrating VM must not come back to a burst of catch-up work. */
		if (dt > MAX_DT_NS)
			dt = MAX_DT_NS;
		last = t;

		dirty_credit += dirty_per_ns * (double)dt;
		while (dirty_credit >= 1.0) {
			uint64_t i = rng_next() % npages;

			gen[i]++;
			stamp_page(i);
			dirtied++;
			dirty_credit -= 1.0;
		}

		verify_credit += verify_per_ns * (double)dt;

		/*
		 * Behind the generation counter's back: the verifier must catch this.  The page is
		 * the one verified next, in this very tick, so re-stamping cannot repair it unseen.
		 */
		if (corrupt_at >= 0 && !corrupted && t >= corrupt_at && verify_credit >= 1.0) {
			uint64_t i = verify_cursor;

			buf[i * WORDS_PER_PAGE + WORDS_PER_PAGE / 2] ^= 0x5a5a5a5a5a5a5a5aULL;
			corrupted = 1;
			out("VMFERRY-CORRUPTED page=%llu\n", (unsigned long long)i);
		}
		while (verify_credit >= 1.0) {
			uint64_t i = verify_cursor;

			if (!page_ok(i)) {
				errors++;
				if (t - err_window >= 1000000000LL) {
					err_window = t;
					err_lines = 0;
				}
				if (err_lines++ < ERR_LINES_PER_SEC)
					out("VMFERRY-ERR page=%llu gen=%u\n",
					    (unsigned long long)i, gen[i]);
				/* Repair, so errors counts corruption events, not passes over one bad page. */
				gen[i]++;
				stamp_page(i);
			}
			verified++;
			verify_cursor = (verify_cursor + 1) % npages;
			verify_credit -= 1.0;
		}

		if (disk_pid > 0 && waitpid(disk_pid, NULL, WNOHANG) == disk_pid) {
			/* It said why (VMFERRY-DISK-FATAL); a reaped zombie must not linger. */
			disk_pid = -1;
		}
		if (t >= next_hb) {
			char dline[160] = "";

			seq++;
			if (disk)
				snprintf(dline, sizeof(dline),
					 " disk_ready=%llu disk_written=%llu disk_verified=%llu"
					 " disk_errors=%llu disk_ioerrors=%llu",
					 (unsigned long long)disk->ready,
					 (unsigned long long)disk->written,
					 (unsigned long long)disk->verified,
					 (unsigned long long)disk->errors,
					 (unsigned long long)disk->ioerrors);
			out("VMFERRY-HB boot=%016llx seq=%llu dirtied=%llu verified=%llu errors=%llu up_ms=%lld%s\n",
			    (unsigned long long)boot_id, (unsigned long long)seq,
			    (unsigned long long)dirtied, (unsigned long long)verified,
			    (unsigned long long)errors, (long long)(t / 1000000), dline);
			next_hb += (int64_t)c.hb_ms * 1000000LL;
			if (next_hb <= t)
				next_hb = t + (int64_t)c.hb_ms * 1000000LL;
		}

		if (power_pressed()) {
			if (!c.ignore_power)
				power_off();
			out("VMFERRY-POWER-IGNORED boot=%016llx\n", (unsigned long long)boot_id);
		}

		next_tick += TICK_NS;
		if (next_tick <= now_ns())
			next_tick = now_ns() + TICK_NS;
		sleep_until(next_tick);
	}
}
