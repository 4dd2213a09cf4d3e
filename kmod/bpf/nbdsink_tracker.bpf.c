// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * nbdsink change tracker: marks, per generation, every chunk of one block device that a
 * completed write, discard or write-zeroes touched.
 *
 * One instance of this object is loaded per tracked device (its maps are sized for that
 * device at load time) and pinned under /sys/fs/bpf/nbdsink/<device>/ by the loader.
 *
 * Lossless by construction: dirty chunks are bits in array maps, set with atomic OR. There is
 * no event stream that could fill up and drop. There are two bitmaps; the open generation
 * number "seq" selects one (seq & 1). A checkpoint (userspace) increments seq through the
 * "flip" program below, then waits until no program run can still be marking the old bitmap,
 * then reads and clears it.
 *
 * Why a per-CPU "active" counter: a run increments its CPU's counter, then reads seq, marks,
 * and decrements the counter, with fully ordered atomics. If userspace observes a CPU's
 * counter at 0 at any instant after its (atomic) flip, every run on that CPU that read the old
 * seq has finished: such a run incremented the counter before the flip and had not
 * decremented it yet when the flip happened, so the counter was non-zero from then until it
 * finished (a run cannot migrate to another CPU). Runs starting after the flip read the new
 * seq. Userspace checks each CPU in turn; no instant common to all CPUs is needed. Kept per
 * CPU, the two atomics stay on a cache line no other CPU writes, so they cost a few cycles.
 *
 * Hooks:
 *  - tp_btf/block_rq_complete: request-based devices (loop, virtio, nvme, scsi). It fires in
 *    blk_update_request() before the request is advanced, for every completed part, with or
 *    without an error (a failed write may still have changed data: it is counted).
 *  - tp_btf/block_bio_queue + tp_btf/block_bio_complete: bio-based devices (device-mapper,
 *    md, zram). At completion a driver may already have advanced bio->bi_iter (size 0), so the
 *    range is remembered at queue time in a hash table keyed by the bio; if that table was full
 *    and the completed bio's own range is gone, the whole device is marked dirty (over-report,
 *    never lose).
 *  - tp_btf/block_rq_issue (request-based only): marks the same chunks at issue, in a second
 *    pair of bitmaps ("qbits"), from another context than the completion (the task or worker
 *    that dispatches, not the completion's interrupt).
 * The loader attaches only the hooks matching the device type.
 *
 * Detecting what was not seen. The kernel has been measured running a tracepoint's other
 * probes while skipping these programs, without moving any counter we can read. So the
 * request-based hooks also count sectors: "done_sects" at completion and "issued_sects" at
 * issue, for the requests the kernel's own I/O accounting attributes to the tracked device
 * (/sys/class/block/<dev>/stat, updated right after block_rq_complete, on the same path). At
 * each checkpoint the loader compares: a shortfall of done_sects means a completion went
 * unseen, and is answered with the chunks issued in the recent generations (qbits), or with
 * the whole device when issued_sects fell short too.
 *
 * Every hook is attached twice (programs *_a and *_b). The kernel skips a tracing program
 * that is already running on the CPU (recursion protection), so a completion interrupting
 * another on the same CPU would go unseen with one copy. The copies run in attach order, a
 * then b, for every event; they split the work so that each event is handled once:
 *  - a records the event (the request or bio pointer) in its CPU's pcpu->last[hook] as its
 *    very first action, then handles it;
 *  - b handles the event unless pcpu->last[hook] names it, in which case a took it: b then
 *    clears the slot and returns at once. That is the common case, and costs b one per-CPU
 *    load.
 * A nested event (one completing while a runs on this CPU, from an interrupt) finds a
 * skipped by the kernel and the slot holding the outer event (or 0, or an older event b has
 * not cleared), never the nested one: b handles it. That holds wherever in a's run, or in
 * the kernel's code around it, the interruption lands. b skips an event only if the slot
 * names it; the slot can only keep a stale value when a run of b was itself skipped or
 * interrupted, and that (like any nesting two deep, which both copies miss) shows in b's
 * recursion-miss counter. The loader compares the b copies' counters at each checkpoint and
 * then marks everything dirty. A miss of a alone loses nothing (b took the event), so it is
 * not counted. With only one copy attached (during start or stop) b handles everything.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "nbdsink_tracker.h"

char LICENSE[] SEC("license") = "GPL";

#define NBDSINK_REQ_OP_MASK 0xffU
/* The flag bit number is read from the running kernel (CO-RE), not assumed. */
#define NBDSINK_REQ_PREFLUSH (1U << bpf_core_enum_value(enum req_flag_bits, __REQ_PREFLUSH))
/* bpf_loop() accepts at most this many iterations. */
#define NBDSINK_MAX_LOOP (1U << 23)

const volatile struct nbdsink_cfg cfg = {};

/* Slots of struct nbdsink_pcpu.last, one per hook, so that hooks nesting in one another
 * (a bio completing while another is queued) never mistake each other's events. */
#define NBDSINK_HOOK_RQ 0
#define NBDSINK_HOOK_BIO_QUEUE 1
#define NBDSINK_HOOK_BIO_COMPLETE 2
#define NBDSINK_HOOK_RQ_ISSUE 3

/* Which pair of bitmaps a mark goes to. */
#define NBDSINK_DONE 0
#define NBDSINK_ISSUED 1

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct nbdsink_ctl);
} ctl SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct nbdsink_pcpu);
} pcpu SEC(".maps");

