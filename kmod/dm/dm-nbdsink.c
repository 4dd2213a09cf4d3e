// SPDX-License-Identifier: GPL-2.0-only
/*
 * dm-nbdsink: a pass-through device-mapper target that records which chunks of its data
 * device were written, in generations, so nbdsink can replicate exactly the chunks that
 * changed since the last acknowledged generation.
 *
 * Hot path: map() remaps the bio to the data device and sets the chunks a write, discard or
 * write-zeroes touches in the open generation's bitmap (a test, then an atomic OR: no
 * allocation, no sleeping, no lock). end_io() marks them again: a write still in flight
 * when a checkpoint closes a generation completes after the sender may have read the old
 * data, and marking at completion puts it in the next generation too. The open bitmap is
 * swapped under RCU and the checkpoint waits for a grace period, so once the "checkpoint"
 * message returns nothing can set a bit in the generation it closed.
 *
 * Everything else (checkpoint, release, status, the ioctl, metadata I/O) runs in process
 * context under the instance's mutex.
 *
 * Locking, always in this order (never the reverse):
 *
 *   nbdsink_targets_lock  ->  nc->lock  ->  prev->lock (SINGLE_DEPTH_NESTING)
 *
 * nbdsink_targets_lock guards the registry of instances only. It is held to find an
 * instance and take a reference (the ioctls), and by preresume to pair a new table with the
 * one it replaces (prev) and move the state over in memory: never across I/O, an allocation
 * or a user copy. nc->lock guards one instance's state and is held across its metadata I/O
 * (suspend, resume, messages), so the ioctls fill a kernel buffer under it and copy that to
 * user memory only after dropping it: the copy may fault and wait for I/O to a suspended
 * device, which only a resume (that needs nc->lock) would let through. The hot path takes
 * no lock. A reference (nc->ref) keeps an instance's memory while an ioctl uses it after
 * the destructor: the destructor marks it removed under nc->lock and puts its devices.
 *
 * Suspend, resume, messages and metadata I/O may run while this device (or one it stacks
 * on) is suspended: their allocations run in a memalloc_noio scope or with GFP_NOIO, so
 * that reclaim never waits for I/O that waits for them.
 *
 * User-space interface: include/nbdsink_dm.h.
 */

#include <linux/bio.h>
#include <linux/bitmap.h>
#include <linux/blkdev.h>
#include <linux/capability.h>
#include <linux/crc32.h>
#include <linux/device-mapper.h>
#include <linux/fs.h>
#include <linux/init.h>
#include <linux/kref.h>
#include <linux/list.h>
#include <linux/log2.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/random.h>
#include <linux/rcupdate.h>
#include <linux/sched/mm.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#include "nbdsink_dm.h"

#define DM_MSG_PREFIX "nbdsink"

/* Chunks smaller than 4 KiB only inflate the bitmaps: no filesystem writes less. */
#define NBDSINK_MIN_CHUNK_SECTORS 8
/* bitmap_weight() and friends take an unsigned int bit count. */
#define NBDSINK_MAX_CHUNKS (1UL << 31)
#define META_BLOCK NBDSINK_DM_META_BLOCK
#define META_BATCH 64	/* metadata blocks per bio */

struct nbdsink_gen {
	struct list_head list;
	u64 first;		/* generations merged into this bitmap */
	u64 last;
	unsigned long *bits;
};

struct nbdsink_c {
	struct kref ref;		/* the table's, plus one per ioctl or preresume using it */
	struct dm_target *ti;
	struct dm_dev *dev;
	struct dm_dev *meta;		/* NULL without a metadata device */
	dev_t md_dev;			/* the mapped device, as the ioctl names it */
	unsigned int chunk_shift;
	sector_t chunk_sectors;
	unsigned long nr_chunks;
	size_t bitmap_bytes;
	size_t slot_bytes;		/* bitmap_bytes rounded up to metadata blocks */

	struct nbdsink_gen __rcu *open;	/* marked on the hot path */

	struct mutex lock;		/* everything below, and swapping open */
	struct list_head closed;	/* oldest first */
	unsigned int nr_closed;
	u64 epoch;
	u64 lost_gen;			/* 0: intact */
	u64 meta_seq;
	bool loaded;			/* state taken over or read by a preresume */
	bool suspended;
	bool meta_error;		/* the last metadata load or write failed */
	bool handed_over;		/* the state moved to a reload's table (both locks held) */
	bool removed;			/* destructed: devices put, only the memory is left */

	struct list_head registry;	/* nbdsink_targets, under nbdsink_targets_lock */
};

struct nbdsink_per_bio {
	unsigned long first;
	unsigned long last;
	bool tracked;
};

static LIST_HEAD(nbdsink_targets);
static DEFINE_MUTEX(nbdsink_targets_lock);

/* ---- bitmaps ------------------------------------------------------------------------ */

/* Set bits first..last (inclusive) atomically, skipping words that already have them. */
static void mark_chunks(unsigned long *bits, unsigned long first, unsigned long last)
{
	unsigned long w = BIT_WORD(first), last_w = BIT_WORD(last);

	for (; w <= last_w; w++) {
		unsigned int lo = w == BIT_WORD(first) ? first % BITS_PER_LONG : 0;
		unsigned int hi = w == last_w ? last % BITS_PER_LONG : BITS_PER_LONG - 1;
		unsigned long mask = GENMASK(hi, lo);

		if ((READ_ONCE(bits[w]) & mask) != mask)
			atomic_long_or(mask, (atomic_long_t *)&bits[w]);
	}
}

static void nbdsink_mark(struct nbdsink_c *nc, unsigned long first, unsigned long last)
{
	struct nbdsink_gen *g;

	rcu_read_lock();
	g = rcu_dereference(nc->open);
	mark_chunks(g->bits, first, last);
	rcu_read_unlock();
}

/* The on-disk and ioctl format is a little-endian bit stream: swap whole words on BE. */
static void bits_le_swap(void *p, size_t bytes)
{
#ifdef __BIG_ENDIAN
	unsigned long *w = p;
	size_t i;

	for (i = 0; i < bytes / sizeof(long); i++)
		w[i] = BITS_PER_LONG == 64 ? (unsigned long)cpu_to_le64(w[i]) :
					     (unsigned long)cpu_to_le32(w[i]);
#endif
}

