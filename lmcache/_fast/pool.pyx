# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The L1 memory pool: one arena, mapped once, carved into slabs of equal-size slots.

Why slabs: the objects of one model all have the same size (one chunk of KV pages), and a
server holds few models at once. The arena is cut into slabs of ``slab_bytes``; a slab serves
one slot size at a time and goes back to the free slabs when its last slot is freed, so sizes
can trade memory. Allocation and free are O(1).

The promise: ``alloc(n)`` succeeds whenever a slab of n's slot size has a free slot or a whole
slab is free. It fails otherwise (the L1 cache then evicts objects of that size, or frees
whole slabs, and retries).

Slots are 64-byte aligned, and 4 KiB aligned for objects of 64 KiB or more. The arena is
anonymous memory or, when ``shm_name`` is given, a named POSIX SHM segment that other
processes can map. It is pre-faulted slab by slab in a background thread so that start-up is
instant and stores never page-fault; a store that needs a slab the thread has not reached
yet faults that slab itself.

Not thread-safe for alloc/free: its owner (L1Cache) serializes them.
"""

import os
import threading

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_FillInfo
from libc.stdint cimport int32_t, int64_t, uint8_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset
from posix.fcntl cimport O_CREAT, O_EXCL, O_RDWR
from posix.mman cimport MAP_ANONYMOUS, MAP_FAILED, MAP_NORESERVE, MAP_PRIVATE, MAP_SHARED
from posix.mman cimport PROT_READ, PROT_WRITE, madvise, mmap, munmap, shm_open, shm_unlink
from posix.unistd cimport close, ftruncate

cdef extern from *:
    """
    #include <errno.h>
    #include <sys/mman.h>
    #ifndef MADV_POPULATE_WRITE
    #define MADV_POPULATE_WRITE 23
    #endif
    #ifndef MADV_HUGEPAGE
    #define MADV_HUGEPAGE 14
    #endif
    /* Faults in [p, p+n) without changing its bytes; touches pages on kernels before 5.14.
       Works in 4 MiB steps: populating holds the process's mmap lock, and other threads
       (the server answering its first requests) need it too. */
    static int lm_populate(uint8_t *p, size_t n) {
        const size_t step = (size_t)4 << 20;
        for (size_t done = 0; done < n; done += step) {
            size_t len = n - done < step ? n - done : step;
            if (madvise(p + done, len, MADV_POPULATE_WRITE) == 0) continue;
            if (errno != EINVAL) return -1;
            for (size_t off = 0; off < len; off += 4096) ((volatile uint8_t *)(p + done))[off] = 0;
        }
        return 0;
    }
    """
    int lm_populate(uint8_t *p, size_t n) nogil
    int MADV_HUGEPAGE

DEF SMALL_ALIGN = 64
DEF PAGE = 4096
DEF LARGE_OBJECT = 65536

# slab fault states
DEF UNFAULTED = 0
DEF FAULTING = 1
DEF FAULTED = 2


def slot_size(Py_ssize_t nbytes):
    """The slot an object of ``nbytes`` occupies (its size rounded up to its alignment)."""
    cdef Py_ssize_t align = PAGE if nbytes >= LARGE_OBJECT else SMALL_ALIGN
    return (nbytes + align - 1) // align * align


def default_slab_bytes(Py_ssize_t size):
    """A power of two near size/8, between 4 KiB and 256 MiB: enough slabs to share, big enough
    for one chunk of a large model's KV (about 126 MiB for a 405B model at 256 tokens)."""
    cdef Py_ssize_t slab = PAGE
    while slab * 2 <= size // 8 and slab < (256 << 20):
        slab *= 2
    return slab


