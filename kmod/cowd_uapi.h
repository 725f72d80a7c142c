/* SPDX-License-Identifier: GPL-2.0-only WITH Linux-syscall-note */
/*
 * cowd kernel shim: the whole ABI between the cowd module and its daemon.
 *
 * Two file descriptors speak it:
 *
 *   /dev/cowd-ctl   the control device.  ioctls create a block device /dev/cowdN from a size,
 *                   a logical block size, a remap granularity (a cluster: 2^cluster_bits
 *                   bytes) and the image files as fds; remove one; hand a device's channel to a
 *                   new daemon (takeover); report the ABI version and features.
 *   channel fd      one per device, returned by CREATE and REOPEN.  read() returns whole
 *                   messages: the kernel's events (v2: ALLOC, REVOKED) first, then misses
 *                   (struct cowd_miss), then v2's TOUCH records; write() takes a sequence of
 *                   daemon messages (REMAP, INVALIDATE, REPLY; v2 also GRANT, ACK, REVOKE,
 *                   TOUCH_STOP), applied in order; poll()
 *                   says POLLIN when something waits to be read.  An ioctl reads the counters.
 *
 * Rules for every struct here: it starts with its own size (and a version where it is an ioctl
 * argument), reserved fields must be zero, unknown flag bits are rejected with EINVAL.  The
 * daemon's Python mirror (cowd/frontends/kmod/abi.py) is checked against this header by a test.
 *
 * The remap table maps a guest cluster (guest_offset >> cluster_bits) to a place in one of the
 * files: (file index, file offset), readable or also writable, or ZERO (reads as zeroes; a
 * write to it is a miss).  Mapped reads and writes are done by the kernel with file I/O on the
 * fds; everything else is a miss that the daemon answers.
 *
 * Versions.  A device speaks the version its CREATE (or the REOPEN that took it over) named,
 * COWD_ABI_MIN_VERSION..COWD_ABI_VERSION, in every message both ways; a version-1 daemon sees
 * exactly the version-1 ABI.  Version 2 adds the allocation pool (COWD_FEAT_POOL):
 *
 *   The daemon GRANTs runs of clusters it reserved in a writable file (their refcounts made
 *   durable first).  A write to clusters whose entries are read-only or ZERO then takes
 *   clusters from the pool, copies the rest of each cluster up from the entry (or writes
 *   zeroes), writes its data and completes, with no round trip; the new mappings are
 *   installed writable and *pinned* (no REMAP replaces them, no INVALIDATE or LRU eviction
 *   drops them) and reported to the daemon in ALLOC messages (runs, numbered by seq).  The
 *   daemon records them in its metadata and ACKs the last seq it recorded, which unpins them.
 *   A FLUSH, DISCARD or WRITE_ZEROES issued after an ALLOC is held in the kernel until that
 *   ALLOC is acknowledged, so the daemon's flush covers every allocation the flush covers.
 *   An empty pool (or a write it cannot serve) falls back to a WRITE miss.  REVOKE empties
 *   the pool, waits for allocations under way and queues REVOKED after their ALLOCs: from
 *   then on the daemon knows every cluster it granted is either reported or never written.
 *   When the channel closes the pool is dropped; a takeover also forgets unread ALLOCs and
 *   pinned entries (those writes are lost like any unflushed one: see cowd_reopen).
 *
 * Boot-trace recording (v2, COWD_FEAT_TOUCH).  The daemon records the order in which a guest
 * first reads the granules of its base file (cowd/disk/boottrace.py), but the kernel does
 * mapped reads without it.  A daemon that asks (COWD_CREATE_TOUCH, or COWD_REOPEN_TOUCH at a
 * takeover) names the traced file (touch_file, an index into fds) and its granule (2^touch_bits
 * bytes); the kernel keeps a bit per granule of that file and, at the first mapped READ that
 * reads a granule, queues a record (CLOCK_MONOTONIC time, file offset and length of the bytes
 * read in that granule).  read() returns the queued records in TOUCH messages, after the
 * events and misses, many records each; the reader is woken when the first record is queued
 * after a read emptied the queue (records then wait for the daemon's next read).  Records
 * are hints: a granule whose record did not fit the queue (COWD_TOUCH_QUEUE unread) has its
 * bit cleared and is recorded at its next read (counted in cowd_touch.deferred).  Recording
 * stops after COWD_MAX_TOUCHES records (the last TOUCH says COWD_TOUCH_END), at a TOUCH_STOP
 * from the daemon (its trace is full or saved; unread records are dropped), and when the
 * channel closes.  A daemon that does not ask, or speaks version 1, sees no TOUCH.
 */
