/* segment.c -- creating, validating, attaching and describing a segment.
 *
 * Invariants:
 *  - The creator opened the object with O_CREAT|O_EXCL and mode 0600
 *    (posix_ipc, in Python) and reserves all memory with posix_fallocate
 *    before touching it, so a full /dev/shm is ENOSPC here and never a SIGBUS
 *    later.  Everything except init_state is written before init_state becomes
 *    INIT_READY (store_release); attachers read the header only after seeing
 *    INIT_READY (load_acquire): the pair orders the whole initialisation.
 *  - The creator initialises the object under a private temporary name
 *    ("/shmstm.<name>.init-<pid>-<random>", shmstm/shm/segments.py) and only then
 *    links it to "/shmstm.<name>", so the runtime's name never refers to a
 *    half-initialised segment made by this version: a creator killed half-way
 *    leaves only its temporary name (removed by shmstm-cleanup), and the next
 *    opener simply creates the runtime.
 *  - For an object initialised in place by anyone else (or an older build), an
 *    attacher waits a bounded time for INIT_READY, and fails at once when the
 *    kernel says the creator (creator_pid + creator_start) is gone: a creator
 *    killed half-way never hangs it (SHMSTM_EINIT).  creator_pid/start are
 *    plain fields written once before INIT_READY; the waiting attacher reads
 *    them with relaxed atomic loads (a word-sized, aligned read: at worst it
 *    sees 0 and keeps waiting).
 *  - The geometry (limits, offsets, size) is recomputed from the limits in the
 *    header and must match the stored offsets exactly; the segment struct then
 *    keeps private copies, used for every bounds check.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include "core.h"

/* Python reads the layout version through shmstm.h (stats, error messages). */
_Static_assert(SHMSTM_LAYOUT_VERSION_ == SHMSTM_LAYOUT_VERSION,
               "SHMSTM_LAYOUT_VERSION_ (shmstm.h) differs from layout.h");
_Static_assert(SHMSTM_LOST_OWNER == LK_LOST_OWNER, "shmstm.h and layout.h disagree");

#define MIN_HEAP (64u * 1024u)
#define MAX_HEAP (1ull << 36)            /* 32-bit unit offsets in free-list heads */
#define MAX_TVARS (1u << 24)
#define MAX_PROCS 4096u                  /* 16 owner bits in a lock word; 4096 keeps scans cheap */
#define MAX_VALUE (1u << 30)
/* The same numbers for Python (shmstm.h): it never repeats a layout number. */
_Static_assert(SHMSTM_MIN_HEAP == MIN_HEAP && SHMSTM_MAX_HEAP == MAX_HEAP &&
               SHMSTM_MAX_TVARS == MAX_TVARS && SHMSTM_MAX_PROCS == MAX_PROCS &&
               SHMSTM_MAX_VALUE == MAX_VALUE && SHMSTM_HEAP_UNIT == SHMSTM_UNIT,
               "shmstm.h and segment.c disagree on the limits");

static uint64_t round_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

static uint32_t next_pow2(uint64_t x)
{
    uint32_t p = 64;
    while (p < x)
        p <<= 1;
    return p;
}

struct geometry {
    uint64_t off_procs, off_tvars, off_dir, off_ring, off_heap, seg_size;
    uint32_t dir_slots;
};

static int check_limits(uint32_t max_tvars, uint32_t max_procs, uint32_t max_value_size,
                        uint64_t heap_size)
{
    if (max_tvars < 1 || max_tvars > MAX_TVARS)
        return SHMSTM_EINVAL;
    if (max_procs < 1 || max_procs > MAX_PROCS)
        return SHMSTM_EINVAL;
    if (heap_size < MIN_HEAP || heap_size > MAX_HEAP || heap_size % SHMSTM_UNIT)
        return SHMSTM_EINVAL;
    if (max_value_size < 1 || max_value_size > heap_size / 2 || max_value_size > MAX_VALUE)
        return SHMSTM_EINVAL;
    return 0;
}

