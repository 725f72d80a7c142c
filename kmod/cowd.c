// SPDX-License-Identifier: GPL-2.0-only
/*
 * cowd: copy-on-write block devices whose mapped I/O stays in the kernel.
 *
 * Theory of operation
 * -------------------
 * A cowd device is a blk-mq disk (/dev/cowdN) over a chain of image files the daemon opened
 * and passed in as fds.  The device keeps a remap table: guest cluster -> (file, file
 * offset, writable) or ZERO.  A request is cut at cluster boundaries into pieces; if every
 * piece has a usable entry (a WRITE needs writable ones), a worker does the I/O with
 * vfs_iter_read/vfs_iter_write on the files (as loop.c does, with no loop device under it)
 * and completes the request.  Otherwise the request becomes a miss: a message the daemon
 * reads from the device's channel fd.  The daemon answers with REMAP messages (then a REPLY
 * RETRY: look up again), the data itself (REPLY DATA, for a compressed cluster), DONE (for
 * FLUSH, DISCARD, WRITE_ZEROES, which the daemon performs), or an errno.  A request whose
 * range overlaps a miss already outstanding waits on that miss instead of sending another.
 *
 * If the channel closes (the daemon died), misses wait daemon_timeout_ms for a new daemon to
 * take the device over (COWD_CTL_REOPEN), then fail with EIO; the device can always be
 * removed.  A takeover first empties the table and waits for mapped I/O in flight: the old
 * daemon's unflushed allocations may not exist in the image the new daemon reads.
 *
 * The allocation pool (ABI v2, cowd_uapi.h)
 * -----------------------------------------
 * A v2 daemon GRANTs runs of clusters it reserved in a writable file.  A write that finds
 * every cluster's entry but some read-only or ZERO takes one pool cluster for each of those
 * (all or none), copies each one's unwritten head and tail up from its old entry (or writes
 * zeroes), writes the request's data as a mapped write and completes; only then are the new
 * entries installed, writable and pinned, and an ALLOC event queued for the daemon (seq
 * numbered).  While a request allocates, other writes touching its clusters wait for it
 * (reads go on reading the old entries, which stay right until the install).  Pinned entries
 * live on dev->pinned instead of the LRU list: no eviction, REMAP or INVALIDATE touches them
 * until the daemon ACKs their seq (it has recorded them: a REMAP it made before that may be
 * stale; one made after is not).  FLUSH, DISCARD and WRITE_ZEROES issued after an ALLOC wait
 * on dev->held until it is acknowledged, so the daemon's answer covers those allocations.
 *
 * Boot-trace recording (ABI v2, COWD_FEAT_TOUCH)
 * -----------------------------------------------
 * A daemon that asks names one file (its base) and a granule size; a mapped READ hit then sets
 * the bit of every granule of that file it reads (a bitmap over the file, not over the guest:
 * the daemon's trace is of the base file's granules, one guest cluster may straddle two of them
 * and two clusters may share one).  A bit newly set queues a record on dev->touch's ring, under
 * the dev->lock the lookup already holds: the hot path of a read that touches nothing new is a
 * bit test per piece.  read() hands the records out in TOUCH messages; the reader is woken only
 * when the ring goes from empty to not (or recording ends), so a burst of first reads costs one
 * wake-up and arrives in one batch.  A full ring clears the bit again instead of waiting.
 *
 * Locking
 * -------
 * cowd_ctl_mutex guards the index idr.  dev->lock (a spinlock, process context only) guards
 * the table, the LRU and pinned lists, the miss lists, the pool, the event queue, the state,
 * chan_open and the counters.  File I/O never runs under it; mapped I/O is counted per epoch when it looks the table up, and an
 * invalidation (INVALIDATE, a takeover) waits for the I/O of the epochs before it: after it,
 * nothing uses a dropped entry, so the daemon may free or reuse those clusters.  Requests are completed only by their worker, by a REPLY (in write()), or
 * by a failure sweep that first took them off every list under dev->lock.
 */
#include <linux/anon_inodes.h>
#include <linux/blk-mq.h>
#include <linux/blkdev.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/hash.h>
#include <linux/highmem.h>
#include <linux/idr.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/poll.h>
#include <linux/sched/mm.h>
#include <linux/slab.h>
#include <linux/uio.h>
#include <linux/workqueue.h>

#include "cowd_uapi.h"

#define COWD_MODULE_VERSION	"0.3.0"
#define COWD_PART_SHIFT		4	/* 15 partitions per disk */
#define COWD_DEFAULT_ENTRIES	(1U << 18)
#define COWD_DEFAULT_DEPTH	128
#define COWD_DEFAULT_TIMEOUT_MS	30000
#define COWD_MAX_PIECES		64	/* clusters per request; bounds max_hw_sectors */
#define COWD_MAX_RETRIES	16	/* RETRY replies that still leave a miss: then EIO */
#define COWD_READ_BATCH		256	/* misses returned by one read() */
#define COWD_MAX_QUEUES		4	/* worker queues per device (bounded by online CPUs) */
#define COWD_TOUCH_BATCH	256	/* TOUCH records returned by one read() */

/* Internal flag bits beside COWD_REMAP_* (never seen by the daemon). */
#define COWD_ENTRY_PINNED	(1U << 31)	/* cowd_entry: allocated here, not yet ACKed */
#define COWD_PIECE_ALLOC	(1U << 30)	/* cowd_piece.src_flags: take a pool cluster */

enum cowd_state {
	COWD_LIVE,	/* a daemon holds the channel */
	COWD_ORPHAN,	/* channel closed; misses wait for a takeover until the timeout */
	COWD_DEAD,	/* no daemon and the timeout passed: misses fail with EIO */
	COWD_REMOVED,
};

struct cowd_entry {
	struct hlist_node hash;
	struct list_head lru;	/* on dev->lru, or on dev->pinned while pinned */
	u64 cluster;
	u64 file_offset;
	u32 file;
	u32 flags;	/* COWD_REMAP_*, COWD_ENTRY_PINNED */
	u64 pin_seq;	/* pinned: the ALLOC that reported it */
};

struct cowd_piece {
	u64 file_offset;
	u32 file;
	u32 flags;	/* COWD_REMAP_* */
	/* an allocating write: where the cluster's other bytes come from (its old entry) */
	u64 src_offset;
	u32 src_file;
	u32 src_flags;	/* COWD_PIECE_ALLOC, COWD_REMAP_ZERO */
};

/* A run of pool clusters (dev->lock). */
struct cowd_run {
	struct list_head node;
	u64 file_offset;
	u64 count;
	u32 file;
};

/* A kernel -> daemon message waiting on dev->events (dev->lock). */
struct cowd_event {
	struct list_head node;
	u16 type;		/* COWD_MSG_ALLOC or COWD_MSG_REVOKED */
	u32 file, pool_left;	/* ALLOC */
	u64 seq;		/* ALLOC: its seq; REVOKED: the last ALLOC's */
	u64 guest_offset, length, file_offset;	/* ALLOC */
	u64 cookie, dropped;	/* REVOKED */
};

/*
 * Boot-trace recording (COWD_FEAT_TOUCH), all of it under dev->lock.  map: a bit per
 * granule of file @file set at its first mapped read; ring: the records not yet read
 * (@count from @head).  @on while recording; @end once COWD_MAX_TOUCHES records were queued,
 * until the TOUCH that says so is read.  map and ring are freed outside the lock by whoever
 * swaps the whole state out (cowd_swap_touches).
 */
struct cowd_touches {
	bool on, end;
	u32 file, bits;
	u64 granules;			/* bits in map */
	unsigned long *map;
	struct cowd_touch_rec *ring;	/* COWD_TOUCH_QUEUE records */
	u32 head, count, total;
	u64 deferred;			/* first reads not queued (ring full) since the last TOUCH */
};

struct cowd_dev;

struct cowd_cmd {
	struct work_struct work;	/* a retry after a miss runs as its own work item */
	struct list_head qnode;		/* on a cowd_queue while new (cowd_queue.lock) */
	struct cowd_dev *dev;
	/* own miss, on dev->unsent or dev->sent while outstanding (dev->lock) */
	struct list_head miss_node;
	struct list_head waiters;	/* cmds waiting on this cmd's miss (dev->lock) */
	struct list_head wait_node;	/* on another cmd's waiters list (dev->lock) */
	u64 cookie;
	u64 offset, length;
	u32 op;
	u64 flush_gen;			/* FLUSH: dev->write_gen when it was issued */
	u64 hold_seq;			/* FLUSH, DISCARD, WRITE_ZEROES: dev->alloc_seq then */
	u64 alloc_epoch;		/* allocating: dev->pool_epoch when it took clusters */
	bool outstanding;		/* own miss queued or sent (dev->lock) */
	bool waiting;			/* on another miss's waiters (dev->lock) */
	/*
	 * A RETRY reply looks the request up at once, right after the remaps that came with it:
	 * pieces[0..npieces) are then ready for the retry (dev->lock), unless an invalidation
	 * came in between (ready_gen != dev->inval_gen).  Remaps that other misses push before
	 * the retry runs cannot evict its clusters, so a retry always makes progress.
	 */
	bool ready;
	unsigned int npieces;
	u64 ready_gen;
	int retries;
	struct cowd_piece pieces[];
};

/*
 * New requests go to one of a few queues, each drained by one work item: a worker wakes once
 * for a batch of requests, as loop.c's does, instead of once per request.
 */
struct cowd_queue {
	spinlock_t lock;
	struct list_head cmds;		/* (lock) */
	struct work_struct work;
	struct cowd_dev *dev;
};

struct cowd_dev {
	struct kref ref;
	int index;
	u64 size;
	u32 cluster_bits;
	u32 lbs;
	bool readonly;
	u32 nr_files;
	struct file *files[COWD_MAX_FILES];
	u32 file_flags[COWD_MAX_FILES];
	u32 timeout_ms;

	struct blk_mq_tag_set tag_set;
	struct gendisk *disk;
	struct workqueue_struct *wq;
	struct cowd_queue queues[COWD_MAX_QUEUES];
	unsigned int nr_queues;
	struct delayed_work timeout_work;

	spinlock_t lock;
	enum cowd_state state;		/* dev->lock */
	bool chan_open;			/* dev->lock */
	struct list_head unsent;	/* cmds whose miss the daemon has not read (dev->lock) */
	struct list_head sent;		/* cmds whose miss awaits a REPLY (dev->lock) */
	u64 next_cookie;		/* dev->lock */
	wait_queue_head_t chan_wait;	/* readers of the channel */

	struct hlist_head *buckets;	/* the remap table (dev->lock) */
	u32 hash_bits;
	struct list_head lru;		/* least recently used first (dev->lock) */
	u32 nr_entries, max_entries;	/* dev->lock */
	u64 inval_gen;			/* INVALIDATEs and takeovers so far (dev->lock) */

	/*
	 * Durability across a takeover (dev->lock): write_gen counts completed writes (mapped
	 * writes, discards, write-zeroes), flushed_gen the last write_gen a FLUSH made durable.
	 * A takeover with write_gen > flushed_gen may have lost writes (their clusters' metadata
	 * died with the old daemon), so the next FLUSH fails with EIO instead of claiming them.
	 */
	u64 write_gen, flushed_gen;
	bool lost_writes;

	/*
	 * Mapped I/O under way, counted in the epoch (dev->epoch & 1, dev->lock) in which it
	 * looked the table up.  cowd_drain_mapped() starts a new epoch and waits for the old one's
	 * count to reach zero; drain_mutex serializes drains.
	 */
	atomic_t inflight[2];
	unsigned int epoch;
	struct mutex drain_mutex;
	wait_queue_head_t inflight_wait;

	/*
	 * The allocation pool (v2, dev->lock).  chan_version is the ABI version the channel
	 * speaks (set by CREATE and REOPEN, while no channel is open).  pool_epoch changes at a
	 * takeover: an allocation that took clusters before it installs nothing.  alloc_seq is
	 * the last ALLOC queued, acked_seq the last one the daemon acknowledged.
	 */
	u32 chan_version;
	struct list_head pool;		/* struct cowd_run, in grant order */
	u32 pool_runs;
	u64 pool_clusters;
	u64 pool_epoch;
	struct list_head events;	/* struct cowd_event, oldest first */
	u64 alloc_seq, acked_seq;
	struct list_head pinned;	/* pinned entries by pin_seq */
	u32 nr_pinned;
	struct list_head held;		/* cmds (miss_node) waiting for acked_seq >= hold_seq */
	struct list_head allocating;	/* cmds (miss_node) allocating from the pool now */