#ifndef _UAPI_LINUX_COWD_H
#define _UAPI_LINUX_COWD_H

#include <linux/types.h>
#include <linux/ioctl.h>

#define COWD_ABI_VERSION	2
#define COWD_ABI_MIN_VERSION	1	/* the oldest version a daemon may speak */

#define COWD_CTL_NAME		"cowd-ctl"	/* /dev/cowd-ctl */
#define COWD_DISK_NAME		"cowd"		/* /dev/cowd0, /dev/cowd0p1, ... */

/* Bounds, checked before anything is allocated. */
#define COWD_MAX_FILES		64	/* image files of one chain (formats' MAX_CHAIN_DEPTH) */
#define COWD_MIN_CLUSTER_BITS	9	/* 512 B */
#define COWD_MAX_CLUSTER_BITS	21	/* 2 MiB, qcow2's largest cluster */
#define COWD_MIN_ENTRIES	4		/* a request may need half the table at once */
#define COWD_MAX_ENTRIES	(1U << 22)	/* remap table bound: 4 Mi entries, ~256 MiB */
#define COWD_MAX_QUEUE_DEPTH	1024
#define COWD_MAX_DATA_BYTES	(1U << 20)	/* largest request, hence largest DATA reply */
#define COWD_MAX_TIMEOUT_MS	(24U * 3600 * 1000)
#define COWD_MAX_POOL_CLUSTERS	(1U << 16)	/* clusters granted and not yet taken */
#define COWD_MAX_POOL_RUNS	4096		/* GRANT runs held at once */
#define COWD_MIN_TOUCH_BITS	12		/* boot-trace granule: 4 KiB .. */
#define COWD_MAX_TOUCH_BITS	26		/* .. 64 MiB (the daemon's trace format's) */
#define COWD_MAX_TOUCH_GRANULES	(1U << 24)	/* of the traced file: a 2 MiB bitmap */
#define COWD_MAX_TOUCHES	(1U << 15)	/* records per recording (the trace's bound) */
#define COWD_TOUCH_QUEUE	4096		/* records queued and not yet read */

/* Features reported by COWD_CTL_VERSION. */
#define COWD_FEAT_TAKEOVER	(1ULL << 0)	/* COWD_CTL_REOPEN */
#define COWD_FEAT_DATA_REPLY	(1ULL << 1)	/* COWD_REPLY_DATA */
#define COWD_FEAT_DISCARD	(1ULL << 2)	/* DISCARD and WRITE_ZEROES misses */
#define COWD_FEAT_POOL		(1ULL << 3)	/* v2: GRANT, ALLOC, ACK, REVOKE, REVOKED */
#define COWD_FEAT_TOUCH		(1ULL << 4)	/* v2: *_TOUCH flags, TOUCH, TOUCH_STOP */
#define COWD_FEATURES_V1	(COWD_FEAT_TAKEOVER | COWD_FEAT_DATA_REPLY | COWD_FEAT_DISCARD)
#define COWD_FEATURES		(COWD_FEATURES_V1 | COWD_FEAT_POOL | COWD_FEAT_TOUCH)

struct cowd_version {
	__u32 size;		/* in: sizeof(struct cowd_version) */
	__u32 version;		/* in: the caller's version (COWD_ABI_MIN_VERSION..) */
	__u32 abi_version;	/* out: COWD_ABI_VERSION */
	__u32 reserved0;
	__u64 features;		/* out: COWD_FEAT_* the caller's version can use */
	char module_version[32];	/* out: NUL-terminated */
	__u64 reserved[4];
};

/* cowd_create.flags */
#define COWD_CREATE_READONLY	(1ULL << 0)	/* the block device is read-only */
#define COWD_CREATE_TOUCH	(1ULL << 1)	/* v2: record first reads of touch_file */
#define COWD_CREATE_FLAGS	(COWD_CREATE_READONLY | COWD_CREATE_TOUCH)