static void compute_geometry(uint32_t max_tvars, uint32_t max_procs, uint64_t heap_size,
                             uint32_t ring_slots, struct geometry *g)
{
    uint64_t off = round_up(sizeof(struct shm_header), SHMSTM_CACHELINE);
    g->off_procs = off;
    off += (uint64_t)max_procs * sizeof(struct shm_proc);
    g->off_tvars = off = round_up(off, SHMSTM_CACHELINE);
    off += (uint64_t)max_tvars * sizeof(struct shm_tvar);
    g->dir_slots = next_pow2((uint64_t)max_tvars * 2);
    g->off_dir = off = round_up(off, SHMSTM_CACHELINE);
    off += (uint64_t)g->dir_slots * sizeof(struct shm_dirent);
    g->off_ring = off = round_up(off, SHMSTM_CACHELINE);
    off += (uint64_t)ring_slots * sizeof(struct shm_ring_slot);
    g->off_heap = off = round_up(off, 4096);
    off += heap_size;
    g->seg_size = round_up(off, 4096);
}

/* Geometry comes from `h`, a validated header (for attach, a private copy:
 * never a re-read of the shared header). */
static void fill_seg(struct shmstm_seg *s, unsigned char *base, const struct shm_header *h, int ro)
{
    s->base = base;
    s->size = h->seg_size;
    s->read_only = ro;
    pthread_mutex_init(&s->ctx_lock, NULL);
    s->ctx_head = NULL;
    s->detached = 0;
    store_relaxed(&s->refs, 1u);        /* the attachment's (shmstm_seg_detach) */
    s->h = (struct shm_header *)base;
    s->procs = (struct shm_proc *)(base + h->off_procs);
    s->tvars = (struct shm_tvar *)(base + h->off_tvars);
    s->dir = (struct shm_dirent *)(base + h->off_dir);
    s->heap = base + h->off_heap;
    s->heap_size = h->heap_size;
    s->ring_slots = h->ring_slots;
    s->ring_mask = s->ring_slots && !(s->ring_slots & (s->ring_slots - 1)) ? s->ring_slots - 1 : 0;
    s->ring = h->ring_slots ? (struct shm_ring_slot *)(base + h->off_ring) : NULL;
    s->max_tvars = h->max_tvars;
    s->max_procs = h->max_procs;
    s->max_value_size = h->max_value_size;
    s->dir_slots = h->dir_slots;
}

static void params_out(const struct shm_header *h, shmstm_params *p)
{
    p->max_tvars = h->max_tvars;
    p->max_procs = h->max_procs;
    p->max_value_size = h->max_value_size;
    p->dir_slots = h->dir_slots;
    p->heap_size = h->heap_size;
    p->ring_slots = h->ring_slots;
    p->seg_size = h->seg_size;
    p->created_ns = h->created_ns;
    p->creator_pid = h->creator_pid;
    p->layout_version = SHMSTM_LAYOUT_VERSION;
    memcpy(p->runtime_id, h->runtime_id, 16);
}

static uint64_t header_sum(const struct shm_header *h);