static struct nbdsink_gen *gen_alloc(struct nbdsink_c *nc, u64 number)
{
	struct nbdsink_gen *g = kzalloc(sizeof(*g), GFP_KERNEL);

	if (!g)
		return NULL;
	g->bits = kvzalloc(nc->bitmap_bytes, GFP_KERNEL);
	if (!g->bits) {
		kfree(g);
		return NULL;
	}
	INIT_LIST_HEAD(&g->list);
	g->first = g->last = number;
	return g;
}

static void gen_free(struct nbdsink_gen *g)
{
	if (g) {
		kvfree(g->bits);
		kfree(g);
	}
}

static struct nbdsink_gen *open_gen(struct nbdsink_c *nc)
{
	return rcu_dereference_protected(nc->open, lockdep_is_held(&nc->lock));
}

static void free_closed(struct nbdsink_c *nc)
{
	struct nbdsink_gen *g, *tmp;

	list_for_each_entry_safe(g, tmp, &nc->closed, list) {
		list_del(&g->list);
		gen_free(g);
	}
	nc->nr_closed = 0;
}

/* Bits set in the union of the closed generations (want_open: in the open one). */
static u64 count_dirty(struct nbdsink_c *nc, bool want_open)
{
	unsigned long words = nc->bitmap_bytes / sizeof(long), w;
	struct nbdsink_gen *g;
	u64 n = 0;

	if (want_open)
		return bitmap_weight(open_gen(nc)->bits, nc->nr_chunks);
	for (w = 0; w < words; w++) {
		unsigned long acc = 0;

		list_for_each_entry(g, &nc->closed, list)
			acc |= g->bits[w];
		n += hweight_long(acc);
		if (!(w & 1023))
			cond_resched();
	}
	return n;
}

/* ---- metadata device ---------------------------------------------------------------- */

/*
 * Synchronous I/O of len bytes (bitmap or header) at byte offset pos of the metadata
 * device, through bounce pages so vmalloc'ed bitmaps need no special mapping.
 */
static int meta_io(struct nbdsink_c *nc, blk_opf_t opf, u64 pos, void *buf, size_t len,
		   bool bitmap)
{
	struct page *pages[META_BATCH] = { NULL };
	bool write = op_is_write(opf & REQ_OP_MASK);
	int r = 0, i;

	for (i = 0; i < META_BATCH; i++) {
		pages[i] = alloc_page(GFP_NOIO);
		if (!pages[i]) {
			r = -ENOMEM;
			goto out;
		}
	}
	while (len && !r) {
		size_t n = min_t(size_t, len, (size_t)META_BATCH * META_BLOCK);
		unsigned int nr = DIV_ROUND_UP(n, META_BLOCK);
		struct bio *bio = bio_alloc(nc->meta->bdev, nr, opf, GFP_NOIO);

		bio->bi_iter.bi_sector = pos >> SECTOR_SHIFT;
		for (i = 0; i < nr; i++) {
			size_t part = min_t(size_t, META_BLOCK, n - (size_t)i * META_BLOCK);
			void *p = page_address(pages[i]);

			if (write) {
				memset(p, 0, META_BLOCK);
				memcpy(p, buf + (size_t)i * META_BLOCK, part);
				if (bitmap)
					bits_le_swap(p, part);
			}
			__bio_add_page(bio, pages[i], META_BLOCK, 0);
		}
		r = submit_bio_wait(bio);
		bio_put(bio);
		if (!r && !write) {
			for (i = 0; i < nr; i++) {
				size_t part = min_t(size_t, META_BLOCK, n - (size_t)i * META_BLOCK);
				void *dst = buf + (size_t)i * META_BLOCK;

				memcpy(dst, page_address(pages[i]), part);
				if (bitmap)
					bits_le_swap(dst, part);
			}
		}
		buf += n;
		pos += n;
		len -= n;
	}
out:
	for (i = 0; i < META_BATCH; i++)
		if (pages[i])
			__free_page(pages[i]);
	return r;
}

static u64 slot_pos(struct nbdsink_c *nc, unsigned int slot)
{
	return META_BLOCK + (u64)slot * nc->slot_bytes;
}

static u64 meta_bytes_needed(struct nbdsink_c *nc)
{
	return slot_pos(nc, NBDSINK_DM_MAX_CLOSED + 1);
}

static u32 header_crc(struct nbdsink_dm_meta_header *h)
{
	u32 saved = h->crc, crc;

	h->crc = 0;
	crc = crc32_le(~0U, (const u8 *)h, META_BLOCK) ^ ~0U;
	h->crc = saved;
	return crc;
}

static u32 bitmap_crc(struct nbdsink_c *nc, const unsigned long *bits)
{
	/* Over the little-endian stream, so the value is the same on any host. */
#ifdef __BIG_ENDIAN
	u32 crc = ~0U;
	size_t i;

	for (i = 0; i < nc->bitmap_bytes / sizeof(long); i++) {
		unsigned long w = bits[i];

		bits_le_swap(&w, sizeof(w));
		crc = crc32_le(crc, (const u8 *)&w, sizeof(w));
	}
	return crc ^ ~0U;
#else
	return crc32_le(~0U, (const u8 *)bits, nc->bitmap_bytes) ^ ~0U;
#endif
}

/*
 * Under nc->lock: write the header (state CLEAN after the bitmaps, or ACTIVE) and make it
 * durable. It lists every closed generation and the open one; more than it holds would be
 * a bug elsewhere, refused here rather than written past the header's gens[].
 */