	struct cowd_touches touch;	/* boot-trace recording (dev->lock) */

	struct cowd_stats stats;	/* counters (dev->lock), except the two below */
	atomic64_t mapped_read_bytes, mapped_write_bytes;
};

static unsigned int queues;
module_param(queues, uint, 0644);
MODULE_PARM_DESC(queues, "worker queues per new device (0, the default: one per online CPU, "
		 "at most " __stringify(COWD_MAX_QUEUES) ")");

static DEFINE_IDR(cowd_idr);
static DEFINE_MUTEX(cowd_ctl_mutex);
static int cowd_major;
static struct kmem_cache *cowd_entry_cache;
static const struct file_operations cowd_chan_fops;

/* ---- the remap table ----------------------------------------------------------------- */

static struct hlist_head *cowd_bucket(struct cowd_dev *dev, u64 cluster)
{
	return &dev->buckets[hash_64(cluster, dev->hash_bits)];
}

static struct cowd_entry *cowd_find(struct cowd_dev *dev, u64 cluster)
{
	struct cowd_entry *e;

	lockdep_assert_held(&dev->lock);
	hlist_for_each_entry(e, cowd_bucket(dev, cluster), hash)
		if (e->cluster == cluster)
			return e;
	return NULL;
}

static void cowd_drop(struct cowd_dev *dev, struct cowd_entry *e, struct list_head *freed)
{
	lockdep_assert_held(&dev->lock);
	hlist_del(&e->hash);
	list_move(&e->lru, freed);
	dev->nr_entries--;
}

static void cowd_free_list(struct list_head *freed)
{
	struct cowd_entry *e, *n;

	list_for_each_entry_safe(e, n, freed, lru)
		kmem_cache_free(cowd_entry_cache, e);
}

/*
 * The entry for @cluster, made if there is none: from @spare (preallocated entries), or a
 * full table's least recently used one.  Pinned entries are never on the LRU list, and at
 * most half the table is pinned (cowd_pool_fits), so a full table always has one to reuse.
 */
static struct cowd_entry *cowd_get_entry(struct cowd_dev *dev, u64 cluster,
					 struct list_head *spare)
{
	struct cowd_entry *e;

	lockdep_assert_held(&dev->lock);
	e = cowd_find(dev, cluster);
	if (e)
		return e;
	if (dev->nr_entries >= dev->max_entries) {
		e = list_first_entry(&dev->lru, struct cowd_entry, lru);
		hlist_del(&e->hash);
		dev->nr_entries--;
		dev->stats.expiries++;
	} else {
		e = list_first_entry(spare, struct cowd_entry, lru);
		list_del_init(&e->lru);
	}
	e->cluster = cluster;
	e->flags = 0;
	hlist_add_head(&e->hash, cowd_bucket(dev, cluster));
	dev->nr_entries++;
	return e;
}

/* Install one cluster's remap from the daemon; a pinned entry is newer than it and stays. */
static void cowd_install(struct cowd_dev *dev, u64 cluster, u32 file, u64 file_offset,
			 u32 flags, struct list_head *spare)
{
	struct cowd_entry *e = cowd_get_entry(dev, cluster, spare);

	if (e->flags & COWD_ENTRY_PINNED)
		return;
	list_move_tail(&e->lru, &dev->lru);
	e->file = file;
	e->file_offset = file_offset;
	e->flags = flags;
	dev->stats.pushes++;
}

#define COWD_INSTALL_BATCH	64

static int cowd_apply_remap(struct cowd_dev *dev, const struct cowd_remap *m)
{
	u64 csize = 1ULL << dev->cluster_bits;
	u64 first, count, done = 0;
	LIST_HEAD(spare);
	int i, err = 0;

	if (m->flags & ~COWD_REMAP_FLAGS)
		return -EINVAL;
	if ((m->flags & COWD_REMAP_ZERO) &&
	    (m->flags & COWD_REMAP_WRITABLE || m->file || m->file_offset))
		return -EINVAL;
	if (!(m->flags & COWD_REMAP_ZERO)) {
		if (m->file >= dev->nr_files)
			return -EINVAL;
		if ((m->flags & COWD_REMAP_WRITABLE) &&
		    !(dev->file_flags[m->file] & COWD_FILE_WRITABLE))
			return -EPERM;
		if (m->file_offset & (SECTOR_SIZE - 1) || m->file_offset > LLONG_MAX - m->length)
			return -EINVAL;
	}
	if (!m->length || (m->guest_offset | m->length) & (csize - 1) ||
	    m->guest_offset > round_up(dev->size, csize) ||
	    m->length > round_up(dev->size, csize) - m->guest_offset)
		return -EINVAL;
	first = m->guest_offset >> dev->cluster_bits;
	count = m->length >> dev->cluster_bits;
	while (done < count) {
		u64 n = min_t(u64, count - done, COWD_INSTALL_BATCH);

		for (i = 0; i < n; i++) {
			struct cowd_entry *e = kmem_cache_alloc(cowd_entry_cache, GFP_KERNEL);

			if (!e) {
				err = -ENOMEM;
				goto out;
			}
			list_add(&e->lru, &spare);
		}
		spin_lock(&dev->lock);
		if (dev->state == COWD_REMOVED) {
			spin_unlock(&dev->lock);
			err = -ENODEV;
			goto out;
		}
		for (i = 0; i < n; i++) {
			u64 c = done + i;
			u64 fo = (m->flags & COWD_REMAP_ZERO) ? 0 : m->file_offset + (c << dev->cluster_bits);

			cowd_install(dev, first + c, m->file, fo, m->flags, &spare);
		}
		spin_unlock(&dev->lock);
		done += n;
		cond_resched();
	}
out:
	cowd_free_list(&spare);
	return err;
}

/*
 * Forget every entry of clusters [first, end) but the pinned ones (the daemon does not know
 * those clusters yet, so it cannot mean them; a takeover unpins everything first).
 */
static void cowd_invalidate_range(struct cowd_dev *dev, u64 first, u64 end)
{
	struct cowd_entry *e, *n;
	LIST_HEAD(freed);
	u64 c;

	spin_lock(&dev->lock);
	dev->inval_gen++;
	if (end - first > dev->nr_entries) {
		list_for_each_entry_safe(e, n, &dev->lru, lru) {
			if (e->cluster >= first && e->cluster < end) {
				cowd_drop(dev, e, &freed);
				dev->stats.invalidations++;
			}
		}
	} else {
		for (c = first; c < end; c++) {
			e = cowd_find(dev, c);
			if (e && !(e->flags & COWD_ENTRY_PINNED)) {
				cowd_drop(dev, e, &freed);
				dev->stats.invalidations++;
			}
		}
	}
	spin_unlock(&dev->lock);
	cowd_free_list(&freed);
}

/* Wait until mapped I/O that looked the table up before now has finished. */
static void cowd_drain_mapped(struct cowd_dev *dev)
{
	unsigned int old;

	mutex_lock(&dev->drain_mutex);
	spin_lock(&dev->lock);
	old = dev->epoch & 1;
	dev->epoch++;
	spin_unlock(&dev->lock);
	wait_event(dev->inflight_wait, !atomic_read(&dev->inflight[old]));
	mutex_unlock(&dev->drain_mutex);
}

/*
 * Dropping entries is not enough before the daemon frees their clusters (a discard): mapped
 * I/O that looked them up may still be under way.  So an INVALIDATE returns (and the
 * daemon's write() with it) only when that I/O has finished.
 */
static int cowd_apply_invalidate(struct cowd_dev *dev, const struct cowd_invalidate *m)
{
	u64 end;

	if (m->reserved0 || m->reserved1 || !m->length || m->guest_offset >= dev->size ||
	    m->length > dev->size - m->guest_offset)
		return -EINVAL;
	end = round_up(m->guest_offset + m->length, 1ULL << dev->cluster_bits);
	cowd_invalidate_range(dev, m->guest_offset >> dev->cluster_bits,
			      end >> dev->cluster_bits);
	cowd_drain_mapped(dev);
	return 0;
}

/* ---- requests ------------------------------------------------------------------------ */

static void cowd_end(struct cowd_cmd *cmd, blk_status_t status)
{
	struct request *rq = blk_mq_rq_from_pdu(cmd);

	if (status != BLK_STS_OK) {
		spin_lock(&cmd->dev->lock);
		cmd->dev->stats.errors++;
		spin_unlock(&cmd->dev->lock);
	}
	blk_mq_end_request(rq, status);
}

/* Take @cmd's miss and its waiters off every list; returns the waiters on @waiters. */
static void cowd_unlink_miss(struct cowd_cmd *cmd, struct list_head *waiters)
{
	struct cowd_cmd *w;

	lockdep_assert_held(&cmd->dev->lock);
	list_del_init(&cmd->miss_node);
	cmd->outstanding = false;
	list_for_each_entry(w, &cmd->waiters, wait_node)
		w->waiting = false;
	list_splice_init(&cmd->waiters, waiters);
	cmd->dev->stats.pending--;
}

static void cowd_requeue(struct cowd_dev *dev, struct list_head *waiters)
{
	struct cowd_cmd *w, *n;

	list_for_each_entry_safe(w, n, waiters, wait_node) {
		list_del_init(&w->wait_node);
		queue_work(dev->wq, &w->work);
	}
}

static void cowd_fail_all(struct cowd_dev *dev, struct list_head *owners)
{
	struct cowd_cmd *c, *n, *w, *wn;

	list_for_each_entry_safe(c, n, owners, miss_node) {
		list_del_init(&c->miss_node);
		list_for_each_entry_safe(w, wn, &c->waiters, wait_node) {
			list_del_init(&w->wait_node);
			cowd_end(w, BLK_STS_IOERR);
		}
		cowd_end(c, BLK_STS_IOERR);
	}
}

/* Under dev->lock, detach every outstanding miss (with its waiters) onto @owners. */
static void cowd_take_all(struct cowd_dev *dev, struct list_head *owners)
{
	struct cowd_cmd *c;

	lockdep_assert_held(&dev->lock);
	list_splice_init(&dev->sent, owners);
	list_splice_init(&dev->unsent, owners);
	list_splice_init(&dev->held, owners);
	list_for_each_entry(c, owners, miss_node) {
		struct cowd_cmd *w;

		c->outstanding = false;
		list_for_each_entry(w, &c->waiters, wait_node)
			w->waiting = false;
		dev->stats.pending--;
	}
}

/*
 * The outstanding miss, or (for a write) the allocation under way, that a new @op request on
 * [off, off + len) must wait for.  Two writes conflict when they touch one cluster: each may
 * allocate it whole (the daemon for a WRITE miss, the kernel from its pool).
 */
static struct cowd_cmd *cowd_overlapping_miss(struct cowd_dev *dev, u32 op, u64 off, u64 len)
{
	struct list_head *lists[] = { &dev->unsent, &dev->sent, &dev->allocating };
	u64 csize = 1ULL << dev->cluster_bits;
	struct cowd_cmd *c;
	int i;

	lockdep_assert_held(&dev->lock);
	for (i = 0; i < ARRAY_SIZE(lists); i++) {
		if (lists[i] == &dev->allocating && op != COWD_OP_WRITE)
			break;
		list_for_each_entry(c, lists[i], miss_node) {
			u64 a = off, b = off + len, ca = c->offset, cb = c->offset + c->length;

			if (c->op != COWD_OP_WRITE && !(c->op == op && op == COWD_OP_READ))
				continue;
			if (op == COWD_OP_WRITE) {
				a = round_down(a, csize);
				b = round_up(b, csize);
				ca = round_down(ca, csize);
				cb = round_up(cb, csize);
			}
			if (ca < b && a < cb)
				return c;
		}
	}
	return NULL;
}

static void cowd_queue_miss(struct cowd_dev *dev, struct cowd_cmd *cmd)
{
	lockdep_assert_held(&dev->lock);
	cmd->cookie = dev->next_cookie++;
	cmd->outstanding = true;
	list_add_tail(&cmd->miss_node, &dev->unsent);
	dev->stats.misses++;
	dev->stats.pending++;
}

/*
 * FLUSH, DISCARD and WRITE_ZEROES are the daemon's to do; one issued after an ALLOC that the
 * daemon has not acknowledged waits for that ACK (cowd_apply_ack sends it on), so that the
 * daemon has recorded every allocation the request must cover or follow.
 */
