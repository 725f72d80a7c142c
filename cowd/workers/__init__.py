"""Layer: cowd workers — the daemon's data path on every core.

One Python process serves about one core's worth of requests.  To use the others, the daemon
(the *control plane*) hands its frontends' connections to worker processes and keeps for
itself only what must have one owner: every disk's metadata.

Theory of operation
-------------------
The control plane is the daemon as it always was: it opens each disk's chain (formats/, the
:class:`~cowd.disk.ImagePool`, the shared :class:`~cowd.remap.RemapCache`), allocates, writes
metadata, flushes, and answers the control socket.  It accepts NBD connections and hands each
one (its file descriptor, over SCM_RIGHTS) to a worker, least loaded first.  A worker
negotiates and serves the connection whole (:mod:`cowd.frontends.nbd.server`, unchanged) over
a :class:`~cowd.workers.mapped.MappedDisk`: a disk that does the I/O of mapped ranges itself
and asks the control plane for everything else, the way the kernel shim (kmod/) does for
/dev/cowdN.  The two talk over one socketpair per worker (:mod:`cowd.workers.wire`).

The contract: what a worker may do without asking
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A worker holds, per disk, the chain's open files (passed once) and a bounded table of
*remaps*: guest granule -> runs of (file, file offset, writable) or zero, filled only by the
control plane (answers to misses, read-ahead, priming).  With them it may, and may only:

1. read a guest range whose granules are all in its table (pread of the runs, zeroes for zero
   runs), and advise the kernel of such reads (posix_fadvise);
2. write a guest range whose granules are all in its table as *writable* DATA (pwrite in
   place: the clusters belong to the top layer alone, qcow2's COPIED, so no metadata changes);
3. write whole granules that are in its table but not writable into clusters the control
   plane *lent* it (LEND: free clusters of the top file, refcounted, that no entry reaches),
   one lent cluster per granule, written whole (so no copy-up), and then ask the control
   plane to ADOPT them — to map them as an allocation of its own would be mapped — and
   answer the client only after that reply.  Only where the top layer can lend
   (cowd/disk/lending.py: a writable qcow2 overlay without a data file) and its granule is
   one cluster (DiskSpec.lend_file);
4. with extended L2 (DiskSpec.unit: the subcluster), write whole subclusters that its table
   shows are not the top layer's at their place in a host cluster — the guest cluster's own
   (known from a writable run of the granule) or a lent one (one per guest cluster, shared
   by the writes under way there) — and then ask the control plane to adopt them
   (ADOPT_UNITS, one message for every such write waiting), answering each client only
   after that reply says its runs were adopted.  A refused run (the image changed there
   since the worker looked: formats/qcow2/lend.py, "Subclusters") makes the write go to the
   control plane whole, which writes it over whatever the worker's pwrite left.  On the
   reply, and on ADOPTED for another worker's, it applies the adopted runs to the table
   entries it still holds (MappedDisk._apply_adopted), instead of being invalidated.

Everything else goes to the control plane: a read or write touching a granule it has no remap
for (a MISS: the answer is remaps, then the worker tries again; a granule that cannot be
remapped, such as a compressed cluster, is answered with its data), and every request that may
change metadata or durability — any other write to anything not writable in place (it carries
its data: the control plane allocates, copies up and writes in one step, as it does for its
own frontends), write-zeroes, trim, flush, block status, cache.

What the control plane promises in return
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
- *Ordering.*  Remaps are computed and queued for a worker in one synchronous step, and a
  worker's channel is a FIFO: a remap computed before a change never arrives after the
  invalidation that the change sent.
- *Invalidation before change.*  Before anything that changes or frees the top layer's mapping
  of a range (an allocating write, write-zeroes, trim), the control plane sends INVALIDATE for
  the range to every worker that holds remaps of that disk, and — for every worker but the one
  whose request it is — waits for its acknowledgement before it changes anything.  A worker
  acknowledges once it has dropped the range; its mapped I/O never spans an await, so none
  using the old remaps is in flight then.  The requesting worker needs no wait: the
  invalidation reaches it before the reply to its request does.  So a freed cluster is never
  written through a stale remap (it cannot even be reused before the next flush, qcow2's rule
  4), and a read on any connection after a write's reply sees the write (NBD multi-conn).
  The one exception is a batch of subclusters adopted (ADOPT_UNITS): nothing is freed and
  nothing goes stale but "not yet the top's", so the control plane adopts them inside the
  change gate and then sends every other holder ADOPTED with them, waiting for their
  acknowledgements before it replies; a worker applies them to the entries it holds then.
- *Durability.*  A worker's in-place writes go to the same files through the same page cache;
  the control plane's flush (fdatasync, then metadata) covers every write that completed
  before the flush was asked for, on any worker.  FUA is an in-place write and then a flush.
  An adopted cluster is an allocation like the control plane's own: its L2 entry is written
  by the next flush, after the sync that makes its data durable (formats/qcow2/lend.py).
- *Lent clusters.*  The control plane records what it lent each worker and frees what was
  never adopted once the worker can no longer write it: when it died, after it dropped the
  disk (it answered a query sent after DISK_GONE), at the daemon's stop — and before every
  flush a worker asks for, it takes back (RECLAIM) what the workers hold unwritten, so a
  daemon killed after a flush leaves no leaked cluster.

Failure
~~~~~~~
A killed worker loses nothing acknowledged: its acknowledged writes are in the page cache (or
durable, after a flush, which the control plane did) and its first writes were adopted before
they were acknowledged; its connections drop, the control plane forgets its remaps, frees
the clusters it was lent and did not write, and starts a new worker.  A daemon killed between
a LEND and the next flush leaks the lent clusters that no write took (``cowd check --repair``
frees them), as it leaks its own reserved batch (formats/qcow2's rule 1).  Workers end with
the control plane: its death closes their channel, and they exit at its end of file.

Modules
-------
- :mod:`~cowd.workers.wire`: the channel's messages, sans-I/O (bytes in, messages out).
- :mod:`~cowd.workers.mapped`: the worker side of a disk (:class:`MappedDisk`) and its table.
- :mod:`~cowd.workers.worker`: the worker process (``python -m cowd.workers.worker``).
- :mod:`~cowd.workers.host`: the control plane's side: starting, feeding and restarting
  workers, answering their misses and requests with :class:`~cowd.disk.Disk`.
"""