/* Two bitmaps of cfg.words u64 each: bit c of bitmap g = chunk c written in generation g. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 2); /* resized by the loader to 2 * cfg.words */
	__type(key, __u32);
	__type(value, __u64);
} bits SEC(".maps");

/* The same layout as "bits", marked at issue time (request-based devices). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 2); /* resized by the loader to 2 * cfg.words */
	__type(key, __u32);
	__type(value, __u64);
} qbits SEC(".maps");

struct bio_range {
	__u64 sector;
	__u64 nr_sects;
};

/* Bio-based devices only: the range of each in-flight write bio, recorded at queue time. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct bio_range);
} inflight SEC(".maps");

/* One word of the bitmap, nothing else: the loader finds the set bits by scanning the bitmap
 * (memory the size of the device / chunk size / 8, scanned at C speed), so no summary or other
 * index needs maintaining here. */
static __always_inline void set_word(__u32 which, __u32 base, __u64 w, __u64 mask)
{
	__u32 key = base + (__u32)w;
	__u64 *p;

	if (which == NBDSINK_ISSUED)
		p = bpf_map_lookup_elem(&qbits, &key);
	else
		p = bpf_map_lookup_elem(&bits, &key);

	/* Hot chunks are written over and over: when their bits are already set, a plain read
	 * keeps the cache line shared. */
	if (p && (*p & mask) != mask)
		__sync_fetch_and_or(p, mask);
}

static __always_inline __u64 word_mask(__u64 w, __u64 c0, __u64 c1)
{
	__u64 lo = (w == (c0 >> 6)) ? (c0 & 63) : 0;
	__u64 hi = (w == (c1 >> 6)) ? (c1 & 63) : 63;

	return (~0ULL >> (63 - hi)) & (~0ULL << lo);
}

struct loop_ctx {
	__u32 base;
	__u32 which;
	__u64 c0;
	__u64 c1;
};

static long mark_word_cb(__u32 i, void *data)
{
	struct loop_ctx *lc = data;
	__u64 w = (lc->c0 >> 6) + i;

	set_word(lc->which, lc->base, w, word_mask(w, lc->c0, lc->c1));
	return 0;
}

/* Mark sectors [sector, sector + nr) of the disk in the open generation of the bitmaps
 * ``which`` selects. A global function: the verifier checks it once, not once per call site
 * (the discard walk calls it in a loop). */
__noinline int mark(__u64 sector, __u64 nr, __u32 which)
{
	__u64 start = cfg.start_sect, end = cfg.start_sect + cfg.nr_sects;
	__u64 s = sector, e = sector + nr;
	__u32 zero = 0;
	struct nbdsink_ctl *c;
	struct nbdsink_pcpu *pc;
	struct loop_ctx lc;
	__u64 idx, nwords;

	if (nr == 0 || e <= start || s >= end)
		return 0;
	if (s < start)
		s = start;
	if (e > end)
		e = end;
	c = bpf_map_lookup_elem(&ctl, &zero);
	pc = bpf_map_lookup_elem(&pcpu, &zero);
	if (!c || !pc)
		return 0;
	lc.c0 = (s - start) >> cfg.chunk_shift;
	lc.c1 = (e - 1 - start) >> cfg.chunk_shift;

	/* The fetch variants are fully ordered atomics (see the comment at the top). */
	if (__sync_fetch_and_add(&pc->active, 1) == ~0ULL)
		return 0;
	idx = *(volatile __u64 *)&c->seq & 1;
	lc.base = (__u32)(idx * cfg.words);
	lc.which = which;
	nwords = (lc.c1 >> 6) - (lc.c0 >> 6) + 1;
	if (nwords == 1) {
		set_word(which, lc.base, lc.c0 >> 6, word_mask(lc.c0 >> 6, lc.c0, lc.c1));
	} else if (nwords <= NBDSINK_MAX_LOOP) {
		bpf_loop((__u32)nwords, mark_word_cb, &lc, 0);
	} else {
		/* A single request larger than bpf_loop can walk: everything is dirty. */
		__u64 *flag = which == NBDSINK_ISSUED ? c->qoverflow : c->overflow;

		if (idx == 0)
			__sync_fetch_and_or(&flag[0], 1);
		else
			__sync_fetch_and_or(&flag[1], 1);
	}
	__sync_fetch_and_sub(&pc->active, 1);
	return 0;
}