static int meta_write(struct nbdsink_c *nc, u32 state)
{
	struct nbdsink_dm_meta_header *h = NULL;
	struct nbdsink_gen *g;
	unsigned int slot = 0;
	int r = 0;

	if (WARN_ON_ONCE(nc->nr_closed >= ARRAY_SIZE(h->gens))) {
		r = -EOVERFLOW;
		goto out;
	}
	h = kzalloc(META_BLOCK, GFP_NOIO);
	if (!h) {
		r = -ENOMEM;
		goto out;
	}
	list_for_each_entry(g, &nc->closed, list) {
		/* One slot stays for the open generation. */
		if (WARN_ON_ONCE(slot >= ARRAY_SIZE(h->gens) - 1)) {
			r = -EOVERFLOW;
			goto out;
		}
		h->gens[slot].first = cpu_to_le64(g->first);
		h->gens[slot].last = cpu_to_le64(g->last);
		slot++;
	}
	g = open_gen(nc);
	h->gens[slot].first = cpu_to_le64(g->first);
	h->gens[slot].last = cpu_to_le64(g->last);
	slot++;

	if (state == NBDSINK_DM_META_CLEAN) {
		slot = 0;
		list_for_each_entry(g, &nc->closed, list) {
			h->gens[slot].crc = cpu_to_le32(bitmap_crc(nc, g->bits));
			r = meta_io(nc, REQ_OP_WRITE, slot_pos(nc, slot), g->bits, nc->bitmap_bytes,
				    true);
			if (r)
				goto out;
			slot++;
		}
		g = open_gen(nc);
		h->gens[slot].crc = cpu_to_le32(bitmap_crc(nc, g->bits));
		r = meta_io(nc, REQ_OP_WRITE, slot_pos(nc, slot), g->bits, nc->bitmap_bytes, true);
		if (r)
			goto out;
		slot++;
	}

	h->magic = cpu_to_le64(NBDSINK_DM_META_MAGIC);
	h->version = cpu_to_le32(NBDSINK_DM_META_VERSION);
	h->state = cpu_to_le32(state);
	h->nr_gens = cpu_to_le32(slot);
	h->epoch = cpu_to_le64(nc->epoch);
	h->chunk_sectors = cpu_to_le64(nc->chunk_sectors);
	h->nr_chunks = cpu_to_le64(nc->nr_chunks);
	h->lost_gen = cpu_to_le64(nc->lost_gen);
	h->seq = cpu_to_le64(++nc->meta_seq);
	h->crc = cpu_to_le32(header_crc(h));
	/* PREFLUSH orders the bitmaps before the header; FUA makes the header durable. */
	r = meta_io(nc, REQ_OP_WRITE | REQ_SYNC | REQ_PREFLUSH | REQ_FUA, 0, h, META_BLOCK, false);
out:
	kfree(h);
	nc->meta_error = r != 0;
	if (r)
		DMERR("%u:%u: writing metadata failed (%d): the next load will report tracking lost",
		      MAJOR(nc->md_dev), MINOR(nc->md_dev), r);
	return r;
}

static bool header_is_zero(const void *h)
{
	return !memchr_inv(h, 0, META_BLOCK);
}

/* Start over after an unclean stop or unusable metadata: no bitmaps, tracking lost. */
static void meta_lose(struct nbdsink_c *nc, u64 next_gen, const char *why)
{
	struct nbdsink_gen *g = open_gen(nc);

	free_closed(nc);
	bitmap_zero(g->bits, nc->nr_chunks);
	g->first = g->last = next_gen;
	nc->lost_gen = next_gen;
	get_random_bytes(&nc->epoch, sizeof(nc->epoch));
	DMERR("%u:%u: %s: tracking lost, a full rescan is needed",
	      MAJOR(nc->md_dev), MINOR(nc->md_dev), why);
}

/*
 * First resume: continue from the bitmaps a clean stop left, or report tracking lost.
 * Only an I/O error or a lack of memory fails (the resume then fails too): any content
 * problem means "lost". All or nothing: every slot is read into new bitmaps first and nc
 * changes only once all of them were read, so a failed load leaves nc as it was and a
 * retried resume starts over from the same state. nc->closed is empty here: nothing can
 * checkpoint an instance that has not loaded its state.
 */
static int meta_load(struct nbdsink_c *nc)
{
	struct nbdsink_dm_meta_header *h;
	struct nbdsink_gen *g, *tmp, *open = NULL, *old;
	const char *lost = NULL;
	LIST_HEAD(closed);
	unsigned int nr, i;
	u64 next;
	int r;

	h = kzalloc(META_BLOCK, GFP_NOIO);
	if (!h)
		return -ENOMEM;
	r = meta_io(nc, REQ_OP_READ, 0, h, META_BLOCK, false);
	if (r || header_is_zero(h))
		goto out;	/* zeros: a new metadata device, a new tracking history */

	nr = le32_to_cpu(h->nr_gens);
	next = nr && nr <= ARRAY_SIZE(h->gens) ? le64_to_cpu(h->gens[nr - 1].last) + 1 : 1;
	if (le32_to_cpu(h->crc) != header_crc(h) ||
	    le32_to_cpu(h->version) != NBDSINK_DM_META_VERSION || !nr || nr > ARRAY_SIZE(h->gens)) {
		next = 1;
		lost = "metadata header is corrupt";
	} else if (le32_to_cpu(h->state) != NBDSINK_DM_META_CLEAN) {
		lost = "metadata was not cleanly closed (unclean stop)";
	} else if (le64_to_cpu(h->chunk_sectors) != nc->chunk_sectors ||
		   le64_to_cpu(h->nr_chunks) != nc->nr_chunks) {
		lost = "chunk size or device size changed";
	}
	if (lost)
		goto lose;

	for (i = 0; i < nr; i++) {
		g = gen_alloc(nc, 0);
		if (!g) {
			r = -ENOMEM;
			goto out;
		}
		g->first = le64_to_cpu(h->gens[i].first);
		g->last = le64_to_cpu(h->gens[i].last);
		if (i == nr - 1)
			open = g;
		else
			list_add_tail(&g->list, &closed);
		r = meta_io(nc, REQ_OP_READ, slot_pos(nc, i), g->bits, nc->bitmap_bytes, true);
		if (r)
			goto out;
		if (bitmap_crc(nc, g->bits) != le32_to_cpu(h->gens[i].crc)) {
			lost = "a metadata bitmap fails its checksum";
			goto lose;
		}
	}

	/* Everything was read: only now does nc change. */
	old = open_gen(nc);
	rcu_assign_pointer(nc->open, open);
	/* Not live yet, so nothing marks the old bitmap: the grace period only makes sure. */
	synchronize_rcu();
	gen_free(old);
	open = NULL;
	list_splice_tail_init(&closed, &nc->closed);
	nc->nr_closed += nr - 1;
	nc->epoch = le64_to_cpu(h->epoch);
	nc->lost_gen = le64_to_cpu(h->lost_gen);
	nc->meta_seq = le64_to_cpu(h->seq);
	DMINFO("%u:%u: continuing from metadata: generation %llu, %u closed",
	       MAJOR(nc->md_dev), MINOR(nc->md_dev), open_gen(nc)->first, nc->nr_closed);
	goto out;

lose:
	nc->meta_seq = le64_to_cpu(h->seq);
	meta_lose(nc, next, lost);
out:
	list_for_each_entry_safe(g, tmp, &closed, list) {
		list_del(&g->list);
		gen_free(g);
	}
	gen_free(open);
	kfree(h);
	return r;
}