static void cowd_queue_daemon_op(struct cowd_dev *dev, struct cowd_cmd *cmd)
{
	lockdep_assert_held(&dev->lock);
	cmd->hold_seq = dev->alloc_seq;
	if (cmd->hold_seq <= dev->acked_seq) {
		cowd_queue_miss(dev, cmd);
		return;
	}
	cmd->cookie = dev->next_cookie++;
	cmd->outstanding = true;
	list_add_tail(&cmd->miss_node, &dev->held);
	dev->stats.misses++;
	dev->stats.pending++;
	dev->stats.held++;
}

/* Copy the request's bytes between its pages and the files, piece by piece. */
static blk_status_t cowd_do_io(struct cowd_dev *dev, struct cowd_cmd *cmd, bool write,
			       unsigned int npieces)
{
	struct request *rq = blk_mq_rq_from_pdu(cmd);
	u64 csize = 1ULL << dev->cluster_bits;
	u64 pos = blk_rq_pos(rq) << SECTOR_SHIFT;
	struct req_iterator rq_iter;
	struct bio_vec tmp, *bvec;
	struct iov_iter iter;
	unsigned int nr_bvec = 0, i = 0, p;
	blk_status_t status = BLK_STS_OK;

	if (rq->bio == rq->biotail) {
		/* One bio: iterate its own vector, no copy (as loop.c does). */
		struct bio *bio = rq->bio;

		bvec = NULL;
		iov_iter_bvec(&iter, write ? ITER_SOURCE : ITER_DEST,
			      __bvec_iter_bvec(bio->bi_io_vec, bio->bi_iter),
			      bio_segments(bio), blk_rq_bytes(rq));
		iter.iov_offset = bio->bi_iter.bi_bvec_done;
	} else {
		rq_for_each_bvec(tmp, rq, rq_iter)
			nr_bvec++;
		bvec = kmalloc_array(nr_bvec, sizeof(*bvec), GFP_NOIO);
		if (!bvec)
			return BLK_STS_RESOURCE;
		rq_for_each_bvec(tmp, rq, rq_iter)
			bvec[i++] = tmp;
		iov_iter_bvec(&iter, write ? ITER_SOURCE : ITER_DEST, bvec, nr_bvec,
			      blk_rq_bytes(rq));
	}

	for (p = 0; p < npieces && iov_iter_count(&iter);) {
		struct cowd_piece *pc = &cmd->pieces[p];
		u64 in_cluster = pos & (csize - 1);
		u64 len = min_t(u64, csize - in_cluster, iov_iter_count(&iter));
		u64 file_offset = pc->file_offset + in_cluster;
		struct iov_iter sub;
		loff_t fpos;

		/* Merge following pieces that continue in the same file. */
		while (p + 1 < npieces && len < iov_iter_count(&iter)) {
			struct cowd_piece *nx = &cmd->pieces[p + 1];

			if (nx->flags != pc->flags || nx->file != pc->file ||
			    (!(pc->flags & COWD_REMAP_ZERO) &&
			     nx->file_offset != file_offset + len))
				break;
			len = min_t(u64, len + csize, iov_iter_count(&iter));
			p++;
		}
		p++;
		if (pc->flags & COWD_REMAP_ZERO) {
			/* only reads reach here with ZERO pieces */
			iov_iter_zero(len, &iter);
			pos += len;
			continue;
		}
		sub = iter;
		iov_iter_truncate(&sub, len);
		fpos = file_offset;
		while (iov_iter_count(&sub)) {
			struct file *f = dev->files[pc->file];
			ssize_t ret;

			if (write) {
				file_start_write(f);
				ret = vfs_iter_write(f, &sub, &fpos, 0);
				file_end_write(f);
			} else {
				ret = vfs_iter_read(f, &sub, &fpos, 0);
			}
			if (ret < 0) {
				pr_err_ratelimited("cowd%d: %s of file %u at %lld failed: %zd\n",
						   dev->index, write ? "write" : "read",
						   pc->file, fpos, ret);
				status = errno_to_blk_status(ret);
				goto out;
			}
			if (ret == 0) {
				if (write) {
					status = BLK_STS_IOERR;
					goto out;
				}
				iov_iter_zero(iov_iter_count(&sub), &sub);	/* past EOF */
			}
		}
		iov_iter_advance(&iter, len);
		pos += len;
	}
	if (write)
		atomic64_add(blk_rq_bytes(rq), &dev->mapped_write_bytes);
	else
		atomic64_add(blk_rq_bytes(rq), &dev->mapped_read_bytes);
out:
	kfree(bvec);
	return status;
}

static u32 cowd_op_of(struct request *rq)
{
	switch (req_op(rq)) {
	case REQ_OP_READ:
		return COWD_OP_READ;
	case REQ_OP_WRITE:
		return COWD_OP_WRITE;
	case REQ_OP_FLUSH:
		return COWD_OP_FLUSH;
	case REQ_OP_DISCARD:
		return COWD_OP_DISCARD;
	default:
		return COWD_OP_WRITE_ZEROES;
	}
}

/*
 * Look up every cluster @cmd touches; true, with cmd->pieces filled and the entries made most
 * recently used, when all are in the table (and writable, for a write).
 */
static bool cowd_lookup(struct cowd_dev *dev, struct cowd_cmd *cmd, bool write,
			unsigned int *npieces)
{
	u64 csize = 1ULL << dev->cluster_bits;
	u64 pos, end = cmd->offset + cmd->length;
	unsigned int n = 0;

	lockdep_assert_held(&dev->lock);
	for (pos = cmd->offset; pos < end; pos = round_down(pos, csize) + csize) {
		struct cowd_entry *e = cowd_find(dev, pos >> dev->cluster_bits);

		if (!e || (write && !(e->flags & COWD_REMAP_WRITABLE)))
			return false;
		cmd->pieces[n].file = e->file;
		cmd->pieces[n].file_offset = e->file_offset;
		cmd->pieces[n].flags = e->flags & COWD_REMAP_FLAGS;
		cmd->pieces[n].src_flags = 0;
		n++;
		if (!(e->flags & COWD_ENTRY_PINNED))
			list_move_tail(&e->lru, &dev->lru);
	}
	*npieces = n;
	return true;
}

/* ---- boot-trace recording (v2) ------------------------------------------------------ */

/*
 * Record the first mapped read of each granule of the traced file that the READ hit @cmd
 * reads (dev->lock held; the caller checked dev->touch.on).  Returns true when the channel's
 * reader must be woken: the ring was empty, or recording just ended.
 */
static bool cowd_note_touches(struct cowd_dev *dev, struct cowd_cmd *cmd, unsigned int npieces)
{
	struct cowd_touches *t = &dev->touch;
	u64 csize = 1ULL << dev->cluster_bits;
	u64 pos = cmd->offset, end = cmd->offset + cmd->length;
	bool wake = false;
	unsigned int p;
	u64 now = 0;

	lockdep_assert_held(&dev->lock);
	for (p = 0; p < npieces && pos < end && t->on; p++) {
		const struct cowd_piece *pc = &cmd->pieces[p];
		u64 in_cluster = pos & (csize - 1);
		u64 len = min_t(u64, csize - in_cluster, end - pos);
		u64 a = pc->file_offset + in_cluster, b = a + len, g;

		pos += len;
		if (pc->file != t->file || pc->flags & COWD_REMAP_ZERO)
			continue;
		for (g = a >> t->bits; g < t->granules && (g << t->bits) < b; g++) {
			u64 ga = max_t(u64, a, g << t->bits);
			u64 gb = min_t(u64, b, (g + 1) << t->bits);
			struct cowd_touch_rec *r;

			if (__test_and_set_bit(g, t->map))
				continue;
			if (t->count == COWD_TOUCH_QUEUE) {
				__clear_bit(g, t->map);	/* recorded at its next read */
				t->deferred++;
				continue;
			}
			if (!now)
				now = ktime_get_ns();	/* CLOCK_MONOTONIC, as the daemon's */
			r = &t->ring[(t->head + t->count) % COWD_TOUCH_QUEUE];
			r->t_ns = now;
			r->file_offset = ga;
			r->length = gb - ga;
			r->reserved0 = 0;
			if (!t->count++)
				wake = true;
			if (++t->total == COWD_MAX_TOUCHES) {
				t->on = false;
				t->end = true;
				wake = true;
				break;
			}
		}
	}
	return wake;
}

/*
 * A recording of granules of 2^@bits bytes of file @file, not yet installed (or, with
 * @on false, none).  The caller checked @file and @bits against the device.
 */
static int cowd_alloc_touches(struct cowd_dev *dev, bool on, u32 file, u32 bits,
			      struct cowd_touches *t)
{
	u64 granules;

	memset(t, 0, sizeof(*t));
	if (!on)
		return 0;
	granules = DIV_ROUND_UP_ULL(i_size_read(file_inode(dev->files[file])), 1ULL << bits);
	if (granules > COWD_MAX_TOUCH_GRANULES)
		return -EFBIG;
	t->map = kvcalloc(BITS_TO_LONGS(max_t(u64, granules, 1)), sizeof(long), GFP_KERNEL);
	t->ring = kvmalloc_array(COWD_TOUCH_QUEUE, sizeof(*t->ring), GFP_KERNEL);
	if (!t->map || !t->ring) {
		kvfree(t->map);
		kvfree(t->ring);
		return -ENOMEM;
	}
	t->on = true;
	t->file = file;
	t->bits = bits;
	t->granules = granules;
	return 0;
}

static void cowd_free_touches(struct cowd_touches *t)
{
	kvfree(t->map);
	kvfree(t->ring);
	memset(t, 0, sizeof(*t));
}

/* Install @new (recording, or none) and return the old state in @new, to be freed. */
static void cowd_swap_touches(struct cowd_dev *dev, struct cowd_touches *new)
{
	struct cowd_touches old;

	lockdep_assert_held(&dev->lock);
	old = dev->touch;
	dev->touch = *new;
	*new = old;
}

/* Stop recording and free it (TOUCH_STOP, channel release, removal). */
static void cowd_stop_touches(struct cowd_dev *dev)
{
	struct cowd_touches t;

	memset(&t, 0, sizeof(t));
	spin_lock(&dev->lock);
	cowd_swap_touches(dev, &t);
	spin_unlock(&dev->lock);
	cowd_free_touches(&t);
}

/* ---- allocating from the pool (v2) --------------------------------------------------- */

/*
 * Plan a write that allocates: every cluster @cmd touches has an entry; writable ones are
 * written in place, read-only and ZERO ones take a pool cluster (COWD_PIECE_ALLOC, the old
 * entry as the source of the copy-up).  Returns how many take one, or -1 when a cluster has
 * no entry (only the daemon knows where its bytes are).
 */
static int cowd_plan_alloc(struct cowd_dev *dev, struct cowd_cmd *cmd, unsigned int *npieces)
{
	u64 csize = 1ULL << dev->cluster_bits;
	u64 pos, end = cmd->offset + cmd->length;
	unsigned int n = 0;
	int nalloc = 0;

	lockdep_assert_held(&dev->lock);
	for (pos = cmd->offset; pos < end; pos = round_down(pos, csize) + csize) {
		struct cowd_entry *e = cowd_find(dev, pos >> dev->cluster_bits);
		struct cowd_piece *pc = &cmd->pieces[n++];

		if (!e)
			return -1;
		if (e->flags & COWD_REMAP_WRITABLE) {
			pc->file = e->file;
			pc->file_offset = e->file_offset;
			pc->flags = e->flags & COWD_REMAP_FLAGS;
			pc->src_flags = 0;
		} else {
			pc->src_file = e->file;
			pc->src_offset = e->file_offset;
			pc->src_flags = COWD_PIECE_ALLOC | (e->flags & COWD_REMAP_ZERO);
			nalloc++;
		}
	}
	*npieces = n;
	return nalloc;
}

/* Can the pool give @nalloc clusters, with at most half the table pinned afterwards? */
static bool cowd_pool_fits(struct cowd_dev *dev, int nalloc)
{
	lockdep_assert_held(&dev->lock);
	return dev->pool_clusters >= nalloc && dev->nr_pinned + nalloc <= dev->max_entries / 2;
}

/* Give each COWD_PIECE_ALLOC piece the next pool cluster (cowd_pool_fits said there are). */
static void cowd_take_pool(struct cowd_dev *dev, struct cowd_cmd *cmd, unsigned int npieces,
			   struct list_head *used_runs)
{
	u64 csize = 1ULL << dev->cluster_bits;
	unsigned int p;