static __always_inline void mark_all(__u32 which)
{
	mark(cfg.start_sect, cfg.nr_sects, which);
}

static __always_inline bool is_ours(struct gendisk *disk)
{
	return disk && disk->major == cfg.major && disk->first_minor == cfg.first_minor;
}

/* Data-changing operations (write, discard, secure erase, write zeroes, zone append/reset)
 * have odd numbers (op_is_write()); reads and pure flushes are even. */
static __always_inline bool changes_data(__u32 opf)
{
	return (opf & NBDSINK_REQ_OP_MASK) & 1;
}

/* Walk the bios of a discard: a multi-range discard (virtio, nvme) merges bios that are not
 * contiguous, so rq->__sector + nr_bytes would describe the wrong range. The walk runs in a
 * bpf_loop() callback (verified once) and follows the chain with CO-RE probe reads. */
#define NBDSINK_MAX_DISCARD_BIOS 1024

struct walk_ctx {
	__u64 bio;  /* struct bio *, as an integer: read with BPF_CORE_READ */
	__u64 left; /* sectors still to account for */
	__u32 which;
	__u32 pad;
};

static long walk_bio_cb(__u32 i, void *data)
{
	struct walk_ctx *wc = data;
	struct bio *bio = (struct bio *)wc->bio;
	__u64 n;

	if (!bio || !wc->left)
		return 1;
	n = BPF_CORE_READ(bio, bi_iter.bi_size) >> 9;
	if (n > wc->left)
		n = wc->left;
	mark(BPF_CORE_READ(bio, bi_iter.bi_sector), n, wc->which);
	wc->left -= n;
	wc->bio = (__u64)BPF_CORE_READ(bio, bi_next);
	return 0;
}

static __always_inline void mark_discard(struct request *rq, __u64 nr_sects, __u32 which)
{
	struct walk_ctx wc = { .bio = (__u64)rq->bio, .left = nr_sects, .which = which };

	bpf_loop(NBDSINK_MAX_DISCARD_BIOS, walk_bio_cb, &wc, 0);
	if (wc.left)
		mark_all(which);
}

/* Count what the kernel's I/O accounting counts for the tracked device: the sectors of the
 * requests that start inside it (a request belongs to one partition). */
static __always_inline void count(struct request *rq, unsigned int nr_bytes, __u32 which)
{
	__u32 zero = 0;
	struct nbdsink_pcpu *pc;
	__u64 s = rq->__sector;

	if (s < cfg.start_sect || s >= cfg.start_sect + cfg.nr_sects)
		return;
	pc = bpf_map_lookup_elem(&pcpu, &zero);
	if (!pc)
		return;
	/* Atomic: a completion interrupting another on this CPU adds too. */
	if (which == NBDSINK_ISSUED)
		__sync_fetch_and_add(&pc->issued_sects, (__u64)nr_bytes >> 9);
	else
		__sync_fetch_and_add(&pc->done_sects, (__u64)nr_bytes >> 9);
}

static __always_inline void on_rq(struct request *rq, unsigned int nr_bytes, __u32 which)
{
	__u32 op;
	__u64 nr = ((__u64)nr_bytes + 511) >> 9;

	if (!is_ours(rq->q->disk) || !changes_data(rq->cmd_flags))
		return;
	count(rq, nr_bytes, which);
	op = rq->cmd_flags & NBDSINK_REQ_OP_MASK;
	if ((op == REQ_OP_DISCARD || op == REQ_OP_SECURE_ERASE) && rq->bio)
		mark_discard(rq, nr, which);
	else
		mark(rq->__sector, nr, which);
}

/* Copy a: claim the event on this CPU, before anything else (see the top of the file). */
static __always_inline void claim(int hook, void *event)
{
	__u32 zero = 0;
	struct nbdsink_pcpu *pc = bpf_map_lookup_elem(&pcpu, &zero);

	if (pc)
		pc->last[hook] = (__u64)event;
}

/* Copy b: true if copy a claimed this event (then b has nothing to do). */
static __always_inline bool claimed(int hook, void *event)
{
	__u32 zero = 0;
	struct nbdsink_pcpu *pc = bpf_map_lookup_elem(&pcpu, &zero);

	if (!pc || pc->last[hook] != (__u64)event)
		return false;
	pc->last[hook] = 0;
	return true;
}