/* ---- reloads -------------------------------------------------------------------------- */

/*
 * Under nbdsink_targets_lock and nc->lock: the table nc replaces on a reload -- the
 * instance for the same mapped device that holds the state (it loaded it) and is suspended
 * (dm destroys it only after the new table has resumed). A table loaded but never resumed
 * holds nothing and does not count, nor does one whose state already moved on. dm
 * serialises the suspends and resumes of one mapped device, so these flags of instances of
 * nc's device do not change meanwhile.
 */
static struct nbdsink_c *predecessor(struct nbdsink_c *nc)
{
	struct nbdsink_c *p;

	list_for_each_entry(p, &nbdsink_targets, registry)
		if (p != nc && p->md_dev == nc->md_dev && p->loaded && p->suspended &&
		    !p->handed_over)
			return p;
	return NULL;
}

/*
 * Under nbdsink_targets_lock, nc->lock and prev->lock: continue prev's generations in nc (a
 * reload), in memory only. Returns true when prev's metadata must then be marked ACTIVE:
 * the state moves away from it, and left CLEAN it would be loaded later as current (ACTIVE
 * makes a later load of it report "lost" instead).
 */
static bool take_over(struct nbdsink_c *nc, struct nbdsink_c *prev)
{
	struct nbdsink_gen *mine = open_gen(nc);
	struct nbdsink_gen *theirs = rcu_dereference_protected(prev->open,
							       lockdep_is_held(&prev->lock));

	nc->epoch = prev->epoch;
	nc->meta_seq = prev->meta_seq;
	/* Numbered after prev's: what prev's header will list after the swap, if written. */
	mine->first = mine->last = theirs->last + 1;
	if (prev->chunk_sectors != nc->chunk_sectors || prev->nr_chunks != nc->nr_chunks) {
		nc->lost_gen = mine->first;
		DMERR("%u:%u: reloaded with another chunk size or length: tracking lost, a full rescan is needed",
		      MAJOR(nc->md_dev), MINOR(nc->md_dev));
	} else {
		/* prev is suspended and nc not yet resumed: neither bitmap is being marked. */
		rcu_assign_pointer(nc->open, theirs);
		rcu_assign_pointer(prev->open, mine);
		list_splice_init(&prev->closed, &nc->closed);
		nc->nr_closed = prev->nr_closed;
		prev->nr_closed = 0;
		nc->lost_gen = prev->lost_gen;
		/* An ioctl reading prev's bitmaps follows them to nc. */
		prev->handed_over = true;
	}
	return prev->meta && (!nc->meta || prev->meta->bdev != nc->meta->bdev);
}

/* ---- control ------------------------------------------------------------------------ */

/*
 * Close the open generation; its number is the result. -EAGAIN: the state is not loaded
 * (a resume failed to read the metadata), so there is nothing to close yet.
 */
static int nbdsink_checkpoint(struct nbdsink_c *nc, u64 *closed)
{
	struct nbdsink_gen *next, *old;

	/* Allocated before the lock: a checkpoint never blocks the hot path on memory. */
	next = gen_alloc(nc, 0);
	if (!next)
		return -ENOMEM;
	mutex_lock(&nc->lock);
	if (!nc->loaded) {
		mutex_unlock(&nc->lock);
		gen_free(next);
		return -EAGAIN;
	}
	old = open_gen(nc);
	next->first = next->last = old->last + 1;
	rcu_assign_pointer(nc->open, next);
	/* After the grace period no CPU can still be marking the old bitmap. */
	synchronize_rcu();
	list_add_tail(&old->list, &nc->closed);
	nc->nr_closed++;
	if (nc->nr_closed > NBDSINK_DM_MAX_CLOSED) {
		/* Bound memory: fold the oldest into the next one (over-reporting is safe). */
		struct nbdsink_gen *a = list_first_entry(&nc->closed, struct nbdsink_gen, list);
		struct nbdsink_gen *b = list_next_entry(a, list);

		bitmap_or(b->bits, b->bits, a->bits, nc->nr_chunks);
		b->first = a->first;
		list_del(&a->list);
		gen_free(a);
		nc->nr_closed--;
	}
	*closed = old->last;
	/* Suspended: nothing will write the metadata again before a load, so do it now. */
	if (nc->meta && nc->suspended)
		meta_write(nc, NBDSINK_DM_META_CLEAN);
	mutex_unlock(&nc->lock);
	return 0;
}

/* -EINVAL: upto is not closed; -EAGAIN: the state is not loaded (see nbdsink_checkpoint). */
static int nbdsink_release(struct nbdsink_c *nc, u64 upto)
{
	struct nbdsink_gen *g, *tmp;
	int r = 0;

	mutex_lock(&nc->lock);
	if (!nc->loaded)
		r = -EAGAIN;
	else if (upto >= open_gen(nc)->first)
		r = -EINVAL;
	if (r) {
		mutex_unlock(&nc->lock);
		return r;
	}
	list_for_each_entry_safe(g, tmp, &nc->closed, list) {
		/* A merged bitmap is kept until all of its generations are released. */
		if (g->last > upto)
			break;
		list_del(&g->list);
		gen_free(g);
		nc->nr_closed--;
	}
	if (nc->lost_gen && upto >= nc->lost_gen)
		nc->lost_gen = 0;
	if (nc->meta && nc->suspended)
		meta_write(nc, NBDSINK_DM_META_CLEAN);
	mutex_unlock(&nc->lock);
	return 0;
}