	lockdep_assert_held(&dev->lock);
	for (p = 0; p < npieces; p++) {
		struct cowd_piece *pc = &cmd->pieces[p];
		struct cowd_run *run;

		if (!(pc->src_flags & COWD_PIECE_ALLOC))
			continue;
		run = list_first_entry(&dev->pool, struct cowd_run, node);
		pc->file = run->file;
		pc->file_offset = run->file_offset;
		pc->flags = COWD_REMAP_WRITABLE;
		run->file_offset += csize;
		dev->pool_clusters--;
		dev->stats.pool_allocs++;
		if (!--run->count) {
			list_move_tail(&run->node, used_runs);
			dev->pool_runs--;
		}
	}
}

/* Write zeroes at [pos, pos + len) of @f from the zero page: no buffer to allocate. */
static int cowd_write_zeroes(struct file *f, loff_t pos, size_t len)
{
	struct bio_vec bv[16];
	struct iov_iter iter;
	unsigned int i, n;
	ssize_t ret;

	while (len) {
		size_t chunk = min_t(size_t, len, ARRAY_SIZE(bv) * PAGE_SIZE);

		n = DIV_ROUND_UP(chunk, PAGE_SIZE);
		for (i = 0; i < n; i++)
			bvec_set_page(&bv[i], ZERO_PAGE(0),
				      min_t(size_t, PAGE_SIZE, chunk - i * PAGE_SIZE), 0);
		iov_iter_bvec(&iter, ITER_SOURCE, bv, n, chunk);
		file_start_write(f);
		ret = vfs_iter_write(f, &iter, &pos, 0);
		file_end_write(f);
		if (ret < 0)
			return ret;
		if (!ret)
			return -EIO;
		len -= ret;
	}
	return 0;
}

/*
 * Copy bytes [from, to) of a cluster from its old place to its new one.  copy_file_range
 * first: a clone where the file system shares blocks (both files on one XFS or btrfs: no
 * data moves), else a splice (one copy, no buffer); a plain read and write if neither
 * works.  Past the source's end the cluster reads as zeroes.  A ZERO source needs no
 * bytes where the new cluster lies past the end of its file (a hole there reads as zeroes).
 */
static int cowd_copy_up(struct cowd_dev *dev, const struct cowd_piece *pc, u64 from, u64 to)
{
	struct file *dst = dev->files[pc->file], *src = dev->files[pc->src_file];
	loff_t spos = pc->src_offset + from, dpos = pc->file_offset + from;
	size_t len = to - from;
	unsigned int flags = 0;
	ssize_t ret;
	void *buf;

	if (pc->src_flags & COWD_REMAP_ZERO) {
		if (dpos >= i_size_read(file_inode(dst)))
			return 0;
		return cowd_write_zeroes(dst, dpos, len);
	}
	while (len) {
		ret = vfs_copy_file_range(src, spos, dst, dpos, len, flags);
		if (ret == -EXDEV || ret == -EOPNOTSUPP || ret == -EINVAL) {
			if (flags)
				break;	/* no splice either: the plain copy below */
			flags = COPY_FILE_SPLICE;
			continue;
		}
		if (ret < 0)
			return ret;
		if (!ret)	/* past the end of the source file */
			return cowd_write_zeroes(dst, dpos, len);
		spos += ret;
		dpos += ret;
		len -= ret;
	}
	if (!len)
		return 0;
	buf = kmalloc(PAGE_SIZE, GFP_KERNEL);	/* in the caller's NOIO scope */
	if (!buf)
		return -ENOMEM;
	while (len) {
		size_t n = min_t(size_t, len, PAGE_SIZE);

		ret = kernel_read(src, buf, n, &spos);
		if (ret < 0)
			break;
		if (ret < n)
			memset(buf + ret, 0, n - ret);	/* past the end: zeroes */
		ret = kernel_write(dst, buf, n, &dpos);
		if (ret >= 0 && ret < n)
			ret = -EIO;
		if (ret < 0)
			break;
		len -= n;
	}
	kfree(buf);
	return ret < 0 ? ret : 0;
}

/*
 * An allocating write's I/O: each new cluster gets the bytes the request does not write
 * copied up (head and tail), then the request is written like a mapped write.  Every new
 * cluster is then whole, as cowd_grant promises the daemon.
 */
static blk_status_t cowd_alloc_io(struct cowd_dev *dev, struct cowd_cmd *cmd,
				  unsigned int npieces)
{
	u64 csize = 1ULL << dev->cluster_bits;
	u64 end = cmd->offset + cmd->length;
	u64 cstart = round_down(cmd->offset, csize);
	unsigned int p;
	int err = 0;

	for (p = 0; p < npieces && !err; p++, cstart += csize) {
		struct cowd_piece *pc = &cmd->pieces[p];
		u64 a = max(cmd->offset, cstart) - cstart;
		u64 b = min(end, cstart + csize) - cstart;

		if (!(pc->src_flags & COWD_PIECE_ALLOC))
			continue;
		if (a)
			err = cowd_copy_up(dev, pc, 0, a);
		if (!err && b < csize)
			err = cowd_copy_up(dev, pc, b, csize);
	}
	if (err) {
		pr_err_ratelimited("cowd%d: copy-up for a write at %llu failed: %d\n",
				   dev->index, cmd->offset, err);
		return errno_to_blk_status(err);
	}
	return cowd_do_io(dev, cmd, true, npieces);
}

/*
 * After an allocating write's I/O: install its new entries, pinned, and queue the ALLOC
 * events that report them (one per run of clusters adjacent in the guest and in the file),
 * unless the write failed or a takeover came in between: then the pool clusters it took are
 * never reported, and the daemon gives back (or, if it died, leaks) what it never heard of.
 */
static void cowd_finish_alloc(struct cowd_dev *dev, struct cowd_cmd *cmd,
			      unsigned int npieces, blk_status_t status,
			      struct list_head *spare, struct list_head *evs)
{
	u64 csize = 1ULL << dev->cluster_bits;
	u64 cluster = cmd->offset >> dev->cluster_bits;
	struct cowd_event *ev = NULL;
	bool queued = false;
	LIST_HEAD(waiters);
	struct cowd_cmd *w;
	unsigned int p;

	spin_lock(&dev->lock);
	list_del_init(&cmd->miss_node);
	list_for_each_entry(w, &cmd->waiters, wait_node)
		w->waiting = false;
	list_splice_init(&cmd->waiters, &waiters);
	if (status == BLK_STS_OK)
		dev->write_gen++;
	if (status == BLK_STS_OK && cmd->alloc_epoch == dev->pool_epoch &&
	    dev->state != COWD_REMOVED) {
		for (p = 0; p < npieces; p++) {
			struct cowd_piece *pc = &cmd->pieces[p];
			struct cowd_entry *e;

			if (!(pc->src_flags & COWD_PIECE_ALLOC)) {
				ev = NULL;
				continue;
			}
			if (ev && ev->file == pc->file &&
			    ev->file_offset + ev->length == pc->file_offset) {
				ev->length += csize;
			} else {
				ev = list_first_entry(evs, struct cowd_event, node);
				list_move_tail(&ev->node, &dev->events);
				ev->type = COWD_MSG_ALLOC;
				ev->seq = ++dev->alloc_seq;
				ev->file = pc->file;
				ev->pool_left = min_t(u64, dev->pool_clusters, U32_MAX);
				ev->guest_offset = (cluster + p) << dev->cluster_bits;
				ev->length = csize;
				ev->file_offset = pc->file_offset;
				dev->stats.alloc_msgs++;
				queued = true;
			}
			e = cowd_get_entry(dev, cluster + p, spare);
			e->file = pc->file;
			e->file_offset = pc->file_offset;
			e->flags = COWD_REMAP_WRITABLE | COWD_ENTRY_PINNED;
			e->pin_seq = ev->seq;
			list_move_tail(&e->lru, &dev->pinned);
			dev->nr_pinned++;
		}
	}
	spin_unlock(&dev->lock);
	cowd_requeue(dev, &waiters);
	if (queued)
		wake_up_interruptible(&dev->chan_wait);
}

static void cowd_free_events(struct list_head *evs)
{
	struct cowd_event *ev, *n;

	list_for_each_entry_safe(ev, n, evs, node)
		kfree(ev);
}

static void cowd_free_runs(struct list_head *runs)
{
	struct cowd_run *r, *n;

	list_for_each_entry_safe(r, n, runs, node)
		kfree(r);
}

/*
 * A write that is not all writable in the table: allocate from the pool if it can (called
 * with dev->lock held).  Returns true when it took the request — waiting for another
 * allocation or miss on its clusters, or done — with dev->lock released; false, still
 * holding it, when the request must go to the daemon as a miss.  Memory for the new entries
 * and events is taken without sleeping under the lock; if there is none, the miss it is.
 */
static bool cowd_try_alloc(struct cowd_dev *dev, struct cowd_cmd *cmd)
{
	unsigned int npieces, epoch, noio;
	LIST_HEAD(spare);
	LIST_HEAD(evs);
	LIST_HEAD(used_runs);
	struct cowd_cmd *other;
	blk_status_t status;
	int nalloc, i;

	lockdep_assert_held(&dev->lock);
	nalloc = cowd_plan_alloc(dev, cmd, &npieces);
	if (nalloc <= 0)
		return false;
	other = cowd_overlapping_miss(dev, COWD_OP_WRITE, cmd->offset, cmd->length);
	if (other) {
		cmd->waiting = true;
		list_add_tail(&cmd->wait_node, &other->waiters);
		dev->stats.coalesced++;
		spin_unlock(&dev->lock);
		return true;
	}
	if (!cowd_pool_fits(dev, nalloc))
		goto fallback;
	for (i = 0; i < nalloc; i++) {
		struct cowd_entry *e = kmem_cache_alloc(cowd_entry_cache,
							 GFP_NOWAIT | __GFP_NOWARN);
		struct cowd_event *ev = kzalloc(sizeof(*ev), GFP_NOWAIT | __GFP_NOWARN);

		if (e)
			list_add(&e->lru, &spare);
		if (ev)
			list_add(&ev->node, &evs);
		if (!e || !ev) {
			cowd_free_list(&spare);
			cowd_free_events(&evs);
			goto fallback;
		}
	}
	cowd_take_pool(dev, cmd, npieces, &used_runs);
	cmd->alloc_epoch = dev->pool_epoch;
	list_add_tail(&cmd->miss_node, &dev->allocating);
	epoch = dev->epoch & 1;
	atomic_inc(&dev->inflight[epoch]);
	spin_unlock(&dev->lock);
	cowd_free_runs(&used_runs);

	noio = memalloc_noio_save();
	status = cowd_alloc_io(dev, cmd, npieces);
	memalloc_noio_restore(noio);
	cowd_finish_alloc(dev, cmd, npieces, status, &spare, &evs);
	if (atomic_dec_and_test(&dev->inflight[epoch]))
		wake_up_all(&dev->inflight_wait);
	cowd_free_list(&spare);
	cowd_free_events(&evs);
	cowd_end(cmd, status);
	return true;

fallback:
	dev->stats.pool_fallbacks++;
	return false;
}