/* cowd_create.file_flags[i] */
#define COWD_FILE_WRITABLE	(1U << 0)	/* remaps into this file may be writable */
#define COWD_FILE_FLAGS		(COWD_FILE_WRITABLE)

struct cowd_create {
	__u32 size;		/* in: sizeof(struct cowd_create) */
	__u32 version;		/* in: the version the device's channel speaks */
	__u64 flags;		/* in: COWD_CREATE_* */
	__u64 disk_size;	/* in: bytes, a multiple of logical_block_size */
	__u32 logical_block_size;	/* in: 512 or 4096 */
	__u32 cluster_bits;	/* in: remap granularity, >= log2(logical_block_size) */
	__u32 max_entries;	/* in: remap table bound (0: the module's default) */
	__u32 queue_depth;	/* in: blk-mq tags (0: the module's default) */
	__u32 daemon_timeout_ms;	/* in: how long misses wait for a new daemon after the
					 * channel closes, then fail with EIO (0: default) */
	__u32 nr_files;		/* in: entries used in fds[] and file_flags[] */
	__s32 fds[COWD_MAX_FILES];	/* in: open regular files; remaps name them by index */
	__u32 file_flags[COWD_MAX_FILES];	/* in: COWD_FILE_* */
	__u32 index;		/* out: N of /dev/cowdN */
	__s32 channel_fd;	/* out: the device's channel, O_CLOEXEC */
	__u32 touch_file;	/* in, COWD_CREATE_TOUCH: the traced file's index (else 0) */
	__u32 touch_bits;	/* in, COWD_CREATE_TOUCH: log2 of its granule (else 0) */
	__u64 reserved[3];
};

/* cowd_remove.flags */
#define COWD_REMOVE_FORCE	(1U << 0)	/* remove even if the block device is open */
#define COWD_REMOVE_FLAGS	(COWD_REMOVE_FORCE)

struct cowd_remove {
	__u32 size;
	__u32 version;
	__u32 index;		/* in */
	__u32 flags;		/* in: COWD_REMOVE_* */
	__u64 reserved[2];
};

/* cowd_reopen.flags */
#define COWD_REOPEN_TOUCH	(1U << 0)	/* v2: record first reads of touch_file */
#define COWD_REOPEN_FLAGS	(COWD_REOPEN_TOUCH)

/*
 * Takeover: a new daemon asks for the channel of a device whose daemon has gone (its channel
 * is closed).  The kernel first forgets every remap (the old daemon's unflushed allocations
 * may not exist in the image) and, v2, its pool, its unread ALLOCs and its pinned entries (the
 * clusters they name are leaks in the image), and waits for mapped I/O in flight; misses that
 * waited are sent again on the new channel.  If writes completed since the last flush, the
 * next FLUSH fails with EIO (they may be lost).  Recording starts afresh if the new daemon
 * asks (the old one's stopped when its channel closed).
 */
struct cowd_reopen {
	__u32 size;
	__u32 version;		/* the version the new channel speaks */
	__u32 index;		/* in */
	__u32 flags;		/* in: COWD_REOPEN_* */
	__s32 channel_fd;	/* out */
	__u32 reserved0;
	__u64 disk_size;	/* out: so the daemon can check it opened the same disk */
	__u32 cluster_bits;	/* out */
	__u32 nr_files;		/* out */
	__u32 touch_file;	/* in, COWD_REOPEN_TOUCH: as cowd_create's (else 0) */
	__u32 touch_bits;	/* in, COWD_REOPEN_TOUCH (else 0) */
	__u64 reserved[1];
};

#define COWD_CTL_VERSION	_IOWR('C', 0x00, struct cowd_version)
#define COWD_CTL_CREATE		_IOWR('C', 0x01, struct cowd_create)
#define COWD_CTL_REMOVE		_IOWR('C', 0x02, struct cowd_remove)
#define COWD_CTL_REOPEN		_IOWR('C', 0x03, struct cowd_reopen)

/* ---- the channel ---------------------------------------------------------------------- */

/* cowd_miss.op: what the kernel needs.  READ and WRITE want remaps covering the range (a WRITE
 * wants writable ones); DISCARD, WRITE_ZEROES and FLUSH are done by the daemon. */
