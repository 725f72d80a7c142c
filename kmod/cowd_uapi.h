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
 *   channel fd      one per device, returned by CREATE and REOPEN.  read() returns miss
 *                   messages (struct cowd_miss, whole messages only); write() takes a sequence
 *                   of daemon messages (REMAP, INVALIDATE, REPLY), applied in order; poll()
 *                   says POLLIN when misses wait.  An ioctl reads the device's counters.
 *
 * Rules for every struct here: it starts with its own size (and a version where it is an ioctl
 * argument), reserved fields must be zero, unknown flag bits are rejected with EINVAL.  The
 * daemon's Python mirror (cowd/frontends/kmod/abi.py) is checked against this header by a test.
 *
 * The remap table maps a guest cluster (guest_offset >> cluster_bits) to a place in one of the
 * files: (file index, file offset), readable or also writable, or ZERO (reads as zeroes; a
 * write to it is a miss).  Mapped reads and writes are done by the kernel with file I/O on the
 * fds; everything else is a miss that the daemon answers.
 */
#ifndef _UAPI_LINUX_COWD_H
#define _UAPI_LINUX_COWD_H

#include <linux/types.h>
#include <linux/ioctl.h>

#define COWD_ABI_VERSION	1

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

/* Features reported by COWD_CTL_VERSION. */
#define COWD_FEAT_TAKEOVER	(1ULL << 0)	/* COWD_CTL_REOPEN */
#define COWD_FEAT_DATA_REPLY	(1ULL << 1)	/* COWD_REPLY_DATA */
#define COWD_FEAT_DISCARD	(1ULL << 2)	/* DISCARD and WRITE_ZEROES misses */
#define COWD_FEATURES		(COWD_FEAT_TAKEOVER | COWD_FEAT_DATA_REPLY | COWD_FEAT_DISCARD)

struct cowd_version {
	__u32 size;		/* in: sizeof(struct cowd_version) */
	__u32 version;		/* in: COWD_ABI_VERSION */
	__u32 abi_version;	/* out */
	__u32 reserved0;
	__u64 features;		/* out: COWD_FEAT_* */
	char module_version[32];	/* out: NUL-terminated */
	__u64 reserved[4];
};

/* cowd_create.flags */
#define COWD_CREATE_READONLY	(1ULL << 0)	/* the block device is read-only */
#define COWD_CREATE_FLAGS	(COWD_CREATE_READONLY)

/* cowd_create.file_flags[i] */
#define COWD_FILE_WRITABLE	(1U << 0)	/* remaps into this file may be writable */
#define COWD_FILE_FLAGS		(COWD_FILE_WRITABLE)

struct cowd_create {
	__u32 size;		/* in: sizeof(struct cowd_create) */
	__u32 version;		/* in: COWD_ABI_VERSION */
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
	__u64 reserved[4];
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

/*
 * Takeover: a new daemon asks for the channel of a device whose daemon has gone (its channel
 * is closed).  The kernel first forgets every remap (the old daemon's unflushed allocations
 * may not exist in the image) and waits for mapped I/O in flight; misses that waited are sent
 * again on the new channel.
 */
struct cowd_reopen {
	__u32 size;
	__u32 version;
	__u32 index;		/* in */
	__u32 flags;		/* in: none defined, must be 0 */
	__s32 channel_fd;	/* out */
	__u32 reserved0;
	__u64 disk_size;	/* out: so the daemon can check it opened the same disk */
	__u32 cluster_bits;	/* out */
	__u32 nr_files;		/* out */
	__u64 reserved[2];
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

struct cowd_msg_hdr {
	__u32 size;		/* bytes of the whole message, payload included */
	__u16 type;		/* COWD_MSG_* */
	__u16 version;		/* COWD_ABI_VERSION */
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

struct cowd_stats {
	__u32 size;		/* in: sizeof(struct cowd_stats) */
	__u32 version;		/* in: COWD_ABI_VERSION */
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
	__u64 reserved[8];
};

#define COWD_CHAN_STATS		_IOWR('C', 0x10, struct cowd_stats)

#endif /* _UAPI_LINUX_COWD_H */