static void cowd_work(struct work_struct *work)
{
	struct cowd_cmd *cmd = container_of(work, struct cowd_cmd, work);
	struct cowd_dev *dev = cmd->dev;
	struct request *rq = blk_mq_rq_from_pdu(cmd);
	u32 op = cowd_op_of(rq);
	bool write = op == COWD_OP_WRITE;
	unsigned int npieces = 0, noio, epoch;
	struct cowd_cmd *other;
	blk_status_t status;
	bool hit, wake;

	cmd->op = op;
	cmd->offset = blk_rq_pos(rq) << SECTOR_SHIFT;
	cmd->length = op == COWD_OP_FLUSH ? 0 : blk_rq_bytes(rq);

	spin_lock(&dev->lock);
	if (dev->state == COWD_REMOVED)
		goto fail_locked;
	if (op == COWD_OP_READ || op == COWD_OP_WRITE) {
		if (cmd->ready && cmd->ready_gen == dev->inval_gen) {
			npieces = cmd->npieces;
			hit = true;
		} else {
			hit = cowd_lookup(dev, cmd, write, &npieces);
		}
		cmd->ready = false;
		if (hit) {
			dev->stats.hits += npieces;
			wake = !write && dev->touch.on && cowd_note_touches(dev, cmd, npieces);
			epoch = dev->epoch & 1;
			atomic_inc(&dev->inflight[epoch]);
			spin_unlock(&dev->lock);
			if (wake)
				wake_up_interruptible(&dev->chan_wait);

			noio = memalloc_noio_save();
			status = cowd_do_io(dev, cmd, write, npieces);
			memalloc_noio_restore(noio);
			if (write && status == BLK_STS_OK) {
				spin_lock(&dev->lock);
				dev->write_gen++;
				spin_unlock(&dev->lock);
			}
			if (atomic_dec_and_test(&dev->inflight[epoch]))
				wake_up_all(&dev->inflight_wait);
			cowd_end(cmd, status);
			return;
		}
		/* (a pool ever granted: an empty one counts the write as a fallback) */
		if (write && dev->stats.pool_grants && dev->state == COWD_LIVE &&
		    cowd_try_alloc(dev, cmd))
			return;
	}
	if (dev->state == COWD_DEAD)
		goto fail_locked;
	if (op == COWD_OP_FLUSH)
		cmd->flush_gen = dev->write_gen;
	if (op == COWD_OP_READ || op == COWD_OP_WRITE) {
		other = cowd_overlapping_miss(dev, op, cmd->offset, cmd->length);
		if (other) {
			cmd->waiting = true;
			list_add_tail(&cmd->wait_node, &other->waiters);
			dev->stats.coalesced++;
			spin_unlock(&dev->lock);
			return;
		}
		if (cmd->retries++ >= COWD_MAX_RETRIES) {
			pr_warn_ratelimited("cowd%d: no usable remap for %llu+%llu after %d replies\n",
					    dev->index, cmd->offset, cmd->length, COWD_MAX_RETRIES);
			goto fail_locked;
		}
	}
	if (op == COWD_OP_READ || op == COWD_OP_WRITE)
		cowd_queue_miss(dev, cmd);
	else
		cowd_queue_daemon_op(dev, cmd);
	spin_unlock(&dev->lock);
	wake_up_interruptible(&dev->chan_wait);
	return;

fail_locked:
	spin_unlock(&dev->lock);
	cowd_end(cmd, BLK_STS_IOERR);
}

static void cowd_queue_work(struct work_struct *work)
{
	struct cowd_queue *q = container_of(work, struct cowd_queue, work);
	struct cowd_cmd *cmd;
	unsigned long flags;

	for (;;) {
		spin_lock_irqsave(&q->lock, flags);
		cmd = list_first_entry_or_null(&q->cmds, struct cowd_cmd, qnode);
		if (cmd)
			list_del_init(&cmd->qnode);
		spin_unlock_irqrestore(&q->lock, flags);
		if (!cmd)
			return;
		cowd_work(&cmd->work);
		cond_resched();
	}
}

static blk_status_t cowd_queue_rq(struct blk_mq_hw_ctx *hctx, const struct blk_mq_queue_data *bd)
{
	struct request *rq = bd->rq;
	struct cowd_cmd *cmd = blk_mq_rq_to_pdu(rq);
	struct cowd_dev *dev = cmd->dev;
	struct cowd_queue *q = &dev->queues[rq->tag % dev->nr_queues];
	unsigned long flags;

	switch (req_op(rq)) {
	case REQ_OP_READ:
	case REQ_OP_WRITE:
	case REQ_OP_FLUSH:
	case REQ_OP_DISCARD:
	case REQ_OP_WRITE_ZEROES:
		break;
	default:
		return BLK_STS_NOTSUPP;
	}
	blk_mq_start_request(rq);
	cmd->retries = 0;
	cmd->ready = false;
	spin_lock_irqsave(&q->lock, flags);
	list_add_tail(&cmd->qnode, &q->cmds);
	spin_unlock_irqrestore(&q->lock, flags);
	queue_work(dev->wq, &q->work);
	return BLK_STS_OK;
}

static int cowd_init_request(struct blk_mq_tag_set *set, struct request *rq,
			     unsigned int hctx_idx, unsigned int numa_node)
{
	struct cowd_cmd *cmd = blk_mq_rq_to_pdu(rq);

	INIT_WORK(&cmd->work, cowd_work);
	INIT_LIST_HEAD(&cmd->qnode);
	INIT_LIST_HEAD(&cmd->miss_node);
	INIT_LIST_HEAD(&cmd->waiters);
	INIT_LIST_HEAD(&cmd->wait_node);
	cmd->dev = set->driver_data;
	return 0;
}

/* Misses have their own deadline (the daemon timeout); the block layer's must not fire. */
static enum blk_eh_timer_return cowd_timeout(struct request *rq)
{
	return BLK_EH_RESET_TIMER;
}

static const struct blk_mq_ops cowd_mq_ops = {
	.queue_rq = cowd_queue_rq,
	.init_request = cowd_init_request,
	.timeout = cowd_timeout,
};

static const struct block_device_operations cowd_bdev_fops = {
	.owner = THIS_MODULE,
};

/* ---- the channel --------------------------------------------------------------------- */

/* Something for the daemon to read (dev->lock, or a racy peek for a wait condition). */
static bool cowd_chan_ready(struct cowd_dev *dev)
{
	return !list_empty(&dev->unsent) || !list_empty(&dev->events) ||
	       READ_ONCE(dev->touch.count) || READ_ONCE(dev->touch.end);
}

/* Zero a kernel -> daemon message of @size bytes at @p and fill in its header. */
static void cowd_msg_init(void *p, u32 size, u16 type, u16 version)
{
	struct cowd_msg_hdr *hdr = p;

	memset(p, 0, size);
	hdr->size = size;
	hdr->type = type;
	hdr->version = version;
}

/* Build an event's message in @p (ALLOC or REVOKED); returns its size. */
static size_t cowd_event_msg(const struct cowd_event *ev, u16 version, void *p)
{
	if (ev->type == COWD_MSG_ALLOC) {
		struct cowd_alloc *m = p;

		cowd_msg_init(m, sizeof(*m), COWD_MSG_ALLOC, version);
		m->seq = ev->seq;
		m->file = ev->file;
		m->pool_left = ev->pool_left;
		m->guest_offset = ev->guest_offset;
		m->length = ev->length;
		m->file_offset = ev->file_offset;
		return sizeof(*m);
	} else {
		struct cowd_revoked *m = p;

		cowd_msg_init(m, sizeof(*m), COWD_MSG_REVOKED, version);
		m->cookie = ev->cookie;
		m->dropped = ev->dropped;
		m->seq = ev->seq;
		return sizeof(*m);
	}
}

/* The largest message read() returns: a read must have room for one. */
#define COWD_MAX_READ_MSG	max(sizeof(struct cowd_miss), sizeof(struct cowd_alloc))
/* A TOUCH with one record fits in that; one read returns at most this much of them. */
#define COWD_TOUCH_MSG_MAX	(sizeof(struct cowd_touch) + \
				 COWD_TOUCH_BATCH * sizeof(struct cowd_touch_rec))

/*
 * One TOUCH message of the queued records that fit in @room bytes at @p (dev->lock held;
 * @room holds at least a message with one record); returns its size.  When it carries the
 * end of the recording, the recording goes to @done, for the caller to free.
 */
static size_t cowd_touch_msg(struct cowd_dev *dev, u16 version, void *p, size_t room,
			     struct cowd_touches *done)
{
	struct cowd_touches *t = &dev->touch;
	struct cowd_touch *m = p;
	struct cowd_touch_rec *out = (struct cowd_touch_rec *)(m + 1);
	u32 n, i;

	lockdep_assert_held(&dev->lock);
	n = min_t(size_t, min_t(u32, t->count, COWD_TOUCH_BATCH),
		  (room - sizeof(*m)) / sizeof(*out));
	cowd_msg_init(m, sizeof(*m) + n * sizeof(*out), COWD_MSG_TOUCH, version);
	for (i = 0; i < n; i++)
		out[i] = t->ring[(t->head + i) % COWD_TOUCH_QUEUE];
	t->head = (t->head + n) % COWD_TOUCH_QUEUE;
	t->count -= n;
	m->count = n;
	m->deferred = t->deferred;
	t->deferred = 0;
	if (t->end && !t->count) {
		m->flags = COWD_TOUCH_END;
		memset(done, 0, sizeof(*done));
		cowd_swap_touches(dev, done);	/* nothing more will be recorded */
	}
	return m->hdr.size;
}

/*
 * Whole messages, the events first (so an ALLOC is read no later than a miss queued after
 * it), then misses, at most COWD_READ_BATCH of each, then a TOUCH with the records that fit
 * (they are only hints: they go last, and are lost if the copy to the daemon fails).
 */
static ssize_t cowd_chan_read(struct file *file, char __user *buf, size_t count, loff_t *ppos)
{
	struct cowd_dev *dev = file->private_data;
	size_t cap = min_t(size_t, count,
			   COWD_READ_BATCH * (sizeof(struct cowd_miss) + COWD_MAX_READ_MSG) +
			   COWD_TOUCH_MSG_MAX);
	struct cowd_touches done = {};
	struct cowd_event *ev;
	struct cowd_cmd *c;
	LIST_HEAD(taken);
	LIST_HEAD(taken_ev);
	size_t n = 0, used = 0;
	u16 version;
	char *out;
	int err;

	if (count < (READ_ONCE(dev->chan_version) >= 2 ? COWD_MAX_READ_MSG :
		     sizeof(struct cowd_miss)))
		return -EINVAL;
	out = kvmalloc(cap, GFP_KERNEL);
	if (!out)
		return -ENOMEM;
	for (;;) {
		spin_lock(&dev->lock);
		if (dev->state == COWD_REMOVED) {
			spin_unlock(&dev->lock);
			err = -ENODEV;
			goto out;
		}
		if (cowd_chan_ready(dev))
			break;
		spin_unlock(&dev->lock);
		if (file->f_flags & O_NONBLOCK) {
			err = -EAGAIN;
			goto out;
		}
		err = wait_event_interruptible(dev->chan_wait, cowd_chan_ready(dev) ||
					       READ_ONCE(dev->state) == COWD_REMOVED);
		if (err)
			goto out;
	}
	version = dev->chan_version;
	while (n < COWD_READ_BATCH && !list_empty(&dev->events)) {
		ev = list_first_entry(&dev->events, struct cowd_event, node);
		if (cap - used < COWD_MAX_READ_MSG)
			break;
		used += cowd_event_msg(ev, version, out + used);
		list_move_tail(&ev->node, &taken_ev);
		n++;
	}
	n = 0;
	while (n < COWD_READ_BATCH && !list_empty(&dev->unsent) &&
	       cap - used >= sizeof(struct cowd_miss)) {
		struct cowd_miss *m = (struct cowd_miss *)(out + used);

		c = list_first_entry(&dev->unsent, struct cowd_cmd, miss_node);
		cowd_msg_init(m, sizeof(*m), COWD_MSG_MISS, version);
		m->cookie = c->cookie;
		m->op = c->op;
		m->offset = c->offset;
		m->length = c->length;
		used += sizeof(*m);
		list_move_tail(&c->miss_node, &taken);
		n++;
	}
	if ((dev->touch.count || dev->touch.end) &&
	    cap - used >= sizeof(struct cowd_touch) + sizeof(struct cowd_touch_rec))
		used += cowd_touch_msg(dev, version, out + used, cap - used, &done);
	spin_unlock(&dev->lock);
	cowd_free_touches(&done);
	if (copy_to_user(buf, out, used)) {
		spin_lock(&dev->lock);
		list_splice(&taken, &dev->unsent);	/* give them back, in order */
		list_splice(&taken_ev, &dev->events);
		spin_unlock(&dev->lock);
		err = -EFAULT;
		goto out;
	}
	spin_lock(&dev->lock);
	if (dev->state == COWD_REMOVED)
		list_splice_init(&taken, &dev->unsent);	/* the removal sweep fails them */
	else
		list_splice_tail_init(&taken, &dev->sent);
	spin_unlock(&dev->lock);
	cowd_free_events(&taken_ev);
	err = used;
out:
	kvfree(out);
	return err;
}

/* Copy a DATA reply's payload into the request's pages. */
static int cowd_copy_data(struct cowd_cmd *cmd, const char __user *src)
{
	struct request *rq = blk_mq_rq_from_pdu(cmd);
	struct req_iterator iter;
	struct bio_vec bv;

	rq_for_each_segment(bv, rq, iter) {
		void *p = bvec_kmap_local(&bv);
		unsigned long left = copy_from_user(p, src, bv.bv_len);

		kunmap_local(p);
		flush_dcache_page(bv.bv_page);
		if (left)
			return -EFAULT;
		src += bv.bv_len;
	}
	return 0;
}