SEC("tp_btf/block_rq_complete")
int BPF_PROG(on_rq_complete_a, struct request *rq, blk_status_t error, unsigned int nr_bytes)
{
	claim(NBDSINK_HOOK_RQ, rq);
	on_rq(rq, nr_bytes, NBDSINK_DONE);
	return 0;
}

SEC("tp_btf/block_rq_complete")
int BPF_PROG(on_rq_complete_b, struct request *rq, blk_status_t error, unsigned int nr_bytes)
{
	if (!claimed(NBDSINK_HOOK_RQ, rq))
		on_rq(rq, nr_bytes, NBDSINK_DONE);
	return 0;
}

SEC("tp_btf/block_rq_issue")
int BPF_PROG(on_rq_issue_a, struct request *rq)
{
	claim(NBDSINK_HOOK_RQ_ISSUE, rq);
	on_rq(rq, rq->__data_len, NBDSINK_ISSUED);
	return 0;
}

SEC("tp_btf/block_rq_issue")
int BPF_PROG(on_rq_issue_b, struct request *rq)
{
	if (!claimed(NBDSINK_HOOK_RQ_ISSUE, rq))
		on_rq(rq, rq->__data_len, NBDSINK_ISSUED);
	return 0;
}

static __always_inline void on_bio_q(struct bio *bio)
{
	struct bio_range r;
	__u64 key = (__u64)bio;

	if (!is_ours(bio->bi_bdev->bd_disk) || !changes_data(bio->bi_opf))
		return;
	/* Partitions were remapped before this tracepoint: the sector is the disk's. Empty
	 * flushes are recorded too, so that their completion is recognised. */
	r.sector = bio->bi_iter.bi_sector;
	r.nr_sects = ((__u64)bio->bi_iter.bi_size + 511) >> 9;
	if (bpf_map_update_elem(&inflight, &key, &r, BPF_ANY)) {
		__u32 zero = 0;
		struct nbdsink_ctl *c = bpf_map_lookup_elem(&ctl, &zero);

		if (c)
			__sync_fetch_and_add(&c->bio_lost, 1);
	}
}

SEC("tp_btf/block_bio_queue")
int BPF_PROG(on_bio_queue_a, struct bio *bio)
{
	claim(NBDSINK_HOOK_BIO_QUEUE, bio);
	on_bio_q(bio);
	return 0;
}

SEC("tp_btf/block_bio_queue")
int BPF_PROG(on_bio_queue_b, struct bio *bio)
{
	if (!claimed(NBDSINK_HOOK_BIO_QUEUE, bio))
		on_bio_q(bio);
	return 0;
}

/* The copy that handles the completion deletes the entry. The entry is looked up before the
 * device is checked: a stacking driver (md raid0/linear) may have redirected the very bio to
 * a member disk, so its completion names the member. */
static __always_inline void on_bio_c(struct bio *bio)
{
	__u64 key = (__u64)bio;
	struct bio_range *r = bpf_map_lookup_elem(&inflight, &key);
	__u32 size;

	if (r) {
		mark(r->sector, r->nr_sects, NBDSINK_DONE);
		bpf_map_delete_elem(&inflight, &key);
	}
	if (!is_ours(bio->bi_bdev->bd_disk) || !changes_data(bio->bi_opf))
		return;
	size = bio->bi_iter.bi_size;
	if (!r && size == 0 && !(bio->bi_opf & NBDSINK_REQ_PREFLUSH)) {
		/* Queued before tracking started or while the table was full, and already
		 * advanced by the driver: its range is unknown. */
		mark_all(NBDSINK_DONE);
	}
	if (size)
		mark(bio->bi_iter.bi_sector, ((__u64)size + 511) >> 9, NBDSINK_DONE);
}

SEC("tp_btf/block_bio_complete")
int BPF_PROG(on_bio_complete_a, struct request_queue *q, struct bio *bio)
{
	claim(NBDSINK_HOOK_BIO_COMPLETE, bio);
	on_bio_c(bio);
	return 0;
}

SEC("tp_btf/block_bio_complete")
int BPF_PROG(on_bio_complete_b, struct request_queue *q, struct bio *bio)
{
	if (!claimed(NBDSINK_HOOK_BIO_COMPLETE, bio))
		on_bio_c(bio);
	return 0;
}

/* Run by the loader (BPF_PROG_TEST_RUN) to open the next generation. Doing the increment
 * here, as an atomic in the kernel, orders it before the loader's later reads of the per-CPU
 * "active" counters. */
SEC("syscall")
int flip(void *ctx)
{
	__u32 zero = 0;
	struct nbdsink_ctl *c = bpf_map_lookup_elem(&ctl, &zero);

	if (!c)
		return -1;
	return (int)__sync_fetch_and_add(&c->seq, 1);
}