cdef class MemoryPool:
    cdef uint8_t *base
    cdef readonly Py_ssize_t size          # bytes mapped
    cdef readonly Py_ssize_t slab_bytes
    cdef readonly int n_slabs
    cdef readonly object shm_name
    cdef int exports
    # per slab
    cdef int32_t *slab_class      # class id, or -1 when the slab is free
    cdef int32_t *slab_used       # allocated slots
    cdef int32_t *slab_touched    # slots ever handed out (the rest are implicitly free)
    cdef int32_t *slab_free_top   # entries in the slab's free stack
    cdef int32_t **slab_stack     # free slot indexes
    cdef uint8_t **slab_live      # one byte per slot: 1 when allocated (catches double frees)
    cdef int32_t *slab_prev       # doubly linked list of a class's partially free slabs
    cdef int32_t *slab_next
    cdef uint8_t *slab_fault
    cdef int32_t *free_slabs      # stack of free slab indexes, lowest index on top
    cdef int n_free_slabs
    # per class (slot size)
    cdef dict class_of_slot        # slot size -> class id
    cdef list class_slot           # class id -> slot size
    cdef list class_partial        # class id -> first partially free slab, or -1
    cdef list class_slabs          # class id -> slabs held
    cdef readonly Py_ssize_t allocated_bytes   # bytes of slots handed out
    cdef readonly Py_ssize_t allocations
    cdef object _fault_lock
    cdef object _fault_done
    cdef object _prefault_thread
    cdef bint _stopping

    def __cinit__(self):
        self.base = NULL

    def __init__(self, Py_ssize_t size, Py_ssize_t slab_bytes=0, shm_name=None, bint prefault=True):
        if size < PAGE:
            raise ValueError(f"pool size must be at least {PAGE} bytes (got {size})")
        if slab_bytes <= 0:
            slab_bytes = default_slab_bytes(size)
        if slab_bytes % PAGE:
            raise ValueError(f"slab_bytes must be a multiple of {PAGE} (got {slab_bytes})")
        self.slab_bytes = slab_bytes
        self.n_slabs = size // slab_bytes
        if self.n_slabs == 0:
            raise ValueError(f"pool of {size} bytes holds no slab of {slab_bytes} bytes")
        self.size = self.n_slabs * slab_bytes
        self.shm_name = shm_name
        self._map()
        n = self.n_slabs
        self.slab_class = <int32_t *>calloc(n, sizeof(int32_t))
        self.slab_used = <int32_t *>calloc(n, sizeof(int32_t))
        self.slab_touched = <int32_t *>calloc(n, sizeof(int32_t))
        self.slab_free_top = <int32_t *>calloc(n, sizeof(int32_t))
        self.slab_stack = <int32_t **>calloc(n, sizeof(int32_t *))
        self.slab_live = <uint8_t **>calloc(n, sizeof(uint8_t *))
        self.slab_prev = <int32_t *>calloc(n, sizeof(int32_t))
        self.slab_next = <int32_t *>calloc(n, sizeof(int32_t))
        self.slab_fault = <uint8_t *>calloc(n, sizeof(uint8_t))
        self.free_slabs = <int32_t *>calloc(n, sizeof(int32_t))
        if (self.slab_class == NULL or self.slab_used == NULL or self.slab_touched == NULL
                or self.slab_free_top == NULL or self.slab_stack == NULL or self.slab_live == NULL
                or self.slab_prev == NULL or self.slab_next == NULL or self.slab_fault == NULL
                or self.free_slabs == NULL):
            raise MemoryError()
        cdef int i
        for i in range(n):
            self.slab_class[i] = -1
            self.free_slabs[i] = n - 1 - i
        self.n_free_slabs = n
        self.class_of_slot = {}
        self.class_slot = []
        self.class_partial = []
        self.class_slabs = []
        self._fault_lock = threading.Lock()
        self._fault_done = threading.Condition(self._fault_lock)
        if prefault:
            self.start_prefault()

    def start_prefault(self):
        """Faults the arena in, slab by slab, on a background thread (once)."""
        if self._prefault_thread is None:
            self._prefault_thread = threading.Thread(target=self._prefault_all, name="lmcache-prefault", daemon=True)
            self._prefault_thread.start()

    cdef _map(self):
        cdef int fd = -1
        cdef void *p
        cdef bytes name
        if self.shm_name is None:
            p = mmap(NULL, self.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
            if p == MAP_FAILED:
                raise MemoryError(f"cannot map {self.size} bytes: {os.strerror(_errno())}")
            madvise(p, self.size, MADV_HUGEPAGE)  # fewer faults and TLB misses; advisory only
        else:
            name = os.fsencode(self.shm_name)
            fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR, 0o600)
            if fd < 0:
                raise OSError(_errno(), f"cannot create SHM segment {self.shm_name}: {os.strerror(_errno())}")
            if ftruncate(fd, self.size) != 0:
                close(fd)
                shm_unlink(name)
                raise OSError(_errno(), f"cannot size SHM segment {self.shm_name}")
            p = mmap(NULL, self.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
            close(fd)  # the mapping keeps the segment
            if p == MAP_FAILED:
                shm_unlink(name)
                raise MemoryError(f"cannot map SHM segment {self.shm_name} of {self.size} bytes")
        self.base = <uint8_t *>p

    # --- faulting -------------------------------------------------------------------------

    def _prefault_all(self):
        cdef int s
        for s in range(self.n_slabs):
            if self._stopping:
                return
            self._fault(s, False)

    cdef int _fault(self, int s, bint wait) except -1:
        """Makes slab s resident. The caller that claims it faults it; others wait if asked."""
        cdef uint8_t *p
        cdef size_t n = self.slab_bytes
        with self._fault_lock:
            if self.slab_fault[s] == FAULTED:
                return 0
            if self.slab_fault[s] == FAULTING:
                if wait:
                    while self.slab_fault[s] != FAULTED:
                        self._fault_done.wait()
                return 0
            self.slab_fault[s] = FAULTING
        p = self.base + <size_t>s * n
        with nogil:
            lm_populate(p, n)
        with self._fault_lock:
            self.slab_fault[s] = FAULTED
            self._fault_done.notify_all()
        return 0

    @property
    def faulted_bytes(self):
        cdef int s
        cdef Py_ssize_t total = 0
        for s in range(self.n_slabs):
            if self.slab_fault[s] == FAULTED:
                total += self.slab_bytes
        return total

    def wait_prefaulted(self, timeout=None):
        """True once the background thread has faulted the whole arena."""
        if self._prefault_thread is None:
            return True
        self._prefault_thread.join(timeout)
        return not self._prefault_thread.is_alive()

    # --- allocation -----------------------------------------------------------------------

    def alloc(self, Py_ssize_t nbytes):
        """The offset of a new slot for ``nbytes``, or -1 when the promise above cannot be kept."""
        if nbytes <= 0:
            raise ValueError(f"cannot allocate {nbytes} bytes")
        cdef Py_ssize_t slot = slot_size(nbytes)
        if slot > self.slab_bytes:
            raise ValueError(f"an object of {nbytes} bytes does not fit in a slab of {self.slab_bytes} bytes")
        cdef int cls = self._class(slot)
        cdef int s = self.class_partial[cls]
        cdef int per_slab = self.slab_bytes // slot
        cdef int idx
        if s < 0:
            if self.n_free_slabs == 0:
                return -1
            self.n_free_slabs -= 1
            s = self.free_slabs[self.n_free_slabs]
            self._adopt(s, cls, per_slab)
            self._fault(s, True)
        if self.slab_free_top[s] > 0:
            self.slab_free_top[s] -= 1
            idx = self.slab_stack[s][self.slab_free_top[s]]
        else:
            idx = self.slab_touched[s]
            self.slab_touched[s] += 1
        self.slab_live[s][idx] = 1
        self.slab_used[s] += 1
        if self.slab_used[s] == per_slab:
            self._unlink(s, cls)
        self.allocated_bytes += slot
        self.allocations += 1
        return <Py_ssize_t>s * self.slab_bytes + <Py_ssize_t>idx * slot

    def free(self, Py_ssize_t offset, Py_ssize_t nbytes):
        """Returns the slot at ``offset`` (allocated for ``nbytes``); refuses anything else."""
        cdef Py_ssize_t slot = slot_size(nbytes) if nbytes > 0 else 0
        if offset < 0 or offset >= self.size or slot == 0:
            raise ValueError(f"no slot at offset {offset} for {nbytes} bytes")
        cdef int s = offset // self.slab_bytes
        cdef int cls = self.slab_class[s]
        if cls < 0 or self.class_slot[cls] != slot or (offset - <Py_ssize_t>s * self.slab_bytes) % slot:
            raise ValueError(f"no slot at offset {offset} for {nbytes} bytes")
        cdef int idx = (offset - <Py_ssize_t>s * self.slab_bytes) // slot
        cdef int per_slab = self.slab_bytes // slot
        if idx >= self.slab_touched[s] or not self.slab_live[s][idx]:
            raise ValueError(f"slot at offset {offset} is not allocated (double free?)")
        self.slab_live[s][idx] = 0
        if self.slab_used[s] == per_slab:
            self._link(s, cls)
        self.slab_used[s] -= 1
        self.allocated_bytes -= slot
        self.allocations -= 1
        if self.slab_used[s] == 0:
            self._unlink(s, cls)
            self._release(s, cls)
        else:
            self.slab_stack[s][self.slab_free_top[s]] = idx
            self.slab_free_top[s] += 1

    cdef int _class(self, Py_ssize_t slot) except -1:
        cls = self.class_of_slot.get(slot)
        if cls is None:
            cls = len(self.class_slot)
            self.class_of_slot[slot] = cls
            self.class_slot.append(slot)
            self.class_partial.append(-1)
            self.class_slabs.append(0)
        return cls

    cdef int _adopt(self, int s, int cls, int per_slab) except -1:
        self.slab_stack[s] = <int32_t *>calloc(per_slab, sizeof(int32_t))
        self.slab_live[s] = <uint8_t *>calloc(per_slab, sizeof(uint8_t))
        if self.slab_stack[s] == NULL or self.slab_live[s] == NULL:
            raise MemoryError()
        self.slab_class[s] = cls
        self.slab_used[s] = 0
        self.slab_touched[s] = 0
        self.slab_free_top[s] = 0
        self.class_slabs[cls] += 1
        self._link(s, cls)
        return 0

    cdef void _release(self, int s, int cls):
        free(self.slab_stack[s])
        free(self.slab_live[s])
        self.slab_stack[s] = NULL
        self.slab_live[s] = NULL
        self.slab_class[s] = -1
        self.class_slabs[cls] -= 1
        self.free_slabs[self.n_free_slabs] = s
        self.n_free_slabs += 1

    cdef void _link(self, int s, int cls):
        cdef int head = self.class_partial[cls]
        self.slab_prev[s] = -1
        self.slab_next[s] = head
        if head >= 0:
            self.slab_prev[head] = s
        self.class_partial[cls] = s

    cdef void _unlink(self, int s, int cls):
        if self.slab_prev[s] >= 0:
            self.slab_next[self.slab_prev[s]] = self.slab_next[s]
        else:
            self.class_partial[cls] = self.slab_next[s]
        if self.slab_next[s] >= 0:
            self.slab_prev[self.slab_next[s]] = self.slab_prev[s]
        self.slab_prev[s] = -1
        self.slab_next[s] = -1

    # --- figures and access ---------------------------------------------------------------

    def free_slots(self, Py_ssize_t nbytes):
        """Slots of nbytes's size that alloc can hand out without evicting anything."""
        cdef Py_ssize_t slot = slot_size(nbytes)
        cdef Py_ssize_t per_slab = self.slab_bytes // slot
        cdef Py_ssize_t total = self.n_free_slabs * per_slab
        cls = self.class_of_slot.get(slot)
        cdef int s
        if cls is not None:
            s = self.class_partial[cls]
            while s >= 0:
                total += per_slab - self.slab_used[s]
                s = self.slab_next[s]
        return total

    @property
    def free_slab_count(self):
        return self.n_free_slabs

    def stats(self):
        return {
            "capacity_bytes": self.size,
            "allocated_bytes": self.allocated_bytes,
            "allocations": self.allocations,
            "slab_bytes": self.slab_bytes,
            "slabs": self.n_slabs,
            "free_slabs": self.n_free_slabs,
            "prefaulted_bytes": self.faulted_bytes,
            "shm_name": self.shm_name,
            "size_classes": {
                str(slot): {"slabs": self.class_slabs[cls]}
                for slot, cls in self.class_of_slot.items() if self.class_slabs[cls]
            },
        }

    @property
    def address(self):
        """The arena's base address (for kernels that take raw pointers)."""
        return <Py_ssize_t>self.base

    def view(self, Py_ssize_t offset, Py_ssize_t nbytes):
        """A writable memoryview of [offset, offset + nbytes)."""
        if self.base == NULL:
            raise ValueError("pool is closed")
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ValueError(f"range [{offset}, {offset + nbytes}) is outside the pool")
        return memoryview(self)[offset:offset + nbytes]

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        if self.base == NULL:
            raise ValueError("pool is closed")
        PyBuffer_FillInfo(buffer, self, self.base, self.size, 0, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self.exports -= 1

    def close(self):
        """Unmaps the arena and unlinks its SHM segment. Refused while views are alive."""
        if self.base == NULL:
            return
        if self.exports:
            raise BufferError(f"{self.exports} view(s) of the pool are still alive")
        self._stopping = True
        if self._prefault_thread is not None:
            self._prefault_thread.join()
        munmap(self.base, self.size)
        self.base = NULL
        if self.shm_name is not None:
            shm_unlink(os.fsencode(self.shm_name))

    @property
    def closed(self):
        return self.base == NULL

    def __dealloc__(self):
        cdef int s
        if self.base != NULL and self.exports == 0:
            munmap(self.base, self.size)
            if self.shm_name is not None:
                shm_unlink(os.fsencode(self.shm_name))
        if self.slab_stack != NULL:
            for s in range(self.n_slabs):
                free(self.slab_stack[s])
                free(self.slab_live[s])
        free(self.slab_class); free(self.slab_used); free(self.slab_touched)
        free(self.slab_free_top); free(self.slab_stack); free(self.slab_live)
        free(self.slab_prev); free(self.slab_next); free(self.slab_fault); free(self.free_slabs)


cdef extern from "errno.h":
    int errno

cdef int _errno():
    return errno