static int cowd_apply_reply(struct cowd_dev *dev, const struct cowd_reply *m,
			    const char __user *payload, size_t payload_len)
{
	struct cowd_cmd *c, *cmd = NULL;
	blk_status_t status;
	LIST_HEAD(waiters);
	int err;

	if (m->reserved0)
		return -EINVAL;
	if (m->result < -MAX_ERRNO || m->result > COWD_REPLY_DATA)
		return -EINVAL;
	spin_lock(&dev->lock);
	if (dev->state == COWD_REMOVED) {
		spin_unlock(&dev->lock);
		return -ENODEV;
	}
	list_for_each_entry(c, &dev->sent, miss_node) {
		if (c->cookie == m->cookie) {
			cmd = c;
			break;
		}
	}
	if (!cmd) {
		spin_unlock(&dev->lock);
		return -ENOENT;
	}
	/* Check the reply fits the miss before consuming it. */
	if (m->result == COWD_REPLY_DATA ?
	    (cmd->op != COWD_OP_READ || payload_len != cmd->length) :
	    (payload_len || (m->result == COWD_REPLY_RETRY &&
			     cmd->op != COWD_OP_READ && cmd->op != COWD_OP_WRITE) ||
	     (m->result == COWD_REPLY_DONE &&
	      (cmd->op == COWD_OP_READ || cmd->op == COWD_OP_WRITE)))) {
		spin_unlock(&dev->lock);
		return -EINVAL;
	}
	cowd_unlink_miss(cmd, &waiters);
	if (m->result == COWD_REPLY_DATA)
		dev->stats.data_replies++;
	spin_unlock(&dev->lock);
	cowd_requeue(dev, &waiters);

	switch (m->result) {
	case COWD_REPLY_RETRY:
		spin_lock(&dev->lock);
		dev->stats.retries++;
		cmd->ready = cowd_lookup(dev, cmd, cmd->op == COWD_OP_WRITE, &cmd->npieces);
		cmd->ready_gen = dev->inval_gen;
		spin_unlock(&dev->lock);
		queue_work(dev->wq, &cmd->work);
		return 0;
	case COWD_REPLY_DONE:
		status = BLK_STS_OK;
		spin_lock(&dev->lock);
		if (cmd->op == COWD_OP_FLUSH) {
			if (dev->lost_writes) {
				/* reported once, like a failed fsync (errseq) */
				dev->lost_writes = false;
				dev->flushed_gen = dev->write_gen;
				status = BLK_STS_IOERR;
			} else if (cmd->flush_gen > dev->flushed_gen) {
				dev->flushed_gen = cmd->flush_gen;
			}
		} else {
			dev->write_gen++;	/* a discard or write-zeroes the daemon did */
		}
		spin_unlock(&dev->lock);
		if (status != BLK_STS_OK)
			pr_warn_ratelimited("cowd%d: flush fails: writes completed before the daemon died may be lost\n",
					    dev->index);
		cowd_end(cmd, status);
		return 0;
	case COWD_REPLY_DATA:
		err = cowd_copy_data(cmd, payload);
		cowd_end(cmd, err ? BLK_STS_IOERR : BLK_STS_OK);
		return err;
	default:
		status = errno_to_blk_status(m->result);
		cowd_end(cmd, status == BLK_STS_OK ? BLK_STS_IOERR : status);
		return 0;
	}
}

/* ---- the pool's messages (v2) --------------------------------------------------------- */

static int cowd_apply_grant(struct cowd_dev *dev, const struct cowd_grant *m)
{
	u64 csize = 1ULL << dev->cluster_bits;
	u64 count = m->length >> dev->cluster_bits;
	struct cowd_run *run;
	int err = 0;

	if (m->flags || m->file >= dev->nr_files || !m->length || m->length & (csize - 1) ||
	    m->file_offset & (SECTOR_SIZE - 1) || m->file_offset > LLONG_MAX - m->length)
		return -EINVAL;
	if (!(dev->file_flags[m->file] & COWD_FILE_WRITABLE) || dev->readonly)
		return -EPERM;
	run = kmalloc(sizeof(*run), GFP_KERNEL);
	if (!run)
		return -ENOMEM;
	run->file = m->file;
	run->file_offset = m->file_offset;
	run->count = count;
	spin_lock(&dev->lock);
	if (dev->state == COWD_REMOVED)
		err = -ENODEV;
	else if (dev->pool_clusters + count > COWD_MAX_POOL_CLUSTERS ||
		 dev->pool_runs >= COWD_MAX_POOL_RUNS)
		err = -ENOSPC;
	if (!err) {
		list_add_tail(&run->node, &dev->pool);
		dev->pool_runs++;
		dev->pool_clusters += count;
		dev->stats.pool_grants++;
	}
	spin_unlock(&dev->lock);
	if (err)
		kfree(run);
	return err;
}

/* The daemon recorded every ALLOC up to m->seq: unpin them, send on what waited for it. */
static int cowd_apply_ack(struct cowd_dev *dev, const struct cowd_ack *m)
{
	struct cowd_entry *e, *en;
	struct cowd_cmd *c, *cn;
	bool wake = false;

	if (m->reserved0)
		return -EINVAL;
	spin_lock(&dev->lock);
	if (m->seq > dev->alloc_seq) {
		spin_unlock(&dev->lock);
		return -EINVAL;
	}
	if (m->seq > dev->acked_seq) {
		dev->acked_seq = m->seq;
		list_for_each_entry_safe(e, en, &dev->pinned, lru) {
			if (e->pin_seq > m->seq)
				break;
			e->flags &= ~COWD_ENTRY_PINNED;
			list_move_tail(&e->lru, &dev->lru);
			dev->nr_pinned--;
		}
		list_for_each_entry_safe(c, cn, &dev->held, miss_node) {
			if (c->hold_seq <= m->seq) {
				list_move_tail(&c->miss_node, &dev->unsent);
				wake = true;
			}
		}
	}
	spin_unlock(&dev->lock);
	if (wake)
		wake_up_interruptible(&dev->chan_wait);
	return 0;
}

/* Under dev->lock: drop every pool run onto @freed; returns the clusters they held. */
static u64 cowd_drop_pool(struct cowd_dev *dev, struct list_head *freed)
{
	u64 dropped = dev->pool_clusters;

	lockdep_assert_held(&dev->lock);
	list_splice_tail_init(&dev->pool, freed);
	dev->pool_clusters = 0;
	dev->pool_runs = 0;
	return dropped;
}

/*
 * Empty the pool and wait for the allocations under way (they count as mapped I/O), then
 * queue REVOKED behind their ALLOCs: the daemon that reads it knows which of the clusters it
 * granted were written (reported) and which never will be.
 */
static int cowd_apply_revoke(struct cowd_dev *dev, const struct cowd_revoke *m)
{
	struct cowd_event *ev;
	LIST_HEAD(freed);
	u64 dropped;

	if (m->reserved0)
		return -EINVAL;
	ev = kzalloc(sizeof(*ev), GFP_KERNEL);
	if (!ev)
		return -ENOMEM;
	spin_lock(&dev->lock);
	dropped = cowd_drop_pool(dev, &freed);
	spin_unlock(&dev->lock);
	cowd_free_runs(&freed);
	cowd_drain_mapped(dev);
	ev->type = COWD_MSG_REVOKED;
	ev->cookie = m->cookie;
	ev->dropped = dropped;
	spin_lock(&dev->lock);
	if (dev->state == COWD_REMOVED) {
		spin_unlock(&dev->lock);
		kfree(ev);
		return -ENODEV;
	}
	ev->seq = dev->alloc_seq;
	list_add_tail(&ev->node, &dev->events);
	spin_unlock(&dev->lock);
	wake_up_interruptible(&dev->chan_wait);
	return 0;
}

/*
 * A takeover (the caller holds cowd_ctl_mutex, no channel is open): forget the old daemon's
 * pool, its unread events and its pins — it never recorded those allocations, so their
 * writes count as unflushed (lost_writes) and their clusters are leaks — and start a new
 * pool epoch, so that an allocation still under way installs nothing.  Its held requests
 * go to the new daemon.  The entries themselves are dropped by the caller's invalidation.
 */
static void cowd_reset_pool(struct cowd_dev *dev)
{
	struct cowd_entry *e;
	LIST_HEAD(runs);
	LIST_HEAD(evs);

	spin_lock(&dev->lock);
	dev->pool_epoch++;
	cowd_drop_pool(dev, &runs);
	list_splice_init(&dev->events, &evs);
	list_for_each_entry(e, &dev->pinned, lru)
		e->flags &= ~COWD_ENTRY_PINNED;
	list_splice_tail_init(&dev->pinned, &dev->lru);
	dev->nr_pinned = 0;
	dev->acked_seq = dev->alloc_seq;
	list_splice_tail_init(&dev->held, &dev->unsent);
	spin_unlock(&dev->lock);
	cowd_free_runs(&runs);
	cowd_free_events(&evs);
}

static ssize_t cowd_chan_write(struct file *file, const char __user *buf, size_t count,
			       loff_t *ppos)
{
	struct cowd_dev *dev = file->private_data;
	u16 version = READ_ONCE(dev->chan_version);
	size_t pos = 0;
	int err = 0;

	while (count - pos >= sizeof(struct cowd_msg_hdr)) {
		union {
			struct cowd_msg_hdr hdr;
			struct cowd_remap remap;
			struct cowd_invalidate inval;
			struct cowd_reply reply;
			struct cowd_grant grant;
			struct cowd_ack ack;
			struct cowd_revoke revoke;
			struct cowd_touch_stop touch_stop;
		} m;
		size_t want;

		if (copy_from_user(&m.hdr, buf + pos, sizeof(m.hdr)))
			return pos ? pos : -EFAULT;
		if (m.hdr.version != version || m.hdr.size < sizeof(m.hdr) ||
		    m.hdr.size > count - pos) {
			err = -EINVAL;
			break;
		}
		if (m.hdr.type >= COWD_MSG_GRANT && version < 2) {
			err = -EINVAL;
			break;
		}
		switch (m.hdr.type) {
		case COWD_MSG_GRANT:
			want = sizeof(m.grant);
			break;
		case COWD_MSG_ACK:
			want = sizeof(m.ack);
			break;
		case COWD_MSG_REVOKE:
			want = sizeof(m.revoke);
			break;
		case COWD_MSG_TOUCH_STOP:
			want = sizeof(m.touch_stop);
			break;
		case COWD_MSG_REMAP:
			want = sizeof(m.remap);
			break;
		case COWD_MSG_INVALIDATE:
			want = sizeof(m.inval);
			break;
		case COWD_MSG_REPLY:
			want = sizeof(m.reply);
			if (m.hdr.size > want + COWD_MAX_DATA_BYTES) {
				err = -EINVAL;
				goto out;
			}
			break;
		default:
			err = -EINVAL;
			goto out;
		}
		if (m.hdr.size < want || (m.hdr.type != COWD_MSG_REPLY && m.hdr.size != want)) {
			err = -EINVAL;
			break;
		}
		if (copy_from_user(&m, buf + pos, want)) {
			err = -EFAULT;
			break;
		}
		switch (m.hdr.type) {
		case COWD_MSG_REMAP:
			err = cowd_apply_remap(dev, &m.remap);
			break;
		case COWD_MSG_INVALIDATE:
			err = cowd_apply_invalidate(dev, &m.inval);
			break;
		case COWD_MSG_GRANT:
			err = cowd_apply_grant(dev, &m.grant);
			break;
		case COWD_MSG_ACK:
			err = cowd_apply_ack(dev, &m.ack);
			break;
		case COWD_MSG_REVOKE:
			err = cowd_apply_revoke(dev, &m.revoke);
			break;
		case COWD_MSG_TOUCH_STOP:
			err = m.touch_stop.reserved0 ? -EINVAL : 0;
			if (!err)
				cowd_stop_touches(dev);
			break;
		default:
			err = cowd_apply_reply(dev, &m.reply, buf + pos + want,
					       m.hdr.size - want);
		}
		if (err)
			break;
		pos += m.hdr.size;
	}
out:
	if (!err && pos != count)
		err = -EINVAL;		/* a truncated message at the end */
	return pos ? pos : err;
}