/* ---- the target ----------------------------------------------------------------------- */

static void nbdsink_put_devices(struct nbdsink_c *nc)
{
	if (nc->meta)
		dm_put_device(nc->ti, nc->meta);
	if (nc->dev)
		dm_put_device(nc->ti, nc->dev);
}

/* The last reference is gone: nobody else can reach nc. */
static void nbdsink_free(struct kref *ref)
{
	struct nbdsink_c *nc = container_of(ref, struct nbdsink_c, ref);

	free_closed(nc);
	gen_free(rcu_dereference_protected(nc->open, 1));
	kfree(nc);
}

static void nbdsink_put(struct nbdsink_c *nc)
{
	kref_put(&nc->ref, nbdsink_free);
}

/* Refuse a metadata device holding anything but our header or zeros: it may be data. */
static int check_meta_header(struct nbdsink_c *nc, char **error)
{
	/* NOIO: a table may be loaded while the device (or one it stacks on) is suspended. */
	struct nbdsink_dm_meta_header *h = kzalloc(META_BLOCK, GFP_NOIO);
	int r;

	if (!h)
		return -ENOMEM;
	r = meta_io(nc, REQ_OP_READ, 0, h, META_BLOCK, false);
	if (r) {
		*error = "Cannot read the metadata device";
	} else if (!header_is_zero(h) && le64_to_cpu(h->magic) != NBDSINK_DM_META_MAGIC) {
		*error = "Metadata device holds unknown data (zero its first 4 KiB to use it)";
		r = -EINVAL;
	} else if (!header_is_zero(h) && le32_to_cpu(h->version) != NBDSINK_DM_META_VERSION) {
		*error = "Unsupported metadata version";
		r = -EINVAL;
	}
	kfree(h);
	return r;
}

/*
 * Construct an nbdsink mapping:
 *
 *   <dev path> <chunk sectors> [<metadata dev path>]
 *
 * <dev path>: the data device every bio passes through to, unchanged (the target maps its
 *   sectors 0..len-1 to the same sectors of the device).
 * <chunk sectors>: the tracking granularity in 512-byte sectors, a power of two >= 8.
 * <metadata dev path>: optional. A clean suspend or removal writes every bitmap there under
 *   a checksummed header; the next load continues from them. Without it, or after an
 *   unclean stop, tracking starts over (reported as lost in the latter case). A table
 *   reload hands the generations over in memory either way. It must hold
 *   zeros or nbdsink metadata, and be at least 4 KiB + 17 bitmaps
 *   (17 * round_up(chunks / 8, 4 KiB)) long.
 *
 * Messages: "checkpoint" (prints the number of the generation it closed),
 * "release <generation>".
 *
 * Status: <open generation> <chunk sectors> <dirty chunks, open generation>
 *   <dirty chunks, union of closed generations> <total chunks> <closed bitmaps>
 *   <ok|lost> <none|ok|error (metadata)> <epoch>
 */
static int nbdsink_ctr(struct dm_target *ti, unsigned int argc, char **argv)
{
	struct nbdsink_c *nc;
	struct nbdsink_gen *g;
	unsigned long long chunk;
	char dummy;
	int r;

	if (argc != 2 && argc != 3) {
		ti->error = "Invalid argument count: <dev path> <chunk sectors> [<metadata dev path>]";
		return -EINVAL;
	}
	if (sscanf(argv[1], "%llu%c", &chunk, &dummy) != 1 || chunk < NBDSINK_MIN_CHUNK_SECTORS ||
	    !is_power_of_2(chunk) || chunk > (1ULL << 30)) {
		ti->error = "Invalid chunk size: a power of two number of sectors, at least 8";
		return -EINVAL;
	}

	nc = kzalloc(sizeof(*nc), GFP_KERNEL);
	if (!nc) {
		ti->error = "Cannot allocate the target context";
		return -ENOMEM;
	}
	kref_init(&nc->ref);
	nc->ti = ti;
	mutex_init(&nc->lock);
	INIT_LIST_HEAD(&nc->closed);
	INIT_LIST_HEAD(&nc->registry);
	nc->chunk_sectors = chunk;
	nc->chunk_shift = ilog2(chunk);
	nc->nr_chunks = DIV_ROUND_UP_SECTOR_T(ti->len, chunk);

	r = dm_get_device(ti, argv[0], dm_table_get_mode(ti->table), &nc->dev);
	if (r) {
		ti->error = "Data device lookup failed";
		goto bad;
	}
	if (ti->len > bdev_nr_sectors(nc->dev->bdev)) {
		ti->error = "Data device is smaller than the target";
		r = -EINVAL;
		goto bad;
	}
	if (nc->nr_chunks > NBDSINK_MAX_CHUNKS) {
		ti->error = "Too many chunks: use a larger chunk size";
		r = -EINVAL;
		goto bad;
	}
	nc->bitmap_bytes = BITS_TO_LONGS(nc->nr_chunks) * sizeof(long);
	nc->slot_bytes = round_up(nc->bitmap_bytes, META_BLOCK);

	g = gen_alloc(nc, 1);
	if (!g) {
		ti->error = "Cannot allocate the chunk bitmap";
		r = -ENOMEM;
		goto bad;
	}
	RCU_INIT_POINTER(nc->open, g);

	if (argc == 3) {
		r = dm_get_device(ti, argv[2], dm_table_get_mode(ti->table), &nc->meta);
		if (r) {
			ti->error = "Metadata device lookup failed";
			goto bad;
		}
		if (nc->meta->bdev == nc->dev->bdev) {
			ti->error = "The metadata device must differ from the data device";
			r = -EINVAL;
			goto bad;
		}
		if ((u64)bdev_nr_sectors(nc->meta->bdev) << SECTOR_SHIFT < meta_bytes_needed(nc)) {
			ti->error = "Metadata device too small: it needs 4 KiB + 17 bitmaps";
			r = -EINVAL;
			goto bad;
		}
		r = check_meta_header(nc, &ti->error);
		if (r)
			goto bad;
	}

	nc->md_dev = disk_devt(dm_disk(dm_table_get_md(ti->table)));
	get_random_bytes(&nc->epoch, sizeof(nc->epoch));
	nc->suspended = true;

	ti->num_flush_bios = 1;
	ti->num_discard_bios = 1;
	ti->num_secure_erase_bios = 1;
	ti->num_write_zeroes_bios = 1;
	ti->per_io_data_size = sizeof(struct nbdsink_per_bio);
	ti->private = nc;

	mutex_lock(&nbdsink_targets_lock);
	list_add_tail(&nc->registry, &nbdsink_targets);
	mutex_unlock(&nbdsink_targets_lock);
	return 0;

bad:
	nbdsink_put_devices(nc);
	nbdsink_put(nc);
	return r;
}