#define COWD_OP_READ		0
#define COWD_OP_WRITE		1
#define COWD_OP_FLUSH		2
#define COWD_OP_DISCARD		3
#define COWD_OP_WRITE_ZEROES	4

/* Message types (cowd_msg_hdr.type). */
#define COWD_MSG_MISS		1	/* kernel -> daemon */
#define COWD_MSG_REMAP		2	/* daemon -> kernel */
#define COWD_MSG_INVALIDATE	3	/* daemon -> kernel */
#define COWD_MSG_REPLY		4	/* daemon -> kernel */
#define COWD_MSG_GRANT		5	/* daemon -> kernel, v2 */
#define COWD_MSG_ALLOC		6	/* kernel -> daemon, v2 */
#define COWD_MSG_ACK		7	/* daemon -> kernel, v2 */
#define COWD_MSG_REVOKE		8	/* daemon -> kernel, v2 */
#define COWD_MSG_REVOKED	9	/* kernel -> daemon, v2 */
#define COWD_MSG_TOUCH		10	/* kernel -> daemon, v2 (COWD_FEAT_TOUCH) */
#define COWD_MSG_TOUCH_STOP	11	/* daemon -> kernel, v2 (COWD_FEAT_TOUCH) */

struct cowd_msg_hdr {
	__u32 size;		/* bytes of the whole message, payload included */
	__u16 type;		/* COWD_MSG_* */
	__u16 version;		/* the channel's version */
};

/* cowd_miss.flags */
#define COWD_MISS_FUA		(1U << 0)	/* (reserved for FUA writes; not sent by v1) */

struct cowd_miss {
	struct cowd_msg_hdr hdr;
	__u64 cookie;		/* echo it in the REPLY */
	__u32 op;		/* COWD_OP_* */
	__u32 flags;		/* COWD_MISS_* */
	__u64 offset;		/* guest bytes */
	__u64 length;		/* guest bytes (0 for FLUSH) */
};

/* cowd_remap.flags */
#define COWD_REMAP_WRITABLE	(1U << 0)	/* writes go to the file in place */
#define COWD_REMAP_ZERO		(1U << 1)	/* reads as zeroes; file and file_offset are 0 */
#define COWD_REMAP_FLAGS	(COWD_REMAP_WRITABLE | COWD_REMAP_ZERO)

/* One run of whole clusters, contiguous in one file: cluster i of the run lives at
 * file_offset + i * cluster size.  Replaces whatever the table held for those clusters. */
struct cowd_remap {
	struct cowd_msg_hdr hdr;
	__u32 file;		/* index into cowd_create.fds */
	__u32 flags;		/* COWD_REMAP_* */
	__u64 guest_offset;	/* cluster aligned */
	__u64 length;		/* a multiple of the cluster size */
	__u64 file_offset;	/* logical-block aligned */
};

/* Forget the remaps of every cluster touching [guest_offset, guest_offset + length). */
struct cowd_invalidate {
	struct cowd_msg_hdr hdr;
	__u32 reserved0;
	__u32 reserved1;
	__u64 guest_offset;
	__u64 length;
};

/* cowd_reply.result, when not a negative errno */
#define COWD_REPLY_DONE		0	/* the daemon did it: complete the request */
#define COWD_REPLY_RETRY	1	/* remaps were sent: look up again */
#define COWD_REPLY_DATA		2	/* READ only: the payload is the request's bytes */

struct cowd_reply {
	struct cowd_msg_hdr hdr;	/* size = sizeof(struct cowd_reply) + payload bytes */
	__u64 cookie;
	__s32 result;		/* COWD_REPLY_* or -errno */
	__u32 reserved0;
	/* COWD_REPLY_DATA: exactly the miss's length bytes follow */
};

/* ---- the allocation pool (v2) ------------------------------------------------------- */

/* Add one run of whole clusters of a COWD_FILE_WRITABLE file to the pool: cluster i of the
 * run is at file_offset + i * cluster size.  The daemon has reserved them (nothing else will
 * write them) and made that durable; the kernel writes each at most once, whole. */
struct cowd_grant {
	struct cowd_msg_hdr hdr;
	__u32 file;		/* index into cowd_create.fds */
	__u32 flags;		/* none defined: 0 */
	__u64 file_offset;	/* logical-block aligned */
	__u64 length;		/* a multiple of the cluster size */
};