static __poll_t cowd_chan_poll(struct file *file, struct poll_table_struct *wait)
{
	struct cowd_dev *dev = file->private_data;
	__poll_t mask = EPOLLOUT | EPOLLWRNORM;

	poll_wait(file, &dev->chan_wait, wait);
	spin_lock(&dev->lock);
	if (dev->state == COWD_REMOVED)
		mask |= EPOLLHUP | EPOLLERR;
	else if (cowd_chan_ready(dev))
		mask |= EPOLLIN | EPOLLRDNORM;
	spin_unlock(&dev->lock);
	return mask;
}

static long cowd_chan_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct cowd_dev *dev = file->private_data;
	struct cowd_stats st;
	u32 size, version;

	if (cmd != COWD_CHAN_STATS)
		return -ENOTTY;
	if (get_user(size, (u32 __user *)arg) || get_user(version, (u32 __user *)arg + 1))
		return -EFAULT;
	if (size != sizeof(st) || version < COWD_ABI_MIN_VERSION || version > COWD_ABI_VERSION)
		return -EINVAL;
	spin_lock(&dev->lock);
	st = dev->stats;
	st.entries = dev->nr_entries;
	st.max_entries = dev->max_entries;
	st.pool_clusters = dev->pool_clusters;
	st.unacked = dev->nr_pinned;
	spin_unlock(&dev->lock);
	st.size = sizeof(st);
	st.version = version;
	st.mapped_read_bytes = atomic64_read(&dev->mapped_read_bytes);
	st.mapped_write_bytes = atomic64_read(&dev->mapped_write_bytes);
	if (version < 2)	/* a version-1 caller reads these as its reserved fields */
		memset((char *)&st + offsetof(struct cowd_stats, pool_clusters), 0,
		       sizeof(st) - offsetof(struct cowd_stats, pool_clusters));
	memset(st.reserved, 0, sizeof(st.reserved));
	return copy_to_user((void __user *)arg, &st, sizeof(st)) ? -EFAULT : 0;
}

static void cowd_free(struct kref *ref)
{
	kfree(container_of(ref, struct cowd_dev, ref));
}

static int cowd_chan_release(struct inode *inode, struct file *file)
{
	struct cowd_dev *dev = file->private_data;
	LIST_HEAD(runs);

	spin_lock(&dev->lock);
	dev->chan_open = false;
	/* Misses the dead daemon read but never answered go to the next one. */
	list_splice_init(&dev->sent, &dev->unsent);
	/* No allocation without a daemon to report it to: writes miss until a takeover. */
	cowd_drop_pool(dev, &runs);
	if (dev->state == COWD_LIVE) {
		dev->state = COWD_ORPHAN;
		schedule_delayed_work(&dev->timeout_work, msecs_to_jiffies(dev->timeout_ms));
	}
	spin_unlock(&dev->lock);
	cowd_free_runs(&runs);
	cowd_stop_touches(dev);		/* nobody to read it; a takeover may start another */
	kref_put(&dev->ref, cowd_free);
	return 0;
}

static const struct file_operations cowd_chan_fops = {
	.owner = THIS_MODULE,
	.read = cowd_chan_read,
	.write = cowd_chan_write,
	.poll = cowd_chan_poll,
	.unlocked_ioctl = cowd_chan_ioctl,
	.release = cowd_chan_release,
	.llseek = noop_llseek,
};

static void cowd_timeout_work(struct work_struct *work)
{
	struct cowd_dev *dev = container_of(to_delayed_work(work), struct cowd_dev, timeout_work);
	LIST_HEAD(owners);

	spin_lock(&dev->lock);
	if (dev->state != COWD_ORPHAN) {
		spin_unlock(&dev->lock);
		return;
	}
	dev->state = COWD_DEAD;
	cowd_take_all(dev, &owners);
	spin_unlock(&dev->lock);
	pr_warn("cowd%d: no daemon for %u ms; failing its requests\n", dev->index, dev->timeout_ms);
	cowd_fail_all(dev, &owners);
}

/* A new channel file for @dev, not yet installed in the fd table. */
static struct file *cowd_new_channel(struct cowd_dev *dev, int *fd)
{
	struct file *f;

	*fd = get_unused_fd_flags(O_CLOEXEC);
	if (*fd < 0)
		return ERR_PTR(*fd);
	kref_get(&dev->ref);
	f = anon_inode_getfile("[cowd-channel]", &cowd_chan_fops, dev, O_RDWR);
	if (IS_ERR(f)) {
		put_unused_fd(*fd);
		kref_put(&dev->ref, cowd_free);
	}
	return f;
}

/* ---- device creation and removal ----------------------------------------------------- */

static void cowd_put_files(struct cowd_dev *dev)
{
	u32 i;

	for (i = 0; i < dev->nr_files; i++)
		if (dev->files[i])
			fput(dev->files[i]);
}

/* Tear down a device that is no longer in the idr. */
static void cowd_teardown(struct cowd_dev *dev)
{
	struct cowd_entry *e, *n;
	LIST_HEAD(owners);

	spin_lock(&dev->lock);
	dev->state = COWD_REMOVED;
	cowd_take_all(dev, &owners);
	spin_unlock(&dev->lock);
	wake_up_all(&dev->chan_wait);
	cowd_fail_all(dev, &owners);
	cancel_delayed_work_sync(&dev->timeout_work);

	del_gendisk(dev->disk);		/* waits for requests in flight; new ones fail */
	destroy_workqueue(dev->wq);
	blk_mq_free_tag_set(&dev->tag_set);
	put_disk(dev->disk);

	list_for_each_entry_safe(e, n, &dev->lru, lru)
		kmem_cache_free(cowd_entry_cache, e);
	list_for_each_entry_safe(e, n, &dev->pinned, lru)
		kmem_cache_free(cowd_entry_cache, e);
	INIT_LIST_HEAD(&dev->lru);
	INIT_LIST_HEAD(&dev->pinned);
	dev->nr_entries = 0;
	dev->nr_pinned = 0;
	cowd_free_runs(&dev->pool);
	INIT_LIST_HEAD(&dev->pool);
	cowd_free_events(&dev->events);
	INIT_LIST_HEAD(&dev->events);
	kvfree(dev->buckets);
	dev->buckets = NULL;
	cowd_stop_touches(dev);
	cowd_put_files(dev);
	dev->nr_files = 0;
	kref_put(&dev->ref, cowd_free);
}

static int cowd_check_create(const struct cowd_create *c)
{
	u32 i;

	if (c->flags & ~COWD_CREATE_FLAGS)
		return -EINVAL;
	if (c->logical_block_size != 512 && c->logical_block_size != 4096)
		return -EINVAL;
	if (c->cluster_bits < ilog2(c->logical_block_size) ||
	    c->cluster_bits < COWD_MIN_CLUSTER_BITS || c->cluster_bits > COWD_MAX_CLUSTER_BITS)
		return -EINVAL;
	if (!c->disk_size || c->disk_size & (c->logical_block_size - 1) ||
	    c->disk_size > (U64_MAX >> 1))
		return -EINVAL;
	if ((c->max_entries && c->max_entries < COWD_MIN_ENTRIES) ||
	    c->max_entries > COWD_MAX_ENTRIES || c->queue_depth > COWD_MAX_QUEUE_DEPTH ||
	    c->daemon_timeout_ms > COWD_MAX_TIMEOUT_MS)
		return -EINVAL;
	if (!c->nr_files || c->nr_files > COWD_MAX_FILES)
		return -EINVAL;
	for (i = 0; i < COWD_MAX_FILES; i++) {
		if (i < c->nr_files ? (c->file_flags[i] & ~COWD_FILE_FLAGS) :
		    (c->fds[i] || c->file_flags[i]))
			return -EINVAL;
	}
	if (c->flags & COWD_CREATE_TOUCH ?
	    (c->version < 2 || c->touch_file >= c->nr_files ||
	     c->touch_bits < COWD_MIN_TOUCH_BITS || c->touch_bits > COWD_MAX_TOUCH_BITS) :
	    (c->touch_file || c->touch_bits))
		return -EINVAL;
	for (i = 0; i < ARRAY_SIZE(c->reserved); i++)
		if (c->reserved[i])
			return -EINVAL;
	if (c->index || c->channel_fd)
		return -EINVAL;
	return 0;
}

static int cowd_ctl_create(struct cowd_create __user *uarg)
{
	struct cowd_create c;
	struct cowd_dev *dev;
	struct gendisk *disk;
	struct file *chan;
	int err, fd;
	u32 i, max_io, max_clusters;

	if (copy_from_user(&c, uarg, sizeof(c)))
		return -EFAULT;
	if (c.size != sizeof(c) || c.version < COWD_ABI_MIN_VERSION ||
	    c.version > COWD_ABI_VERSION)
		return -EINVAL;
	err = cowd_check_create(&c);
	if (err)
		return err;

	dev = kzalloc(sizeof(*dev), GFP_KERNEL);
	if (!dev)
		return -ENOMEM;
	kref_init(&dev->ref);
	spin_lock_init(&dev->lock);
	INIT_LIST_HEAD(&dev->unsent);
	INIT_LIST_HEAD(&dev->sent);
	INIT_LIST_HEAD(&dev->lru);
	INIT_LIST_HEAD(&dev->pool);
	INIT_LIST_HEAD(&dev->events);
	INIT_LIST_HEAD(&dev->pinned);
	INIT_LIST_HEAD(&dev->held);
	INIT_LIST_HEAD(&dev->allocating);
	dev->chan_version = c.version;
	init_waitqueue_head(&dev->chan_wait);
	init_waitqueue_head(&dev->inflight_wait);
	mutex_init(&dev->drain_mutex);
	INIT_DELAYED_WORK(&dev->timeout_work, cowd_timeout_work);
	dev->size = c.disk_size;
	dev->lbs = c.logical_block_size;
	dev->cluster_bits = c.cluster_bits;
	dev->readonly = c.flags & COWD_CREATE_READONLY;
	dev->timeout_ms = c.daemon_timeout_ms ?: COWD_DEFAULT_TIMEOUT_MS;
	dev->max_entries = c.max_entries ?: COWD_DEFAULT_ENTRIES;
	dev->hash_bits = max_t(u32, ilog2(roundup_pow_of_two(dev->max_entries)) - 1, 4);
	dev->state = COWD_LIVE;
	dev->chan_open = true;
	dev->nr_queues = clamp_t(unsigned int, queues ?: num_online_cpus(), 1, COWD_MAX_QUEUES);
	for (i = 0; i < dev->nr_queues; i++) {
		spin_lock_init(&dev->queues[i].lock);
		INIT_LIST_HEAD(&dev->queues[i].cmds);
		INIT_WORK(&dev->queues[i].work, cowd_queue_work);
		dev->queues[i].dev = dev;
	}

	err = -EBADF;
	for (i = 0; i < c.nr_files; i++) {
		struct file *f = fget(c.fds[i]);

		if (!f)
			goto out_files;
		dev->files[i] = f;
		dev->nr_files = i + 1;
		err = -EINVAL;
		if (!S_ISREG(file_inode(f)->i_mode) || !(f->f_mode & FMODE_READ))
			goto out_files;
		err = -EBADF;
		if ((c.file_flags[i] & COWD_FILE_WRITABLE) && !(f->f_mode & FMODE_WRITE))
			goto out_files;
		dev->file_flags[i] = c.file_flags[i];
		err = -EBADF;
	}
	err = cowd_alloc_touches(dev, c.flags & COWD_CREATE_TOUCH, c.touch_file, c.touch_bits,
				 &dev->touch);
	if (err)
		goto out_files;

	err = -ENOMEM;
	dev->buckets = kvcalloc(1U << dev->hash_bits, sizeof(*dev->buckets), GFP_KERNEL);
	if (!dev->buckets)
		goto out_files;

	mutex_lock(&cowd_ctl_mutex);
	err = idr_alloc(&cowd_idr, dev, 0, 1 << (MINORBITS - COWD_PART_SHIFT), GFP_KERNEL);
	mutex_unlock(&cowd_ctl_mutex);
	if (err < 0)
		goto out_buckets;
	dev->index = err;

	dev->tag_set.ops = &cowd_mq_ops;
	dev->tag_set.nr_hw_queues = 1;
	dev->tag_set.queue_depth = c.queue_depth ?: COWD_DEFAULT_DEPTH;
	dev->tag_set.numa_node = NUMA_NO_NODE;
	dev->tag_set.cmd_size = struct_size((struct cowd_cmd *)NULL, pieces, COWD_MAX_PIECES);
	/* no I/O scheduler by default, like loop: the files below have their own */
	dev->tag_set.flags = BLK_MQ_F_SHOULD_MERGE | BLK_MQ_F_NO_SCHED_BY_DEFAULT;
	dev->tag_set.driver_data = dev;
	err = blk_mq_alloc_tag_set(&dev->tag_set);
	if (err)
		goto out_idr;

	disk = blk_mq_alloc_disk(&dev->tag_set, dev);
	if (IS_ERR(disk)) {
		err = PTR_ERR(disk);
		goto out_tags;
	}
	dev->disk = disk;
	/*
	 * A request needs every cluster it touches in the table at once: at most half of it, so
	 * that a miss's read-ahead and other misses' remaps leave room.  An unaligned request of
	 * max_io bytes touches one cluster more than it covers.
	 */
	max_clusters = min_t(u32, COWD_MAX_PIECES, dev->max_entries / 2) - 1;
	max_io = min_t(u64, COWD_MAX_DATA_BYTES, (u64)max_clusters << c.cluster_bits);
	blk_queue_logical_block_size(disk->queue, dev->lbs);
	blk_queue_physical_block_size(disk->queue, max_t(u32, dev->lbs, 4096));
	blk_queue_io_min(disk->queue, min_t(u32, 1U << c.cluster_bits, 65536));
	blk_queue_max_hw_sectors(disk->queue, max_io >> SECTOR_SHIFT);
	blk_queue_write_cache(disk->queue, true, false);
	blk_queue_flag_set(QUEUE_FLAG_NONROT, disk->queue);
	if (!dev->readonly) {
		blk_queue_max_discard_sectors(disk->queue, UINT_MAX >> SECTOR_SHIFT);
		blk_queue_max_write_zeroes_sectors(disk->queue, UINT_MAX >> SECTOR_SHIFT);
		disk->queue->limits.discard_granularity = 1U << c.cluster_bits;
	}
	disk->major = cowd_major;
	disk->first_minor = dev->index << COWD_PART_SHIFT;
	disk->minors = 1 << COWD_PART_SHIFT;
	disk->fops = &cowd_bdev_fops;
	disk->private_data = dev;
	snprintf(disk->disk_name, DISK_NAME_LEN, COWD_DISK_NAME "%d", dev->index);
	set_capacity(disk, dev->size >> SECTOR_SHIFT);
	set_disk_ro(disk, dev->readonly);

	err = -ENOMEM;
	dev->wq = alloc_workqueue("cowd%d", WQ_UNBOUND | WQ_MEM_RECLAIM, 0, dev->index);
	if (!dev->wq)
		goto out_disk;

	chan = cowd_new_channel(dev, &fd);
	if (IS_ERR(chan)) {
		err = PTR_ERR(chan);
		goto out_wq;
	}
	c.index = dev->index;
	c.channel_fd = fd;
	if (copy_to_user(uarg, &c, sizeof(c))) {
		err = -EFAULT;
		goto out_chan;
	}
	/*
	 * No partition scan inside add_disk(): its reads would be misses that the daemon, blocked
	 * in this ioctl, cannot answer.  Partitions are enabled once the disk is live; the daemon
	 * asks for the scan (BLKRRPART) when it serves the channel.
	 */
	disk->flags |= GENHD_FL_NO_PART;
	err = add_disk(disk);
	if (err)
		goto out_chan;
	disk->flags &= ~GENHD_FL_NO_PART;
	fd_install(fd, chan);
	return 0;

out_chan:
	spin_lock(&dev->lock);
	dev->state = COWD_REMOVED;	/* release must not arm the timeout */
	spin_unlock(&dev->lock);
	put_unused_fd(fd);
	fput(chan);
out_wq:
	destroy_workqueue(dev->wq);
out_disk:
	put_disk(disk);
out_tags:
	blk_mq_free_tag_set(&dev->tag_set);
out_idr:
	mutex_lock(&cowd_ctl_mutex);
	idr_remove(&cowd_idr, dev->index);
	mutex_unlock(&cowd_ctl_mutex);
out_buckets:
	kvfree(dev->buckets);
out_files:
	cowd_free_touches(&dev->touch);
	cowd_put_files(dev);
	kref_put(&dev->ref, cowd_free);
	return err;
}