static void nbdsink_dtr(struct dm_target *ti)
{
	struct nbdsink_c *nc = ti->private;

	mutex_lock(&nbdsink_targets_lock);
	list_del_init(&nc->registry);
	mutex_unlock(&nbdsink_targets_lock);
	/* An ioctl may still hold a reference: it sees removed and leaves ti and the devices. */
	mutex_lock(&nc->lock);
	nc->removed = true;
	mutex_unlock(&nc->lock);
	nbdsink_put_devices(nc);
	nbdsink_put(nc);
}

static int nbdsink_map(struct dm_target *ti, struct bio *bio)
{
	struct nbdsink_c *nc = ti->private;
	struct nbdsink_per_bio *pb = dm_per_bio_data(bio, sizeof(*pb));

	bio_set_dev(bio, nc->dev->bdev);
	pb->tracked = false;
	if (bio_sectors(bio)) {
		sector_t sector = dm_target_offset(ti, bio->bi_iter.bi_sector);

		bio->bi_iter.bi_sector = sector;
		if (op_is_write(bio_op(bio))) {
			pb->first = sector >> nc->chunk_shift;
			pb->last = (sector + bio_sectors(bio) - 1) >> nc->chunk_shift;
			pb->tracked = true;
			nbdsink_mark(nc, pb->first, pb->last);
		}
	}
	return DM_MAPIO_REMAPPED;
}

static int nbdsink_end_io(struct dm_target *ti, struct bio *bio, blk_status_t *error)
{
	struct nbdsink_per_bio *pb = dm_per_bio_data(bio, sizeof(*pb));

	/* Even a failed write may have changed some of its sectors. */
	if (pb->tracked)
		nbdsink_mark(ti->private, pb->first, pb->last);
	return DM_ENDIO_DONE;
}

static void nbdsink_postsuspend(struct dm_target *ti)
{
	struct nbdsink_c *nc = ti->private;
	/* The device is suspended: reclaim must not write to it (nor wait for it). */
	unsigned int noio = memalloc_noio_save();

	mutex_lock(&nc->lock);
	nc->suspended = true;
	/* In-flight I/O has drained: the bitmaps are complete. */
	if (nc->meta && nc->loaded)
		meta_write(nc, NBDSINK_DM_META_CLEAN);
	mutex_unlock(&nc->lock);
	memalloc_noio_restore(noio);
}

static int nbdsink_preresume(struct dm_target *ti)
{
	struct nbdsink_c *nc = ti->private, *prev = NULL;
	unsigned int noio = memalloc_noio_save();
	bool prev_stale = false;
	int r = 0;

	/*
	 * State is picked up here, not in the constructor: on a reload the old table has only
	 * now been suspended (and, with metadata, written its final state). The registry lock
	 * pairs nc with the table it replaces and moves the state over in memory; all the
	 * metadata I/O below runs without it.
	 */
	mutex_lock(&nbdsink_targets_lock);
	mutex_lock(&nc->lock);
	if (!nc->loaded) {
		prev = predecessor(nc);
		if (prev) {
			mutex_lock_nested(&prev->lock, SINGLE_DEPTH_NESTING);
			prev_stale = take_over(nc, prev);
			if (prev_stale)
				kref_get(&prev->ref);
			mutex_unlock(&prev->lock);
			nc->loaded = true;
			/* nc holds the state now: the ioctls for the device find it first. */
			list_move(&nc->registry, &nbdsink_targets);
		}
	}
	mutex_unlock(&nc->lock);
	mutex_unlock(&nbdsink_targets_lock);

	if (prev_stale) {
		mutex_lock(&prev->lock);
		if (!prev->removed)
			meta_write(prev, NBDSINK_DM_META_ACTIVE);
		mutex_unlock(&prev->lock);
		nbdsink_put(prev);
	}

	mutex_lock(&nc->lock);
	if (!nc->loaded && nc->meta) {
		/* All or nothing: after a failure the next resume tries again from scratch. */
		r = meta_load(nc);
		if (r) {
			nc->meta_error = true;
			DMERR("%u:%u: reading metadata failed (%d): resume again once readable",
			      MAJOR(nc->md_dev), MINOR(nc->md_dev), r);
		} else {
			nc->loaded = true;
		}
	} else {
		nc->loaded = true;
	}
	/* ACTIVE on disk before any write passes: a crash from now on reads as unclean. */
	if (!r && nc->meta)
		r = meta_write(nc, NBDSINK_DM_META_ACTIVE);
	mutex_unlock(&nc->lock);
	memalloc_noio_restore(noio);
	return r;
}

static void nbdsink_resume(struct dm_target *ti)
{
	struct nbdsink_c *nc = ti->private;

	mutex_lock(&nc->lock);
	nc->suspended = false;
	mutex_unlock(&nc->lock);
	/* The live table's instance answers ioctls for this device from now on. */
	mutex_lock(&nbdsink_targets_lock);
	list_move(&nc->registry, &nbdsink_targets);
	mutex_unlock(&nbdsink_targets_lock);
}