int shmstm_seg_create(int fd, shmstm_params *p, shmstm_seg **out)
{
    int rc = check_limits(p->max_tvars, p->max_procs, p->max_value_size, p->heap_size);
    if (rc)
        return rc;
    if (p->ring_slots && (p->ring_slots > (1u << 24) ||
                          p->ring_slots < 2u * (p->max_procs + 1u)))
        return SHMSTM_EINVAL;            /* room margin: see ring_commit.c */
    struct geometry g;
    compute_geometry(p->max_tvars, p->max_procs, p->heap_size, p->ring_slots, &g);
    /* A size beyond what the file system has free is refused before any
     * page is reserved: on tmpfs, posix_fallocate of more than the free space
     * would first take (and then give back) all of it, i.e. all free RAM.
     * posix_fallocate stays the guarantee (others may fill it meanwhile). */
    struct statvfs vfs;
    if (fstatvfs(fd, &vfs) == 0 && vfs.f_blocks != 0 &&       /* 0: a tmpfs without a size limit */
        (uint64_t)vfs.f_bavail * vfs.f_frsize < g.seg_size) {
        errno = ENOSPC;
        return SHMSTM_ENOSPC;
    }
    struct shmstm_seg *s = calloc(1, sizeof *s);
    if (!s)
        return SHMSTM_ENOMEM;
    int err = posix_fallocate(fd, 0, (off_t)g.seg_size);
    if (err) {
        free(s);
        errno = err;
        return err == ENOSPC ? SHMSTM_ENOSPC : SHMSTM_ESYS;
    }
    unsigned char *base = mmap(NULL, g.seg_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        free(s);
        return SHMSTM_ESYS;
    }
    struct shm_header *h = (struct shm_header *)base;
    /* The mapping is zero-filled: free lists empty, clock 0, slots FREE,
     * directory empty, locks unlocked at version 0.  Fill the header. */
    h->magic = SHMSTM_MAGIC;
    h->signature = layout_signature();
    h->creator_pid = (uint32_t)getpid();
    h->creator_start = proc_self_start();
    h->seg_size = g.seg_size;
    if (getrandom(h->runtime_id, 16, 0) != 16) {
        uint64_t t = realtime_ns() ^ ((uint64_t)getpid() << 32);
        memcpy(h->runtime_id, &t, 8);
        t = now_ns();
        memcpy(h->runtime_id + 8, &t, 8);
    }
    h->created_ns = realtime_ns();
    h->max_tvars = p->max_tvars;
    h->max_procs = p->max_procs;
    h->max_value_size = p->max_value_size;
    h->dir_slots = g.dir_slots;
    h->heap_size = p->heap_size;
    h->ring_slots = p->ring_slots;
    h->off_procs = g.off_procs;
    h->off_tvars = g.off_tvars;
    h->off_dir = g.off_dir;
    h->off_ring = g.off_ring;
    h->off_heap = g.off_heap;
    /* Heap offset 0 is reserved so that 0 can mean "no block" in links. */
    store_relaxed(&h->heap_bump, 64);
    fill_seg(s, base, h, 0);
    if (s->ring_slots)
        ring_init(s, p);                 /* durable: clock, stamps, runtime id */
    params_out(h, p);
    h->hdr_sum = header_sum(h);          /* after ring_init: it writes runtime_id */
    FAULT_POINT("create.before_ready");
    /* Pairs with the load_acquire of init_state in attach. */
    store_release(&h->init_state, INIT_READY);
    *out = s;
    return 0;
}

/* The checksum of a header's identity and geometry (magic .. hdr_sum), with
 * the two words that are not part of them (init_state, hdr_sum) taken as 0. */
static uint64_t header_sum(const struct shm_header *h)
{
    unsigned char img[offsetof(struct shm_header, hdr_sum) + sizeof h->hdr_sum];
    memcpy(img, h, sizeof img);
    memset(img + offsetof(struct shm_header, init_state), 0, sizeof h->init_state);
    memset(img + offsetof(struct shm_header, hdr_sum), 0, sizeof h->hdr_sum);
    return fnv1a(img, sizeof img);
}

/* Validate a header image.  file_size: the object's size (fstat). */
static int validate_header(const struct shm_header *h, uint64_t file_size)
{
    if (h->magic != SHMSTM_MAGIC)
        return SHMSTM_ELAYOUT;
    if (h->signature != layout_signature())
        return SHMSTM_ELAYOUT;
    if (h->hdr_sum != header_sum(h))
        return SHMSTM_ECORRUPT;
    if (check_limits(h->max_tvars, h->max_procs, h->max_value_size, h->heap_size))
        return SHMSTM_ECORRUPT;
    if (h->ring_slots > (1u << 24))
        return SHMSTM_ECORRUPT;
    struct geometry g;
    compute_geometry(h->max_tvars, h->max_procs, h->heap_size, h->ring_slots, &g);
    if (g.off_procs != h->off_procs || g.off_tvars != h->off_tvars || g.off_dir != h->off_dir ||
        g.off_ring != h->off_ring || g.off_heap != h->off_heap || g.seg_size != h->seg_size ||
        g.dir_slots != h->dir_slots)
        return SHMSTM_ECORRUPT;
    if (h->seg_size > file_size)
        return SHMSTM_ECORRUPT;
    return 0;
}