/* Guest clusters [guest_offset, +length) now live at file_offset onwards of the file, one
 * after another: written whole (copy-up and data) before this message was queued. */
struct cowd_alloc {
	struct cowd_msg_hdr hdr;
	__u64 seq;		/* 1, 2, ... per device, never reused; ACK names it */
	__u32 file;
	__u32 pool_left;	/* clusters left in the pool when this was queued */
	__u64 guest_offset;	/* cluster aligned */
	__u64 length;		/* whole clusters */
	__u64 file_offset;
};

/* Every ALLOC up to seq is in the daemon's metadata (its next flush makes it durable). */
struct cowd_ack {
	struct cowd_msg_hdr hdr;
	__u64 seq;
	__u64 reserved0;
};

/* Empty the pool; the write() returns once no allocation is under way, and a REVOKED with
 * the same cookie follows every ALLOC queued before it. */
struct cowd_revoke {
	struct cowd_msg_hdr hdr;
	__u64 cookie;
	__u64 reserved0;
};

struct cowd_revoked {
	struct cowd_msg_hdr hdr;
	__u64 cookie;		/* the REVOKE's */
	__u64 dropped;		/* clusters the pool held, dropped unwritten */
	__u64 seq;		/* the last ALLOC queued before this */
};

/* ---- boot-trace recording (v2, COWD_FEAT_TOUCH) --------------------------------------- */

/* The first mapped read of one granule of the traced file. */
struct cowd_touch_rec {
	__u64 t_ns;		/* CLOCK_MONOTONIC (the daemon's time.monotonic_ns) of the read */
	__u64 file_offset;	/* in the traced file: where the read's bytes in the granule begin */
	__u32 length;		/* those bytes (at most the granule) */
	__u32 reserved0;
};

/* cowd_touch.flags */
#define COWD_TOUCH_END		(1U << 0)	/* recording stopped at COWD_MAX_TOUCHES */

struct cowd_touch {
	struct cowd_msg_hdr hdr;	/* size = sizeof(struct cowd_touch) + count records */
	__u32 count;		/* records that follow, in first-touch order (at least 1, unless END) */
	__u32 flags;		/* COWD_TOUCH_* */
	__u64 deferred;		/* first reads left unrecorded since the last TOUCH (the queue
				 * was full): their granules are recorded at their next read */
	/* struct cowd_touch_rec records[count]; */
};

/* Stop recording and drop the records not yet read (the daemon's trace is full or saved). */
struct cowd_touch_stop {
	struct cowd_msg_hdr hdr;
	__u64 reserved0;
};

struct cowd_stats {
	__u32 size;		/* in: sizeof(struct cowd_stats) */
	__u32 version;		/* in: the caller's version (v1: the v2 counters read as 0) */
	__u64 hits;		/* clusters served from the table */
	__u64 misses;		/* miss messages queued for the daemon */
	__u64 coalesced;	/* requests that waited on another request's miss */
	__u64 retries;		/* requests looked up again after a RETRY */
	__u64 expiries;		/* entries evicted by the LRU bound */
	__u64 pushes;		/* cluster entries installed by REMAP */
	__u64 invalidations;	/* cluster entries dropped by INVALIDATE */
	__u64 entries;		/* in the table now */
	__u64 max_entries;
	__u64 data_replies;
	__u64 mapped_read_bytes;
	__u64 mapped_write_bytes;
	__u64 errors;		/* requests completed with an error */
	__u64 pending;		/* misses not yet answered */
	__u64 takeovers;
	__u64 pool_clusters;	/* v2: in the pool now */
	__u64 pool_grants;	/* v2: GRANT messages applied */
	__u64 pool_allocs;	/* v2: clusters allocated from the pool */
	__u64 pool_fallbacks;	/* v2: writes that needed clusters the pool could not give */
	__u64 alloc_msgs;	/* v2: ALLOC messages queued */
	__u64 unacked;		/* v2: allocated clusters not yet acknowledged (pinned) */
	__u64 held;		/* v2: FLUSH/DISCARD/WRITE_ZEROES held for an ACK */
	__u64 reserved[1];
};

#define COWD_CHAN_STATS		_IOWR('C', 0x10, struct cowd_stats)

#endif /* _UAPI_LINUX_COWD_H */