static void nbdsink_status(struct dm_target *ti, status_type_t type, unsigned int status_flags,
			   char *result, unsigned int maxlen)
{
	struct nbdsink_c *nc = ti->private;
	unsigned int sz = 0;

	switch (type) {
	case STATUSTYPE_INFO:
		mutex_lock(&nc->lock);
		DMEMIT("%llu %llu %llu %llu %lu %u %s %s %016llx",
		       open_gen(nc)->first, (unsigned long long)nc->chunk_sectors,
		       count_dirty(nc, true), count_dirty(nc, false), nc->nr_chunks,
		       nc->nr_closed, nc->lost_gen ? "lost" : "ok",
		       !nc->meta ? "none" : nc->meta_error ? "error" : "ok", nc->epoch);
		mutex_unlock(&nc->lock);
		break;
	case STATUSTYPE_TABLE:
		DMEMIT("%s %llu", nc->dev->name, (unsigned long long)nc->chunk_sectors);
		if (nc->meta)
			DMEMIT(" %s", nc->meta->name);
		break;
	case STATUSTYPE_IMA:
		DMEMIT_TARGET_NAME_VERSION(ti->type);
		DMEMIT(",data_device=%s,chunk_sectors=%llu,metadata_device=%s;", nc->dev->name,
		       (unsigned long long)nc->chunk_sectors, nc->meta ? nc->meta->name : "none");
		break;
	}
}

static int nbdsink_message(struct dm_target *ti, unsigned int argc, char **argv, char *result,
			   unsigned int maxlen)
{
	struct nbdsink_c *nc = ti->private;
	unsigned long long gen;
	char dummy;
	unsigned int noio;
	u64 closed;
	int r;

	/* The device may be suspended: reclaim must not write to it (nor wait for it). */
	noio = memalloc_noio_save();
	if (argc == 1 && !strcasecmp(argv[0], "checkpoint")) {
		r = nbdsink_checkpoint(nc, &closed);
		if (!r) {
			scnprintf(result, maxlen, "%llu", closed);
			r = 1;	/* 1: the result buffer holds a reply for user space */
		}
	} else if (argc == 2 && !strcasecmp(argv[0], "release")) {
		if (sscanf(argv[1], "%llu%c", &gen, &dummy) != 1) {
			DMERR_LIMIT("release: invalid generation '%s'", argv[1]);
			r = -EINVAL;
		} else {
			r = nbdsink_release(nc, gen);
			if (r == -EINVAL)
				DMERR_LIMIT("release: generation %llu is not closed", gen);
		}
	} else {
		DMERR_LIMIT("unknown message (want: checkpoint | release <generation>)");
		r = -EINVAL;
	}
	memalloc_noio_restore(noio);
	if (r == -EAGAIN)
		DMERR_LIMIT("%u:%u: %s: no state loaded (reading metadata failed): resume first",
			    MAJOR(nc->md_dev), MINOR(nc->md_dev), argv[0]);
	return r;
}

static int nbdsink_iterate_devices(struct dm_target *ti, iterate_devices_callout_fn fn,
				   void *data)
{
	struct nbdsink_c *nc = ti->private;

	return fn(ti, nc->dev, 0, ti->len, data);
}

static struct target_type nbdsink_target = {
	.name = "nbdsink",
	.version = { 1, 0, 0 },
	.module = THIS_MODULE,
	.ctr = nbdsink_ctr,
	.dtr = nbdsink_dtr,
	.map = nbdsink_map,
	.end_io = nbdsink_end_io,
	.postsuspend = nbdsink_postsuspend,
	.preresume = nbdsink_preresume,
	.resume = nbdsink_resume,
	.status = nbdsink_status,
	.message = nbdsink_message,
	.iterate_devices = nbdsink_iterate_devices,
};

/* ---- /dev/nbdsink-dm ------------------------------------------------------------------ */

/*
 * Lock the instance that answers for dm device major:minor. *ncp is NULL or an instance the
 * caller holds a reference on (a reload may have moved its state since: then the state's
 * new owner is looked up). On success *ncp is referenced and locked; on error nothing is
 * held and *ncp is NULL. The registry lock is held only for the lookup.
 */
static int lock_target(u32 major, u32 minor, struct nbdsink_c **ncp)
{
	struct nbdsink_c *nc = *ncp, *p;
	bool removed;

	*ncp = NULL;
	for (;;) {
		if (!nc) {
			mutex_lock(&nbdsink_targets_lock);
			/* handed_over only changes under the registry lock too. */
			list_for_each_entry(p, &nbdsink_targets, registry) {
				if (p->md_dev == MKDEV(major, minor) && !p->handed_over) {
					nc = p;
					kref_get(&nc->ref);
					break;
				}
			}
			mutex_unlock(&nbdsink_targets_lock);
			if (!nc)
				return -ENODEV;
		}
		mutex_lock(&nc->lock);
		removed = nc->removed;
		if (!removed && !nc->handed_over) {
			*ncp = nc;
			return 0;
		}
		mutex_unlock(&nc->lock);
		nbdsink_put(nc);
		if (removed)
			return -ENODEV;
		nc = NULL;
	}
}

static long ioctl_info(void __user *arg)
{
	struct nbdsink_dm_info info;
	struct nbdsink_c *nc = NULL;
	long r;

	if (copy_from_user(&info, arg, sizeof(info)))
		return -EFAULT;
	r = lock_target(info.dev_major, info.dev_minor, &nc);
	if (r)
		return r;
	memset(&info, 0, sizeof(info));
	info.dev_major = MAJOR(nc->md_dev);
	info.dev_minor = MINOR(nc->md_dev);
	info.flags = (nc->lost_gen ? NBDSINK_DM_INFO_LOST : 0) |
		     (nc->meta ? NBDSINK_DM_INFO_METADATA : 0) |
		     (nc->meta_error ? NBDSINK_DM_INFO_META_ERROR : 0) |
		     (nc->suspended ? NBDSINK_DM_INFO_SUSPENDED : 0);
	info.nr_closed = nc->nr_closed;
	info.chunk_sectors = nc->chunk_sectors;
	info.nr_chunks = nc->nr_chunks;
	info.open_gen = open_gen(nc)->first;
	info.oldest_gen = list_empty(&nc->closed) ? info.open_gen :
			  list_first_entry(&nc->closed, struct nbdsink_gen, list)->first;
	info.lost_gen = nc->lost_gen;
	info.epoch = nc->epoch;
	info.dirty_open = count_dirty(nc, true);
	info.dirty_closed = count_dirty(nc, false);
	info.target_sectors = nc->ti->len;	/* not removed: ti is still there */
	mutex_unlock(&nc->lock);
	nbdsink_put(nc);
	/* No lock held: the copy may fault, and the fault wait for a suspended device. */
	if (copy_to_user(arg, &info, sizeof(info)))
		return -EFAULT;
	return 0;
}