int shmstm_header_check(const unsigned char *hdr, uint64_t len, uint64_t file_size)
{
    struct shm_header h;
    if (len < sizeof h)
        return SHMSTM_ECORRUPT;
    memcpy(&h, hdr, sizeof h);
    /* As shmstm_seg_attach: a segment being created is not initialised yet;
     * any other state than the two is another layout (or not shmstm). */
    uint32_t is = load_relaxed(&h.init_state);
    if (is == INIT_CREATING)
        return SHMSTM_EINIT;
    if (is != INIT_READY)
        return SHMSTM_ELAYOUT;
    return validate_header(&h, file_size);
}

int shmstm_seg_attach(int fd, int read_only, int64_t wait_ns, shmstm_params *p, shmstm_seg **out)
{
    struct stat st;
    if (fstat(fd, &st))
        return SHMSTM_ESYS;
    if (st.st_uid != geteuid() || (st.st_mode & 0077))
        return SHMSTM_EPERM;
    uint64_t deadline = now_ns() + (uint64_t)(wait_ns > 0 ? wait_ns : 0);
    size_t hsz = round_up(sizeof(struct shm_header), 4096);
    unsigned char *hmap = MAP_FAILED;
    for (;;) {
        if (fstat(fd, &st))
            return SHMSTM_ESYS;
        if ((uint64_t)st.st_size >= hsz) {
            if (hmap == MAP_FAILED)
                hmap = mmap(NULL, hsz, PROT_READ, MAP_SHARED, fd, 0);
            if (hmap == MAP_FAILED)
                return SHMSTM_ESYS;
            struct shm_header *hh = (struct shm_header *)hmap;
            /* Pairs with the store_release in create. */
            uint32_t is = load_acquire(&hh->init_state);
            if (is == INIT_READY)
                break;
            /* Neither state of a segment being created: another layout or not
             * shmstm at all.  Say so at once instead of waiting to time out. */
            if (is != INIT_CREATING) {
                munmap(hmap, hsz);
                return SHMSTM_ELAYOUT;
            }
            /* Not ready: if the kernel says the creator is gone, it never will
             * be (a creator killed half-way); fail now rather than at the
             * deadline.  creator_pid is 0 until the creator wrote it. */
            uint32_t cpid = load_relaxed((a32 *)&hh->creator_pid);
            if (cpid && !proc_alive(cpid, load_relaxed((a64 *)&hh->creator_start))) {
                munmap(hmap, hsz);
                return SHMSTM_EINIT;
            }
        }
        if (now_ns() >= deadline) {
            int rc = SHMSTM_EINIT;
            if (hmap != MAP_FAILED) {
                /* Creators write SHMSTM_MAGIC (or nothing yet) before READY; any
                 * other magic is a foreign segment, not a creator that died.
                 * Read after the deadline, when no live creator is expected. */
                uint64_t magic;
                memcpy(&magic, hmap, sizeof magic);
                if (magic != 0 && magic != SHMSTM_MAGIC)
                    rc = SHMSTM_ELAYOUT;
                munmap(hmap, hsz);
            }
            return rc;
        }
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    struct shm_header copy;
    memcpy(&copy, hmap, sizeof copy);
    munmap(hmap, hsz);
    int rc = validate_header(&copy, (uint64_t)st.st_size);
    if (rc)
        return rc;
    struct shmstm_seg *s = calloc(1, sizeof *s);
    if (!s)
        return SHMSTM_ENOMEM;
    int prot = read_only ? PROT_READ : PROT_READ | PROT_WRITE;
    unsigned char *base = mmap(NULL, copy.seg_size, prot, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        free(s);
        return SHMSTM_ESYS;
    }
    if (memcmp(base, &copy, offsetof(struct shm_header, init_state)) != 0) {
        munmap(base, copy.seg_size);
        free(s);
        return SHMSTM_ECORRUPT;
    }
    fill_seg(s, base, &copy, read_only);
    params_out(&copy, p);
    /* Locks that no live process will ever release: a dead owner's (its slot
     * is recovered) and corrupt words naming no possible owner (proc.c). */
    shmstm_seg_repair_locks(s);
    *out = s;
    return 0;
}

/* Unmap the segment.  Every context still linked gives its slot back first
 * (txn.c, "contexts"); their memory stays until their owners free them, and
 * they answer SHMSTM_ECLOSED meanwhile.  The caller must not detach while
 * another of its threads is inside a call on this segment. */
int shmstm_seg_detach(shmstm_seg *s)
{
    if (!s)
        return 0;
    pthread_mutex_lock(&s->ctx_lock);
    s->detached = 1;
    seg_release_ctxs(s);
    pthread_mutex_unlock(&s->ctx_lock);
    munmap(s->base, s->size);
    free(s->collect_seen);
    free(s->collect_owners);
    free(s->name_off);
    s->collect_seen = NULL;
    s->collect_owners = NULL;
    s->name_off = NULL;
    seg_unref(s);
    return 0;
}

void seg_unref(struct shmstm_seg *s)
{
    /* acq_rel: every earlier use of s by the dropper happens before the free. */
    if (faa_acq_rel(&s->refs, (uint32_t)-1) == 1u) {
        pthread_mutex_destroy(&s->ctx_lock);
        free(s);
    }
}

int shmstm_seg_info_get(shmstm_seg *s, shmstm_seg_info *o)
{
    struct shm_header *h = s->h;
    memset(o, 0, sizeof *o);
    o->clock = load_relaxed(&h->clock);
    o->seg_size = s->size;
    o->heap_size = s->heap_size;
    o->heap_bump = load_relaxed(&h->heap_bump);
    o->max_tvars = s->max_tvars;
    o->max_procs = s->max_procs;
    o->max_value_size = s->max_value_size;
    o->dir_slots = s->dir_slots;
    uint32_t bump = load_relaxed(&h->tvar_bump);
    o->tvar_bump = bump < s->max_tvars ? bump : s->max_tvars;
    for (uint32_t i = 0; i < o->tvar_bump; i++)
        if (load_relaxed(&s->tvars[i].gen) & 1u)
            o->tvars_live++;
    for (uint32_t i = 0; i < s->dir_slots; i++)
        if ((load_relaxed(&s->dir[i].key) & 3u) == DE_READY)
            o->names++;
    for (uint32_t i = 0; i < s->max_procs; i++) {
        struct shm_proc *p = &s->procs[i];
        if (ps_state(load_relaxed(&p->owner)) != PS_FREE)
            o->procs_active++;
        for (uint32_t c = 0; c < HEAP_CLASSES; c++)
            o->class_blocks[c] += (int64_t)(load_relaxed(&p->heap_allocs[c]) -
                                            load_relaxed(&p->heap_frees[c]));
    }
    for (uint32_t c = 0; c < HEAP_CLASSES; c++)
        o->class_size[c] = heap_class_size(c);
    o->token = load_relaxed(&h->token);
    o->flushed_wv = load_relaxed(&h->flushed_wv);
    o->created_ns = h->created_ns;
    o->creator_pid = h->creator_pid;
    o->layout_version = SHMSTM_LAYOUT_VERSION;
    o->signature = h->signature;
    memcpy(o->runtime_id, h->runtime_id, 16);
    return 0;
}

int shmstm_seg_proc_info(shmstm_seg *s, uint32_t slot, shmstm_proc_info *o)
{
    if (slot >= s->max_procs)
        return SHMSTM_EINVAL;
    struct shm_proc *p = &s->procs[slot];
    memset(o, 0, sizeof *o);
    uint64_t own = load_relaxed(&p->owner);
    o->slot = slot;
    o->state = ps_state(own);
    o->pid = ps_pid(own);
    o->rec_state = load_relaxed(&p->rec.state);
    o->start_time = load_relaxed(&p->start_time);
    o->tid = load_relaxed(&p->tid);
    o->attach_ns = load_relaxed(&p->attach_ns);
    o->commits = load_relaxed(&p->commits);
    o->ro_commits = load_relaxed(&p->ro_commits);
    for (uint32_t i = 0; i < AB_NREASONS; i++)
        o->aborts[i] = load_relaxed(&p->aborts[i]);
    o->retries = load_relaxed(&p->retries);
    o->wakeups = load_relaxed(&p->wakeups);
    o->bytes_committed = load_relaxed(&p->bytes_committed);
    o->irrevocable = load_relaxed(&p->irrevocable);
    for (uint32_t i = 0; i < LAT_BUCKETS; i++)
        o->lat_hist[i] = load_relaxed(&p->lat_hist[i]);
    o->waiting = load_relaxed(&p->sleeping);
    o->alive = o->state != PS_FREE && !slot_owner_dead(s, slot);
    return 0;
}

/* The n live TVars with the most conflicts, most first, with their generations
 * (a freed anonymous TVar's index is reused with a new generation and conflicts
 * from zero: index and generation name one TVar).  Returns how many. */
/* Every live TVar with a waiter: its index and waiter bitmap (bit slot % 64,
 * wait.c), at most cap of them; returns how many there are.  Advisory: a
 * snapshot for the stats tool. */
int shmstm_seg_waited(shmstm_seg *s, uint32_t *idx, uint64_t *bits, uint32_t cap)
{
    uint32_t k = 0, bump = load_relaxed(&s->h->tvar_bump);
    if (bump > s->max_tvars)
        bump = s->max_tvars;
    for (uint32_t i = 0; i < bump; i++) {
        uint64_t w = load_relaxed(&s->tvars[i].waiters);
        if (!w || !(load_relaxed(&s->tvars[i].gen) & 1u))
            continue;
        if (k < cap) {
            idx[k] = i;
            bits[k] = w;
        }
        k++;
    }
    return (int)k;
}

int shmstm_seg_hot_tvars(shmstm_seg *s, uint32_t *idx, uint32_t *gen, uint32_t *conf,
                         uint32_t n)
{
    uint32_t k = 0, bump = load_relaxed(&s->h->tvar_bump);
    if (bump > s->max_tvars)
        bump = s->max_tvars;
    for (uint32_t i = 0; i < bump; i++) {
        uint32_t g = load_acquire(&s->tvars[i].gen);
        uint32_t c = load_relaxed(&s->tvars[i].conflicts);
        /* Advisory, like the counter: skip a TVar freed or re-created meanwhile. */
        fence_acquire();
        if (!c || !(g & 1u) || load_relaxed(&s->tvars[i].gen) != g)
            continue;
        uint32_t j = k < n ? k++ : n;
        if (j == n) {
            if (!n || conf[n - 1] >= c)
                continue;
            j = n - 1;
        }
        while (j > 0 && conf[j - 1] < c) {
            idx[j] = idx[j - 1];
            gen[j] = gen[j - 1];
            conf[j] = conf[j - 1];
            j--;
        }
        idx[j] = i;
        gen[j] = g;
        conf[j] = c;
    }
    return (int)k;
}

int shmstm_noop(void) { return 0; }

uint64_t shmstm_layout_signature(void) { return layout_signature(); }

const char *shmstm_build_info(void)
{
#ifndef SHMSTM_PKG_VERSION
#define SHMSTM_PKG_VERSION "unknown"
#endif
#define STR_(x) #x
#define STR(x) STR_(x)
#ifdef SHMSTM_DEBUG
    return SHMSTM_PKG_VERSION " layout=" STR(SHMSTM_LAYOUT_VERSION_) " debug";
#else
    return SHMSTM_PKG_VERSION " layout=" STR(SHMSTM_LAYOUT_VERSION_) " release";
#endif
}
