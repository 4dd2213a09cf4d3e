/* Layouts shared by the BPF program and its loader (nbdsink/tracker/bpf.py mirrors them). */
#ifndef NBDSINK_TRACKER_H
#define NBDSINK_TRACKER_H

/* Read-only configuration, fixed at load time (.rodata). */
struct nbdsink_cfg {
	__u32 major;        /* the whole disk's major ... */
	__u32 first_minor;  /* ... and first minor: partitions are tracked on their disk */
	__u64 start_sect;   /* first sector of the tracked range on the disk (partition start) */
	__u64 nr_sects;     /* length of the tracked range in 512-byte sectors */
	__u32 chunk_shift;  /* log2(chunk size / 512) */
	__u32 words;        /* u64 words in one generation's bitmap */
};

/* The one entry of the "ctl" map (mmapable, shared with userspace). */
struct nbdsink_ctl {
	__u64 seq;          /* number of the open generation; its bitmap is seq & 1 */
	__u64 overflow[2];  /* per bitmap: a range could not be marked precisely -> all dirty */
	__u64 bio_lost;     /* in-flight bio table was full (diagnostic) */
	__u64 qoverflow[2]; /* the same, for the issue-time bitmaps ("qbits") */
};

/* The one entry of the per-CPU "pcpu" map. */
struct nbdsink_pcpu {
	__u64 active;       /* runs on this CPU between reading seq and their last mark */
	__u64 last[4];      /* per hook: the event copy a took on this CPU (see the program) */
	__u64 done_sects;   /* sectors of data-changing requests seen completing (request-based) */
	__u64 issued_sects; /* sectors of data-changing requests seen issued (request-based) */
};

#endif