/* Under nc->lock: does closed generation req->generation (or the union up to it) exist? */
static bool bitmap_wanted(struct nbdsink_c *nc, const struct nbdsink_dm_bitmap *req,
			  const struct nbdsink_gen *g)
{
	if (req->generation >= open_gen(nc)->first)
		return false;	/* only closed generations: the open one is still being marked */
	if (req->flags & NBDSINK_DM_BITMAP_UNION)
		return g->first <= req->generation;
	return g->first <= req->generation && req->generation <= g->last;
}

static long ioctl_bitmap(void __user *arg)
{
	struct nbdsink_dm_bitmap req;
	struct nbdsink_c *nc = NULL;
	struct nbdsink_gen *g;
	unsigned long *bounce;
	u64 done = 0, dirty = 0, want = 0;
	bool started = false;
	long r;

	if (copy_from_user(&req, arg, sizeof(req)))
		return -EFAULT;
	if (req.first_chunk % 64 || req.flags & ~NBDSINK_DM_BITMAP_UNION)
		return -EINVAL;
	bounce = kmalloc(PAGE_SIZE, GFP_KERNEL);
	if (!bounce)
		return -ENOMEM;
	/*
	 * One page of the bitmap at a time: gathered into bounce under nc->lock, copied to user
	 * memory with no lock held. Between pages a release may drop the generation (ENOENT,
	 * as if released before), a checkpoint may merge it into a wider one (a superset: safe)
	 * or a reload may move it to the new table's instance (lock_target follows it).
	 */
	for (;;) {
		/* Bits [first_chunk + done, + piece) of the bitmap. */
		unsigned long w0, nw, w;
		bool found = false;
		size_t bytes;
		u64 piece;

		r = lock_target(req.dev_major, req.dev_minor, &nc);
		if (r)
			break;
		list_for_each_entry(g, &nc->closed, list)
			found |= bitmap_wanted(nc, &req, g);
		if (!found) {
			mutex_unlock(&nc->lock);
			r = -ENOENT;
			break;
		}
		if (!started) {
			want = req.first_chunk >= nc->nr_chunks ? 0 :
			       min_t(u64, req.nr_chunks, nc->nr_chunks - req.first_chunk);
			started = true;
		}
		if (done >= want) {
			mutex_unlock(&nc->lock);
			break;
		}
		piece = min_t(u64, want - done, PAGE_SIZE * 8);
		w0 = BIT_WORD(req.first_chunk + done);
		nw = BITS_TO_LONGS(piece);
		bytes = DIV_ROUND_UP(piece, 64) * 8;
		memset(bounce, 0, PAGE_SIZE);
		list_for_each_entry(g, &nc->closed, list) {
			if (!bitmap_wanted(nc, &req, g))
				continue;
			for (w = 0; w < nw; w++)
				bounce[w] |= g->bits[w0 + w];
		}
		mutex_unlock(&nc->lock);
		/* Whole words were copied: clear bits past the requested range. */
		if (piece % BITS_PER_LONG)
			bounce[nw - 1] &= BITMAP_LAST_WORD_MASK(piece);
		dirty += bitmap_weight(bounce, piece);
		bits_le_swap(bounce, bytes);
		if (copy_to_user(u64_to_user_ptr(req.buffer + done / 8), bounce, bytes)) {
			r = -EFAULT;
			break;
		}
		done += piece;
		cond_resched();
	}
	if (nc)
		nbdsink_put(nc);
	kfree(bounce);
	if (r)
		return r;
	req.nr_chunks = done;
	req.dirty = dirty;
	if (copy_to_user(arg, &req, sizeof(req)))
		return -EFAULT;
	return 0;
}

static long nbdsink_ctl_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	/* Bitmaps reveal where a device is written: administrators only. */
	if (!capable(CAP_SYS_ADMIN))
		return -EPERM;
	switch (cmd) {
	case NBDSINK_DM_IOC_INFO:
		return ioctl_info((void __user *)arg);
	case NBDSINK_DM_IOC_BITMAP:
		return ioctl_bitmap((void __user *)arg);
	}
	return -ENOTTY;
}

static const struct file_operations nbdsink_ctl_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = nbdsink_ctl_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
};

static struct miscdevice nbdsink_ctl = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = NBDSINK_DM_CONTROL,
	.fops = &nbdsink_ctl_fops,
	.mode = 0600,
};

static int __init dm_nbdsink_init(void)
{
	int r;

	BUILD_BUG_ON(sizeof(struct nbdsink_dm_meta_header) > META_BLOCK);
	/* A page holds whole metadata blocks (and whole 8-byte words of a bitmap). */
	BUILD_BUG_ON(PAGE_SIZE % META_BLOCK);
	r = misc_register(&nbdsink_ctl);
	if (r)
		return r;
	r = dm_register_target(&nbdsink_target);
	if (r) {
		misc_deregister(&nbdsink_ctl);
		DMERR("register failed %d", r);
	}
	return r;
}

static void __exit dm_nbdsink_exit(void)
{
	dm_unregister_target(&nbdsink_target);
	misc_deregister(&nbdsink_ctl);
}

module_init(dm_nbdsink_init);
module_exit(dm_nbdsink_exit);

MODULE_DESCRIPTION(DM_NAME " target tracking written chunks in generations, for nbdsink");
MODULE_LICENSE("GPL");