static int cowd_ctl_remove(struct cowd_remove __user *uarg)
{
	struct cowd_remove r;
	struct cowd_dev *dev;

	if (copy_from_user(&r, uarg, sizeof(r)))
		return -EFAULT;
	if (r.size != sizeof(r) || r.version < COWD_ABI_MIN_VERSION ||
	    r.version > COWD_ABI_VERSION || r.flags & ~COWD_REMOVE_FLAGS ||
	    r.reserved[0] || r.reserved[1])
		return -EINVAL;
	mutex_lock(&cowd_ctl_mutex);
	dev = idr_find(&cowd_idr, r.index);
	if (!dev) {
		mutex_unlock(&cowd_ctl_mutex);
		return -ENODEV;
	}
	if (disk_openers(dev->disk) && !(r.flags & COWD_REMOVE_FORCE)) {
		mutex_unlock(&cowd_ctl_mutex);
		return -EBUSY;
	}
	idr_remove(&cowd_idr, r.index);
	mutex_unlock(&cowd_ctl_mutex);
	cowd_teardown(dev);
	return 0;
}

static int cowd_ctl_reopen(struct cowd_reopen __user *uarg)
{
	struct cowd_touches touch;
	struct cowd_reopen r;
	struct cowd_dev *dev;
	struct file *chan;
	int fd, err;

	if (copy_from_user(&r, uarg, sizeof(r)))
		return -EFAULT;
	if (r.size != sizeof(r) || r.version < COWD_ABI_MIN_VERSION ||
	    r.version > COWD_ABI_VERSION || r.flags & ~COWD_REOPEN_FLAGS || r.reserved0 ||
	    r.reserved[0] || r.channel_fd || r.disk_size || r.cluster_bits || r.nr_files)
		return -EINVAL;
	if (r.flags & COWD_REOPEN_TOUCH ?
	    (r.version < 2 || r.touch_bits < COWD_MIN_TOUCH_BITS ||
	     r.touch_bits > COWD_MAX_TOUCH_BITS) :
	    (r.touch_file || r.touch_bits))
		return -EINVAL;
	mutex_lock(&cowd_ctl_mutex);	/* held throughout: removal cannot run meanwhile */
	dev = idr_find(&cowd_idr, r.index);
	err = -ENODEV;
	if (!dev)
		goto out;
	spin_lock(&dev->lock);
	err = -EBUSY;
	if (dev->chan_open) {
		spin_unlock(&dev->lock);
		goto out;
	}
	dev->chan_open = true;
	spin_unlock(&dev->lock);
	cancel_delayed_work_sync(&dev->timeout_work);

	/*
	 * Forget the old daemon's pool and pins, then its remaps, then let mapped I/O already
	 * started finish (an allocation among it installs nothing: a new pool epoch).
	 */
	cowd_reset_pool(dev);
	cowd_invalidate_range(dev, 0, U64_MAX);
	cowd_drain_mapped(dev);
	spin_lock(&dev->lock);
	if (dev->write_gen > dev->flushed_gen)
		dev->lost_writes = true;
	spin_unlock(&dev->lock);

	err = -EINVAL;
	if (r.touch_file >= dev->nr_files)
		goto out_closed;
	err = cowd_alloc_touches(dev, r.flags & COWD_REOPEN_TOUCH, r.touch_file, r.touch_bits,
				 &touch);
	if (err)
		goto out_closed;
	chan = cowd_new_channel(dev, &fd);
	if (IS_ERR(chan)) {
		err = PTR_ERR(chan);
		cowd_free_touches(&touch);
		goto out_closed;
	}
	r.channel_fd = fd;
	r.disk_size = dev->size;
	r.cluster_bits = dev->cluster_bits;
	r.nr_files = dev->nr_files;
	if (copy_to_user(uarg, &r, sizeof(r))) {
		put_unused_fd(fd);
		fput(chan);	/* its release marks the device orphaned again */
		cowd_free_touches(&touch);
		err = -EFAULT;
		goto out;
	}
	spin_lock(&dev->lock);
	dev->chan_version = r.version;
	dev->state = COWD_LIVE;
	dev->stats.takeovers++;
	cowd_swap_touches(dev, &touch);
	spin_unlock(&dev->lock);
	cowd_free_touches(&touch);	/* none: the old channel's release stopped it */
	fd_install(fd, chan);
	wake_up_interruptible(&dev->chan_wait);
	err = 0;
	goto out;
out_closed:
	spin_lock(&dev->lock);
	dev->chan_open = false;
	if (dev->state == COWD_ORPHAN)
		schedule_delayed_work(&dev->timeout_work, msecs_to_jiffies(dev->timeout_ms));
	spin_unlock(&dev->lock);
out:
	mutex_unlock(&cowd_ctl_mutex);
	return err;
}

static int cowd_ctl_version(struct cowd_version __user *uarg)
{
	struct cowd_version v;
	u32 version;

	if (copy_from_user(&v, uarg, sizeof(v)))
		return -EFAULT;
	if (v.size != sizeof(v) || v.version < COWD_ABI_MIN_VERSION ||
	    v.version > COWD_ABI_VERSION)
		return -EINVAL;
	version = v.version;
	memset(&v, 0, sizeof(v));
	v.size = sizeof(v);
	v.version = version;
	v.abi_version = COWD_ABI_VERSION;
	v.features = version >= 2 ? COWD_FEATURES : COWD_FEATURES_V1;
	strscpy(v.module_version, COWD_MODULE_VERSION, sizeof(v.module_version));
	return copy_to_user(uarg, &v, sizeof(v)) ? -EFAULT : 0;
}

static long cowd_ctl_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	void __user *uarg = (void __user *)arg;

	switch (cmd) {
	case COWD_CTL_VERSION:
		return cowd_ctl_version(uarg);
	case COWD_CTL_CREATE:
		if (!capable(CAP_SYS_ADMIN))
			return -EPERM;
		return cowd_ctl_create(uarg);
	case COWD_CTL_REMOVE:
		if (!capable(CAP_SYS_ADMIN))
			return -EPERM;
		return cowd_ctl_remove(uarg);
	case COWD_CTL_REOPEN:
		if (!capable(CAP_SYS_ADMIN))
			return -EPERM;
		return cowd_ctl_reopen(uarg);
	default:
		return -ENOTTY;
	}
}

static const struct file_operations cowd_ctl_fops = {
	.owner = THIS_MODULE,
	.open = nonseekable_open,
	.unlocked_ioctl = cowd_ctl_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = noop_llseek,
};

static struct miscdevice cowd_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = COWD_CTL_NAME,
	.fops = &cowd_ctl_fops,
};

static int __init cowd_init(void)
{
	int err;

	cowd_entry_cache = KMEM_CACHE(cowd_entry, 0);
	if (!cowd_entry_cache)
		return -ENOMEM;
	cowd_major = register_blkdev(0, COWD_DISK_NAME);
	if (cowd_major < 0) {
		err = cowd_major;
		goto out_cache;
	}
	err = misc_register(&cowd_misc);
	if (err)
		goto out_blkdev;
	pr_info("cowd: version %s, ABI %d\n", COWD_MODULE_VERSION, COWD_ABI_VERSION);
	return 0;

out_blkdev:
	unregister_blkdev(cowd_major, COWD_DISK_NAME);
out_cache:
	kmem_cache_destroy(cowd_entry_cache);
	return err;
}

static void __exit cowd_exit(void)
{
	struct cowd_dev *dev;
	int id;

	misc_deregister(&cowd_misc);
	/* No channel or disk is open (each holds a module reference), so nothing waits. */
	mutex_lock(&cowd_ctl_mutex);
	idr_for_each_entry(&cowd_idr, dev, id) {
		idr_remove(&cowd_idr, id);
		mutex_unlock(&cowd_ctl_mutex);
		cowd_teardown(dev);
		mutex_lock(&cowd_ctl_mutex);
	}
	mutex_unlock(&cowd_ctl_mutex);
	idr_destroy(&cowd_idr);
	unregister_blkdev(cowd_major, COWD_DISK_NAME);
	kmem_cache_destroy(cowd_entry_cache);
}

module_init(cowd_init);
module_exit(cowd_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("cowd: copy-on-write block devices with an in-kernel remap table");
MODULE_VERSION(COWD_MODULE_VERSION);
