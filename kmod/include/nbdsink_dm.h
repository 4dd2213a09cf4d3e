/* SPDX-License-Identifier: GPL-2.0-only WITH Linux-syscall-note */
/*
 * nbdsink_dm.h - user-space interface of the nbdsink device-mapper target.
 *
 * The target (kmod/dm/dm-nbdsink.c) passes every bio through to its data device and marks
 * the chunks touched by writes, discards and write-zeroes in the bitmap of the current
 * ("open") generation. The dm message "checkpoint" closes the open generation and opens the
 * next one; "release <generation>" forgets closed generations up to that number.
 *
 * Bitmaps of closed generations are read through the misc device /dev/nbdsink-dm with the
 * ioctls below, naming the dm device by its major:minor, in pieces of any size so a large
 * device never needs one huge copy.
 *
 * Bitmap format (ioctl buffers and the metadata device alike): a little-endian bit stream,
 * bit i of the bitmap is (byte[i / 8] >> (i % 8)) & 1, chunk i covering sectors
 * [i * chunk_sectors, (i + 1) * chunk_sectors) of the target.
 */
#ifndef _UAPI_LINUX_NBDSINK_DM_H
#define _UAPI_LINUX_NBDSINK_DM_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define NBDSINK_DM_CONTROL	"nbdsink-dm"	/* /dev/nbdsink-dm */
#define NBDSINK_DM_IOC_MAGIC	0xDB

/* nbdsink_dm_info.flags */
#define NBDSINK_DM_INFO_LOST		(1U << 0)	/* tracking lost: rescan needed */
#define NBDSINK_DM_INFO_METADATA	(1U << 1)	/* a metadata device is configured */
#define NBDSINK_DM_INFO_META_ERROR	(1U << 2)	/* the last metadata load or write failed */
#define NBDSINK_DM_INFO_SUSPENDED	(1U << 3)	/* the target is suspended */

/*
 * NBDSINK_DM_IOC_INFO: the state of the nbdsink target of dm device major:minor.
 * The generation numbers: open_gen is being marked now; closed generations still held
 * (not released) are oldest_gen .. open_gen - 1. While NBDSINK_DM_INFO_LOST is set, writes
 * made before generation lost_gen was closed may be missing from every bitmap (an unclean
 * stop, unreadable metadata): releasing a generation >= lost_gen clears the flag.
 */
struct nbdsink_dm_info {
	__u32 dev_major;	/* in */
	__u32 dev_minor;	/* in */
	__u32 flags;		/* out: NBDSINK_DM_INFO_* */
	__u32 nr_closed;	/* out: closed bitmaps held (merged generations count once) */
	__u64 chunk_sectors;	/* out: chunk size in 512-byte sectors */
	__u64 nr_chunks;	/* out: chunks in the target (the last may be partial) */
	__u64 open_gen;		/* out */
	__u64 oldest_gen;	/* out: == open_gen when nothing is closed */
	__u64 lost_gen;		/* out: 0 unless NBDSINK_DM_INFO_LOST */
	__u64 epoch;		/* out: random id of this tracking history, kept by metadata */
	__u64 dirty_open;	/* out: chunks marked in the open generation */
	__u64 dirty_closed;	/* out: chunks marked in the union of the closed ones */
	__u64 target_sectors;	/* out: length of the target */
	__u64 reserved[3];
};

/* nbdsink_dm_bitmap.flags */
#define NBDSINK_DM_BITMAP_UNION	(1U << 0)	/* OR of every held generation <= generation */

/*
 * NBDSINK_DM_IOC_BITMAP: copy part of a closed generation's bitmap to user memory.
 * first_chunk must be a multiple of 64; the buffer holds nr_chunks bits (rounded up to
 * whole 8-byte words). On return nr_chunks is the number of bits copied (clipped at the
 * end of the device) and dirty the number of them that are set. ENOENT: the generation
 * is open, released or unknown.
 */
struct nbdsink_dm_bitmap {
	__u32 dev_major;	/* in */
	__u32 dev_minor;	/* in */
	__u32 flags;		/* in: NBDSINK_DM_BITMAP_* */
	__u32 reserved0;
	__u64 generation;	/* in */
	__u64 first_chunk;	/* in */
	__u64 nr_chunks;	/* in: bits the buffer holds; out: bits copied */
	__u64 buffer;		/* in: user address */
	__u64 dirty;		/* out */
	__u64 reserved[2];
};

#define NBDSINK_DM_IOC_INFO	_IOWR(NBDSINK_DM_IOC_MAGIC, 0, struct nbdsink_dm_info)
#define NBDSINK_DM_IOC_BITMAP	_IOWR(NBDSINK_DM_IOC_MAGIC, 1, struct nbdsink_dm_bitmap)

/*
 * The metadata device (optional 3rd table argument). Block 0 holds the header; bitmap slot
 * i starts at byte NBDSINK_DM_META_BLOCK * (1 + i * slot_blocks), where slot_blocks is the
 * bitmap size rounded up to whole blocks. Slots 0 .. nr_gens - 2 hold the closed
 * generations (oldest first), slot nr_gens - 1 the open one. All fields little-endian.
 *
 * state is ACTIVE from the first resume until a clean suspend or removal wrote every bitmap
 * and set it CLEAN: finding ACTIVE when loading means an unclean stop, so tracking is lost.
 */
#define NBDSINK_DM_META_MAGIC	0x314d44534b44424eULL	/* "NBDKSDM1" little-endian */
#define NBDSINK_DM_META_VERSION	1
#define NBDSINK_DM_META_BLOCK	4096
#define NBDSINK_DM_META_CLEAN	1
#define NBDSINK_DM_META_ACTIVE	2
#define NBDSINK_DM_MAX_CLOSED	16	/* older closed generations are merged beyond this */

struct nbdsink_dm_meta_gen {
	__le64 first;		/* generations merged into this bitmap: first .. last */
	__le64 last;
	__le32 crc;		/* crc32 of the slot's bitmap bytes */
	__le32 reserved;
};

struct nbdsink_dm_meta_header {
	__le64 magic;
	__le32 version;
	__le32 state;		/* NBDSINK_DM_META_CLEAN or _ACTIVE */
	__le32 crc;		/* crc32 of the whole header block with this field zero */
	__le32 nr_gens;		/* slots in use, the open generation included */
	__le64 epoch;
	__le64 chunk_sectors;
	__le64 nr_chunks;
	__le64 lost_gen;
	__le64 seq;		/* bumped by every header write */
	struct nbdsink_dm_meta_gen gens[NBDSINK_DM_MAX_CLOSED + 1];
};

#endif /* _UAPI_LINUX_NBDSINK_DM_H */
